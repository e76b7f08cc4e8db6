"""What the person running the launchers sees: ``--help`` without heavy imports and with every
choice and default, one clean ``error:`` line per mistake (on 2 ranks where the check is
distributed) and an exit status of 2, log lines that read well in a file, a resume that never
silently starts over, and no temporary directory left behind.

The launchers run as a user runs them (``python launch/...``, ``torchrun``) in subprocesses, with
their own ``TMPDIR``; the Hugging Face model checks run in this process (they fail before any
process group exists)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, T5Config

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model.dim=32", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.span_size=24",
    "--optim.warmup_steps=1", "--checkpoint.every=2", "--metrics.tensorboard=false", "--kernels.attention=torch",
    "--kernels.loss=torch", "--seq-len=128",
]  # fmt: skip


def launch(script: str, args: list[str], tmp_path: Path, ranks: int = 0) -> subprocess.CompletedProcess:
    """``python launch/<script> args`` (``ranks=0``) or ``torchrun`` with ``ranks`` processes."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    env.pop("LSTS_DEBUG", None)
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [*(runner if ranks else [sys.executable]), str(ROOT / "launch" / script), *args]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_clean_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2 from the launcher; one ``error:`` line holding ``expected``; no frame of lsts."""
    assert result.returncode != 0, result.stderr
    [line] = error_lines(result.stderr)
    for text in expected:
        assert text in line, line
    # torchrun prints its own report when a rank fails; no traceback may come from lsts itself.
    assert not any(f'File "{ROOT}' in x for x in result.stderr.splitlines()), result.stderr
    return line


# ---- --help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train.py", "finetune.py", "eval.py", "demo_attention.py"])
def test_help_imports_no_heavy_package(script):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(ROOT / 'launch' / script)!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out


def _help(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    command = [sys.executable, str(ROOT / "launch" / script), "--help"]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def test_help_lists_choices_defaults_and_sections():
    text = _help("train.py")
    assert "--parallel.dp_engine {fsdp2,ddp,zero1,zero2,zero3}" in text and "(default: fsdp2)" in text
    assert "--parallel.layout {zigzag,contiguous,stripe,balanced,auto}" in text
    assert "--model.span {window,block}" in text
    assert "--optim.schedule {cosine,linear,constant}" in text and "--train.resume {false,true,auto}" in text
    assert "checkpoint:\n  Atomic checkpoints" in text and "metrics:\n  What a run reports" in text
    assert "Config(" not in text  # no dataclass repr in place of a section's description
    finetune = _help("finetune.py")
    assert "--finetune.method {lora,longlora,sinklora,full,spt}" in finetune and "(default: longlora)" in finetune
    evaluate = _help("eval.py")
    assert "(default: 1024,2048,4096,8192)" in evaluate and "{auto,torch,triton,reference}" in evaluate
    assert "main job" not in _help("demo_attention.py")


# ---- one error line per mistake -----------------------------------------------------------------


def test_each_bad_config_value_is_its_own_line(tmp_path):
    result = launch("train.py", ["--steps=0", "--optim.lr=0"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result.stderr) == ["error: optim.lr (0.0) must be > 0", "error: train.steps (0) must be >= 1"]
    typo = launch("train.py", ["--model.dimm=64"], tmp_path)
    assert_one_clean_error(typo, "unknown option '--model.dimm'", "did you mean '--model.dim'")


def test_degrees_that_do_not_fit_the_world_are_named_on_two_ranks(tmp_path):
    result = launch("train.py", [*TINY, "--parallel.tp=3", "--model.n_heads=6", "--model.dim=48"], tmp_path, ranks=2)
    assert_one_clean_error(result, "3 ranks do not fit a world of 2", "parallel.tp=3")


def test_a_run_time_check_is_one_line_on_two_ranks(tmp_path):
    # cp_ring = -1 is resolved by the world: the sequence length is checked by every rank at start.
    result = launch("train.py", [*TINY, "--seq-len=130", f"--out={tmp_path / 'run'}"], tmp_path, ranks=2)
    assert_one_clean_error(result, "130", "multiple of 4")


def test_a_missing_dataset_is_one_line(tmp_path):
    result = launch("train.py", [*TINY, f"--data.dataset={tmp_path / 'nope.txt'}", f"--out={tmp_path}"], tmp_path)
    assert_one_clean_error(result, "nope.txt")


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def not_decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("not_decoders")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        root / "bert"
    )
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(root / "t5")
    return root


@pytest.mark.parametrize(
    "model,message", [("bert", "'bert' model is an encoder (is_decoder = false)"), ("t5", "'t5' model is not a causal")]
)
@pytest.mark.parametrize("launcher,args", [("finetune", ["--seq-len=256", "--steps=1"]), ("eval", ["--lengths=256"])])
def test_a_model_lsts_cannot_run_is_refused_before_its_weights(not_decoders, model, message, launcher, args, capsys):
    with pytest.raises(SystemExit) as info:  # a config.json only: reading weights would fail differently
        _launcher(launcher).main([f"--model={not_decoders / model}", *args])
    assert info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert message in line and "decoder-only causal LM on transformers' AttentionInterface" in line


def test_a_decoder_off_the_attention_interface_is_refused(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lsts.finetune.base import load_base_config

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert load_base_config(str(tmp_path)).model_type == "llama"
    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)  # as an older modeling file
    with pytest.raises(ValueError, match="LlamaForCausalLM does not dispatch its attention through transformers'"):
        load_base_config(str(tmp_path))


def test_debug_shows_the_traceback(not_decoders):
    with pytest.raises(ValueError, match="is an encoder"):
        _launcher("finetune").main([f"--model={not_decoders / 'bert'}", "--debug"])


def test_only_the_notices_a_user_cannot_act_on_are_filtered():
    import logging
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from lsts.cli import quiet_third_party

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        assert model.is_gradient_checkpointing is False  # the deprecated alias that peft probes
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another deprecation"]
    deepspeed = logging.getLogger("DeepSpeed")

    def record(message):
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)

    assert not deepspeed.filter(record("Setting accelerator to CPU. If you have GPU or other accelerator, ..."))
    assert deepspeed.filter(record("Setting ds_accelerator to cpu (auto detect)"))


# ---- logging, resume, leftovers -----------------------------------------------------------------


def test_a_run_logs_resumes_only_what_is_complete_and_leaves_no_temp_dir(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    first = launch("train.py", [*TINY, "--steps=2", f"--out={out}", "--resume=auto"], tmp_path)
    assert first.returncode == 0, first.stderr
    log = first.stderr
    assert f"output directory {out}" in log and "starting at step 0 (--resume=auto: no complete checkpoint" in log
    assert "step 2/2 | loss " in log and " tok/s | mem " in log and " | grad norm " in log and " | ETA " in log
    assert f"checkpoint step 2 saved to {ckpt / 'step-000002'}" in log
    assert "\r" not in log  # no progress bar in a file
    assert list((tmp_path / "tmpdir").glob("lsts-*")) == []  # no rendezvous directory left behind

    longer = launch("train.py", [*TINY, "--steps=4", f"--out={out}", "--resume"], tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert f"resuming from {ckpt / 'step-000002'}" in longer.stderr
    [warning] = [line for line in longer.stderr.splitlines() if "warning:" in line]
    assert "train.steps 2 -> 4" in warning
    [step3] = [line for line in longer.stderr.splitlines() if "step 3/4 | " in line]
    assert "step 1/4" not in longer.stderr
    # The warning's learning rate of step 3 is the one that step ran (and logged) at.
    predicted = float(re.search(r"becomes (\S+) at step 3", warning).group(1))
    assert float(re.search(r"\| lr (\S+) \|", step3).group(1)) == pytest.approx(predicted, rel=1e-3)

    markers = {step: (ckpt / step / "COMPLETE.json").read_bytes() for step in ("step-000002", "step-000004")}
    for step in markers:  # as if both saves had been interrupted
        (ckpt / step / "COMPLETE.json").unlink()
    refused = launch("train.py", [*TINY, "--steps=5", f"--out={out}", "--resume"], tmp_path)
    assert_one_clean_error(refused, "no complete checkpoint", "step-000004 (incomplete: no COMPLETE.json)")

    (ckpt / "step-000004" / "COMPLETE.json").write_bytes(markers["step-000004"])
    shard = next((ckpt / "step-000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    corrupt = launch("train.py", [*TINY, "--steps=5", f"--out={out}", "--resume"], tmp_path)
    assert_one_clean_error(corrupt, "step-000004 is corrupt", shard.name)
