"""``launch/finetune.py --method longlora`` under ``torchrun`` on 2 ranks for decoders other than
Llama — Mistral with a sliding window, Qwen2, Gemma2 (attention softcapping, window), Phi3 (fused
``qkv_proj``, partial rotary), GPT-NeoX (fused ``query_key_value``, partial rotary) — each a tiny
local checkpoint extended 2x. The exported ``merged/`` must load in plain transformers (eager
attention), keep the base model's attention and RoPE settings, have normal file permissions, and
give the logits of the trained LoRA model (rebuilt here from the run's last checkpoint and run on
lsts attention).

One ``torchrun`` runs every architecture in turn (this module's ``__main__``: one process group,
``launch/finetune.py``'s ``main`` per checkpoint), so the processes start once; an architecture
that fails leaves its error for its own test."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.finetune.recipes import load_extended, recipe
from lsts.finetune.trainer import CausalLMLoss
from lsts.models.hf import use_lsts_attention
from lsts.train.checkpoint import latest_checkpoint
from tests.hf_models import save_tiny_decoder, tiny_decoder
from tests.oracle import rel_err

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64  # 2 x the checkpoints' 32 positions; S² groups of 16 fit in the 32-token windows
CTX = AttentionContext(backend="torch")
ARCHS = ("mistral", "qwen2", "gemma2", "phi3", "gpt_neox")
# Keys the export changes on purpose (the extension, the attention the plain load uses) or that
# record the writer rather than the model.
CHANGED_KEYS = {"rope_parameters", "max_position_embeddings", "dtype", "transformers_version"}


def _args(base: Path, out: Path) -> list[str]:
    return [
        f"--model={base}", "--method=longlora", f"--seq-len={SEQ}", "--steps=2", f"--out={out}", "--optim.lr=1e-2",
        "--optim.warmup_steps=1", "--checkpoint.every=2", "--metrics.tensorboard=false",
        "--metrics.progress_bar=false", "--kernels.attention=torch", "--kernels.loss=torch",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{arch: (base, out)}`` after one torchrun of 2 ranks fine-tuned each architecture."""
    root = tmp_path_factory.mktemp("finetune_models")
    for arch in ARCHS:
        save_tiny_decoder(root / arch / "base", arch, max_position_embeddings=32)
    command = ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "tests.test_finetune_models", str(root)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *ARCHS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {arch: (root / arch / "base", root / arch / "out") for arch in ARCHS}


def _trained_lora_model(base: Path, out: Path, tmp: Path):
    """The run's LoRA model: the recipe's model over the base, with the last checkpoint's weights."""
    dcp_to_torch_save(latest_checkpoint(out), tmp / "state.pt")
    trained = torch.load(tmp / "state.pt", weights_only=False)["model"]
    model = CausalLMLoss(recipe("longlora", SEQ).prepare(load_extended(base, SEQ), CTX), backend="torch")
    missing, unexpected = model.load_state_dict(trained, strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())  # the adapters trained
    return use_lsts_attention(model.model, None, CTX).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_longlora_on_two_ranks_exports_a_plain_model_equal_to_the_lora_model(runs, tmp_path, arch):
    base, out = runs[arch]
    errors = sorted(out.parent.glob("error-rank*.txt"))
    assert not errors, errors[0].read_text()
    merged = out / "merged"

    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in merged.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes

    want_config = json.loads((base / "config.json").read_text())
    got_config = json.loads((merged / "config.json").read_text())
    for key in want_config.keys() - CHANGED_KEYS:  # window, layer types, softcapping... as in the base
        assert got_config.get(key) == want_config[key], key
    assert got_config["max_position_embeddings"] == SEQ
    rope, base_rope = got_config["rope_parameters"], want_config["rope_parameters"]
    for key in base_rope.keys() - {"rope_type"}:
        assert rope[key] == base_rope[key], key

    tokens = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _trained_lora_model(base, out, tmp_path)(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
        got = plain(tokens).logits
        untrained = load_extended(base, SEQ).eval()(tokens).logits
    assert rel_err(untrained, want) > 1e-3  # the training moved the model: the comparison can fail
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logits_scaling", 4.0)])
def test_a_head_that_transforms_the_logits_is_refused_with_the_setting_to_change(tmp_path, key, value):
    from lsts.finetune.config import load_finetune_config
    from lsts.finetune.trainer import FinetuneJob

    model = tiny_decoder("gemma2")
    setattr(model.config, key, value)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{key} = {value}, which the fine-tuning loss head"):
        FinetuneJob(load_finetune_config([f"--model={tmp_path}"]))


def _finetune_each(root: Path, archs: list[str]) -> None:
    """Under torchrun: ``launch/finetune.py``'s main for each architecture in one process group."""
    import traceback

    import torch.distributed as dist

    from launch.finetune import main

    dist.init_process_group("gloo")
    for arch in archs:
        try:
            main(_args(root / arch / "base", root / arch / "out"))
        except (Exception, SystemExit):  # the architecture's own test reports it
            (root / arch / f"error-rank{dist.get_rank()}.txt").write_text(traceback.format_exc())
    dist.destroy_process_group()


if __name__ == "__main__":
    _finetune_each(Path(sys.argv[1]), sys.argv[2:])
