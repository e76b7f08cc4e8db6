"""Sequence parallelism for Hugging Face training (`lsts.models.hf.sequence_parallel`): Trainer and TRL
SFTTrainer runs under torchrun equal one plain-transformers process on ``eager`` attention, step by
step; batches are packed into documents exactly; bad input on one rank is the same error on all."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.models.hf import sequence_parallel
from lsts.models.hf.sequence_parallel import DOCUMENTS, check_trainer, pack_batch
from tests.distributed import run_ranks
from tests.hf_models import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "hf_sp_trainer.py"
IGNORE = -100


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)


def _launch(checkpoint, out: Path, runs: list[str], nproc: int, launcher: str = "torchrun") -> dict:
    """The runs in one process (the baseline), under torchrun or accelerate launch; their per-step logs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = [str(SCRIPT), str(checkpoint), str(out), *runs]
    if nproc == 1:
        cmd = [sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", *script]
    else:
        port = str(29500 + os.getpid() % 1000)  # accelerate has no free-port option: one per test process
        accelerate = ["-m", "accelerate.commands.launch", f"--num_processes={nproc}", "--cpu", "--main_process_port"]
        cmd = [sys.executable, *accelerate, port, *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(out.read_text())


def _steps(logs):
    assert isinstance(logs, list), logs["error"]
    return logs


@pytest.fixture(scope="module")
def baseline(checkpoint, tmp_path_factory):
    return _launch(checkpoint, tmp_path_factory.mktemp("base") / "out.json", ["trainer:local", "sft:local"], 1)


@pytest.fixture(scope="module")
def two_ranks(checkpoint, tmp_path_factory):
    runs = ["trainer:ring", "trainer:ulysses", "sft:ring", "sft:ulysses", "trainer_bf16:ring", "sft_bf16:ring"]
    return _launch(checkpoint, tmp_path_factory.mktemp("cp2") / "out.json", runs, 2)


def _assert_same_steps(got, want):
    got, want = _steps(got), _steps(want)
    assert len(got) == len(want) == 3
    for step, (g, w) in enumerate(zip(got, want)):
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= 2e-5 * abs(w[key]), (step, key, g[key], w[key])


@pytest.mark.parametrize("kind", ["trainer", "sft"])
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_cp2_equals_one_process_at_every_step(baseline, two_ranks, kind, mode):
    # trainer: rows of different lengths, so the two ranks' batches are padded differently;
    # sft: TRL packing (padding-free rows of several documents).
    _assert_same_steps(two_ranks[f"{kind}:{mode}"], baseline[f"{kind}:local"])
    assert len({round(s["loss"], 4) for s in baseline[f"{kind}:local"]}) == 3  # the steps did train


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_bf16_autocast_trains_close_to_fp32(baseline, two_ranks, kind):
    got, want = _steps(two_ranks[f"{kind}_bf16:ring"]), _steps(baseline[f"{kind}:local"])
    assert len(got) == 3 and all(abs(g["loss"] - w["loss"]) < 5e-3 * w["loss"] for g, w in zip(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("run, base", [("trainer:hybrid:4:2", "trainer:local:1:2"), ("sft:ring:2:2", "sft:local:1:4")])
def test_hybrid_and_dp_times_cp_on_four_ranks(checkpoint, tmp_path, run, base):
    # dp=2 x cp=2 takes 2 dp groups x 2 accumulation steps of batches per step: one process with 4.
    want = _launch(checkpoint, tmp_path / "base.json", [base], 1)[base]
    _assert_same_steps(_launch(checkpoint, tmp_path / "out.json", [run], 4)[run], want)


@pytest.mark.slow
def test_accelerate_launch_equals_one_process(baseline, checkpoint, tmp_path):
    got = _launch(checkpoint, tmp_path / "out.json", ["sft:ring"], 2, launcher="accelerate")
    _assert_same_steps(got["sft:ring"], baseline["sft:local"])


def test_padded_rows_become_documents_with_labels_shifted_on_the_row():
    tokens = torch.tensor([[5, 6, 7, 0, 0], [0, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right, then left padding
    pack = pack_batch({"input_ids": tokens, "attention_mask": mask, "labels": tokens.masked_fill(mask == 0, IGNORE)})
    assert pack.tokens.tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert pack.positions.tolist() == [0, 1, 2, 1, 2, 3, 4]  # transformers' positions of a padded row
    assert pack.labels.tolist() == [6, 7, IGNORE, 9, 10, 11, IGNORE]
    assert pack.cu.tolist() == [0, 3, 7]
    tail = pack.padded(4)
    assert tail.cu.tolist() == [0, 3, 7, 8] and tail.labels[-1] == IGNORE and tail.positions[-1] == 0


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens"])
def test_packed_documents_never_predict_the_next_document(boundaries):
    tokens = torch.arange(10, 19)[None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    batch = {"input_ids": tokens, "labels": tokens, "position_ids": positions}
    if boundaries == "cu_seq_lens":
        cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    pack = pack_batch(batch)
    assert pack.cu.tolist() == [0, 4, 6, 9]
    assert pack.labels.tolist() == [11, 12, 13, IGNORE, 15, IGNORE, 17, 18, IGNORE]
    assert pack.positions.tolist() == positions[0].tolist()


def test_batches_sequence_parallelism_cannot_shard_are_clear_errors():
    tokens = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="token_type_ids"):
        pack_batch({"input_ids": tokens, "labels": tokens, "token_type_ids": tokens})
    with pytest.raises(ValueError, match="needs input_ids and labels"):
        pack_batch({"input_ids": tokens})
    with pytest.raises(ValueError, match="not a padding mask"):
        pack_batch({"input_ids": tokens, "labels": tokens, "attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]])})


def _batch(n, mask=None):
    tokens = torch.arange(1, n + 1)[None]
    return {"input_ids": tokens, "labels": tokens, **({} if mask is None else {"attention_mask": torch.tensor([mask])})}


BAD_ON_ONE_RANK = {  # each rank's batches -> the error every rank must raise
    "rank 1: attention_mask row 0 is not a padding mask": [[_batch(6)], [_batch(6, [1, 1, 0, 1, 1, 1])]],
    "ran out of batches at different steps": [[_batch(6), _batch(4)], [_batch(6)]],
}


def _loader_runs(rank, world, path):
    """This rank's shards of a good pair of batches, then the error of each bad case (one spawn for all)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sp = sequence_parallel(model, cp=world, mode="ring", backend="torch")
    good = [[_batch(6)], [_batch(3, [1, 1, 0])]][rank]
    shards = [{k: v.tolist() for k, v in b.items()} for b in sp.adapt(good)]
    # The Trainer's resume skips micro-batches: 3 of this group's 4 (each rank's 2 batches, in turn).
    loader = torch.utils.data.DataLoader([_batch(6), _batch(8)], batch_size=1, collate_fn=lambda rows: rows[0])
    resumed = [{k: v.tolist() for k, v in b.items()} for b in sp.adapt(loader).skip_first(3)]
    errors = {}
    for expected, batches in BAD_ON_ONE_RANK.items():
        try:
            list(sp.adapt(batches[rank]))
        except ValueError as e:
            errors[expected] = str(e)
    return shards, errors, resumed, [{k: v.tolist() for k, v in b.items()} for b in sp.adapt(loader)]


@pytest.fixture(scope="module")
def loader_runs(checkpoint):
    return run_ranks(_loader_runs, 2, str(checkpoint))


def test_each_ranks_batch_is_sharded_over_the_group_in_turn(loader_runs):
    for rank, (shards, *_) in enumerate(loader_runs):
        assert len(shards) == 2  # rank 0's batch, then rank 1's
        # Rank 0's 6 tokens pad to 8 (zigzag chunks of 2); rank 1's 2 real tokens pad to 4.
        assert shards[0][DOCUMENTS] == [0, 6, 8] and shards[1][DOCUMENTS] == [0, 2, 4]
        assert shards[0]["input_ids"] == [[[1, 2, 0, 0], [3, 4, 5, 6]][rank]]
        assert shards[0]["shift_labels"] == [[[2, 3, IGNORE, IGNORE], [4, 5, 6, IGNORE]][rank]]
        assert shards[1]["input_ids"] == [[[1, 0], [2, 0]][rank]]


def test_resuming_skips_micro_batches_across_the_gathered_batches(loader_runs):
    for _, _, resumed, every in loader_runs:
        assert len(every) == 4 and resumed == every[3:]


@pytest.mark.parametrize("expected", list(BAD_ON_ONE_RANK))
def test_bad_input_on_one_rank_is_the_same_error_on_every_rank(loader_runs, expected):
    (_, errors_0, *_), (_, errors_1, *_) = loader_runs
    assert expected in errors_0[expected] and errors_0[expected] == errors_1[expected]


def test_settings_that_break_the_token_mean_are_refused():
    args = SimpleNamespace(average_tokens_across_devices=True, label_smoothing_factor=0.0)
    trainer = SimpleNamespace(args=args, model=None, model_accepts_loss_kwargs=True, compute_loss_func=None)
    trainer.accelerator = None
    check_trainer(trainer)
    for field, value, match in [
        ("average_tokens_across_devices", False, "average_tokens_across_devices=True"),
        ("label_smoothing_factor", 0.1, "label_smoothing_factor=0"),
    ]:
        bad = SimpleNamespace(**{**vars(trainer), "args": SimpleNamespace(**{**vars(args), field: value})})
        with pytest.raises(ValueError, match=match):
            check_trainer(bad)
    with pytest.raises(ValueError, match="no loss kwargs"):
        check_trainer(SimpleNamespace(**{**vars(trainer), "model_accepts_loss_kwargs": False}))


def test_degrees_that_do_not_fit_are_clear_errors(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown sequence-parallel mode"):
        sequence_parallel(model, cp=2, mode="tree")
    with pytest.raises(ValueError, match="hybrid needs a Ulysses degree"):
        sequence_parallel(model, cp=4, mode="hybrid")
    with pytest.raises(ValueError, match="must divide the 1 processes"):
        sequence_parallel(model, cp=2)
