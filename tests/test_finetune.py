"""``launch/finetune.py`` end to end on gloo ranks with a tiny local GQA Llama (nothing is
downloaded): context parallelism equals one process on the loss and every LoRA gradient (float64),
whole runs agree across cp / dp engines (FSDP2, DDP, ZeRO-2/3 over frozen base weights), resume is
exact, the merged export loads in plain transformers at the new length, and bad runs fail on every
rank with the fix. Numbers come back from ``metrics.jsonl`` as a user would read them."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.finetune.config import load_finetune_config
from lsts.finetune.recipes import load_extended, recipe
from lsts.finetune.trainer import CausalLMLoss
from lsts.parallel import shard_sequence
from tests.distributed import errors_on_all_ranks, run_ranks
from tests.hf_models import save_tiny_llama
from tests.oracle import rel_err

SEQ = 128  # 4 x the checkpoint's 32 positions: RoPE factor 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=32, vocab_size=256))


# --- cp = 2 equals cp = 1 on the loss and the LoRA gradients (float64) ---------------------------


def _loss_and_grads(rank, world, checkpoint, method):
    torch.manual_seed(0)
    mode = "ring" if world > 1 else "local"
    ctx = AttentionContext(mode=mode, backend="torch")
    hf = recipe(method, SEQ).prepare(load_extended(checkpoint, SEQ, torch.float64), ctx)
    model = CausalLMLoss(hf, backend="torch")
    with torch.no_grad():  # LoRA B starts at zero: give the adapters weight so their A gradients matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, SEQ + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ)[None]
    if world > 1:
        inputs, labels, positions = (shard_sequence(x) for x in (inputs, labels, positions))
    loss = model(inputs, positions, ctx, labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:  # each rank holds its tokens' share of a replicated weight's gradient
        torch.distributed.all_reduce(loss)
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
    return loss.item(), {n: g.numpy().copy() for n, g in grads.items()}  # numpy: pickled by value


@pytest.mark.parametrize("method", ["lora", "longlora", "sinklora", "full"])
def test_context_parallel_equals_one_process_on_loss_and_gradients(checkpoint, method):
    (want_loss, want), *_ = run_ranks(_loss_and_grads, 1, checkpoint, method)
    got = run_ranks(_loss_and_grads, 2, checkpoint, method)
    assert any("lora_A" in n for n in want) == (method != "full")
    for rank, (loss, grads) in enumerate(got):
        assert abs(loss - want_loss) < 1e-12 * abs(want_loss), rank
        assert grads.keys() == want.keys()
        worst = max(rel_err(torch.from_numpy(grads[n]), torch.from_numpy(want[n])) for n in want)
        assert worst < 1e-10, (rank, worst)


# --- whole runs -----------------------------------------------------------------------------------

COMMON = [
    "--optim.lr=1e-3",
    "--optim.warmup_steps=1",
    "--checkpoint.every=2",
    "--metrics.tensorboard=false",
    "--metrics.progress_bar=false",
    "--kernels.attention=torch",
    "--kernels.loss=torch",
]


def _finetune_on_ranks(rank, world, args):
    from lsts.finetune.trainer import finetune

    return finetune(load_finetune_config(args))


def _run(checkpoint, out, world, *extra, method="longlora", steps=3):
    args = [f"--model={checkpoint}", f"--method={method}", f"--seq-len={SEQ}", f"--steps={steps}", f"--out={out}"]
    run_ranks(_finetune_on_ranks, world, [*args, *COMMON, *extra])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_run(a, b, tol=1e-5):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= tol * abs(y[key]), (key, x, y)


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    """Reference runs in one process, per method."""
    out = tmp_path_factory.mktemp("ref")
    return {m: _run(checkpoint, str(out / m), 1, method=m) for m in ("longlora", "sinklora")}


@pytest.mark.parametrize("method", ["longlora", "sinklora"])
def test_cp2_run_equals_one_process_and_merged_model_runs_at_the_new_length(checkpoint, one_process, tmp_path, method):
    rows = _run(checkpoint, str(tmp_path / "cp2"), 2, method=method)
    _assert_same_run(rows, one_process[method])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cp2" / "merged", dtype=torch.float32)
    assert merged.config.rope_parameters["factor"] == 4.0 and merged.config.max_position_embeddings == SEQ
    logits = merged(torch.randint(0, 256, (1, SEQ))).logits
    assert logits.shape == (1, SEQ, 256) and torch.isfinite(logits).all()


def test_ulysses_cp2_run_equals_one_process(checkpoint, one_process, tmp_path):
    """S² under Ulysses: each rank's slice of heads knows where the shifted half begins."""
    rows = _run(checkpoint, str(tmp_path / "uly"), 2, "--parallel.cp_ring=1", "--parallel.cp_ulysses=2")
    _assert_same_run(rows, one_process["longlora"])


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_data_parallel_engines_over_frozen_base_equal_one_process(checkpoint, tmp_path, engine):
    # dp = 2 over one sequence each: the same two sequences in one process need batch 2.
    args = ["--parallel.cp_ring=1", "--parallel.dp_shard=-1", f"--parallel.dp_engine={engine}"]
    rows = _run(checkpoint, str(tmp_path / engine), 2, *args)
    want = _run(checkpoint, str(tmp_path / "one"), 1, "--data.batch_size=2")
    _assert_same_run(rows, want)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / engine / "merged", dtype=torch.float32)
    assert merged.config.rope_parameters["factor"] == 4.0


def test_resume_continues_exactly_from_checkpoints_without_the_frozen_base(checkpoint, one_process, tmp_path):
    from lsts.train.checkpoint import _saved_keys, latest_checkpoint

    out = str(tmp_path / "resumed")
    _run(checkpoint, out, 2, "--checkpoint.every=1", steps=2)
    saved = {k for k in _saved_keys(latest_checkpoint(out)) if k.startswith("model.")}
    assert any("lora_A" in k for k in saved) and any("embed_tokens" in k for k in saved)  # LoRA+ trains them
    assert not any("base_layer" in k or "mlp" in k for k in saved)  # frozen: rebuilt from --model
    rows = _run(checkpoint, out, 2, "--resume")
    assert [r["step"] for r in rows] == [1, 2, 3]
    _assert_same_run(rows, one_process["longlora"])


def test_resume_refuses_another_base_checkpoint(checkpoint, tmp_path):
    other = str(save_tiny_llama(tmp_path / "other", max_position_embeddings=32, vocab_size=256))
    out = str(tmp_path / "run")
    _run(checkpoint, out, 1, "--finetune.merged=false", steps=1)
    with pytest.raises(Exception, match="trained with base"):
        _run(other, out, 1, "--resume", "--finetune.merged=false", steps=2)


def test_spt_cp2_equals_one_process_in_its_dense_stage(checkpoint, tmp_path):
    """Routed FFN, codebook loss and dense attention compose with the ring (sparse MHA needs cp = 1)."""
    extra = ["--finetune.spt_dense_steps=10", "--finetune.merged=false"]
    rows = _run(checkpoint, str(tmp_path / "cp2"), 2, *extra, method="spt")
    _assert_same_run(rows, _run(checkpoint, str(tmp_path / "one"), 1, *extra, method="spt"))


def test_spt_switches_to_sparse_attention_and_exports_a_plain_llama(checkpoint, tmp_path):
    from lsts.finetune import spt

    seen = []
    real = spt.set_stage
    spt.set_stage = lambda model, stage: (seen.append(stage), real(model, stage))[1]
    try:
        from lsts.finetune.trainer import finetune

        args = [f"--model={checkpoint}", "--method=spt", f"--seq-len={SEQ}", "--steps=3", f"--out={tmp_path}"]
        finetune(load_finetune_config([*args, *COMMON, "--finetune.spt_dense_steps=1"]))
    finally:
        spt.set_stage = real
    assert seen == ["sparse"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert not any("spt" in name for name in merged.state_dict())


def test_rolled_s2_ablation_trains_on_one_process(checkpoint, tmp_path):
    rows = _run(checkpoint, str(tmp_path / "roll"), 1, "--finetune.s2_variant=roll", "--data.doc_masking=false")
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            ["--parallel.cp_ring=1", "--parallel.dp_shard=-1", "--parallel.dp_engine=zero3", "--train.dtype=float16"],
            "loss scaling",
        ),
        (["--finetune.s2_variant=roll"], "one device"),
        (["--seq-len=132"], "multiple of"),
        (["--parallel.tp=2", "--parallel.cp_ring=1"], "tp=1"),
        (["--parallel.layout=auto"], "fine-tuning shards by zigzag or contiguous"),
    ],
)
def test_bad_runs_fail_on_every_rank_with_the_fix(checkpoint, tmp_path, extra, match):
    args = [f"--model={checkpoint}", f"--seq-len={SEQ}", f"--out={tmp_path}", *COMMON, *extra]
    errors = errors_on_all_ranks(_finetune_on_ranks, 2, args)
    assert all(match in e for e in errors), errors


def test_the_checkpoints_own_tokenizer_is_used_and_saved_with_the_merged_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lsts.finetune.trainer import finetune

    model_dir = save_tiny_llama(tmp_path / "llama", max_position_embeddings=32, vocab_size=256)
    words = ["[UNK]", *"abcdefghijklmnopqrstuvwxyz_()=:.,"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    args = [f"--model={model_dir}", "--method=lora", f"--seq-len={SEQ}", "--steps=1", f"--out={tmp_path / 'out'}"]
    cfg = load_finetune_config([*args, *COMMON])
    finetune(cfg)
    assert cfg.data.tokenizer == str(model_dir)  # "auto" picked the checkpoint's own
    merged = tmp_path / "out" / "merged"
    assert AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids("a") == 1


def test_a_checkpoint_without_tokenizer_and_a_small_vocabulary_is_a_clear_error(tmp_path):
    from lsts.finetune.trainer import FinetuneJob

    small = save_tiny_llama(tmp_path / "small", max_position_embeddings=32)  # 97 ids, no tokenizer files
    with pytest.raises(ValueError, match="byte tokenizer needs 256"):
        FinetuneJob(load_finetune_config([f"--model={small}"]))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"finetune\.model is empty"):
        load_finetune_config([])
    with pytest.raises(ValueError, match="neither a local checkpoint"):
        from lsts.finetune.trainer import FinetuneJob

        FinetuneJob(load_finetune_config([f"--model={tmp_path / 'nothing'}"]))


def test_shipped_finetune_configs_load_and_validate():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parent.parent / "configs" / "finetune").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_finetune_config(["--config", str(path)])
        assert cfg.finetune.method in ("lora", "longlora", "sinklora", "full") and cfg.finetune.model


def test_tiled_mlp_and_compiled_layers_train_like_the_plain_run(checkpoint, tmp_path):
    plain = _run(checkpoint, str(tmp_path / "plain"), 1, method="lora", steps=2)
    tiled = _run(checkpoint, str(tmp_path / "tiled"), 1, "--parallel.mlp_tile_tokens=24", method="lora", steps=2)
    _assert_same_run(tiled, plain)
    compiled = _run(checkpoint, str(tmp_path / "compiled"), 1, "--train.compile=true", method="lora", steps=2)
    _assert_same_run(compiled, plain, tol=1e-4)
