"""Long-context evaluation (``launch/eval.py``) on a tiny local Llama: sequence-parallel perplexity
equals one process, the one-forward passkey check agrees with greedy generation, split-K decoding
inside generation equals sdpa, and the command line writes its JSON."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lsts.models.hf.attention as hf_attention
from lsts.attention import AttentionContext
from lsts.finetune.evaluate import answer_hits, passkey_prompt, perplexity_by_length
from lsts.finetune.trainer import CausalLMLoss
from lsts.models.hf import use_lsts_attention
from lsts.train.data import ByteTokenizer
from tests.distributed import run_ranks
from tests.hf_models import save_tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=64, vocab_size=256))


def _model(checkpoint, ctx):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    return CausalLMLoss(use_lsts_attention(hf, ctx=ctx), backend="torch")


def _perplexity(rank, world, checkpoint):
    ctx = AttentionContext(mode="ring" if world > 1 else "local", backend="torch")
    stream = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(0))
    return perplexity_by_length(_model(checkpoint, ctx), stream, [64, 128], ctx, stride=40, max_windows=3)


def test_sequence_parallel_perplexity_equals_one_process(checkpoint):
    (want,) = run_ranks(_perplexity, 1, checkpoint)
    for got in run_ranks(_perplexity, 2, checkpoint):
        assert got.keys() == want.keys()
        assert all(abs(got[n] - want[n]) < 1e-10 * want[n] for n in want), (got, want)


def test_every_length_scores_the_same_tokens(checkpoint):
    """Windows end at the same places for every length and score their last ``stride`` tokens, so a
    model that ignores its context has the same perplexity at every length."""
    from lsts.finetune import evaluate

    seen = []
    real = evaluate.window_loss

    def spy(model, tokens, ctx, scored):
        seen.append((tokens[-scored:].tolist(), scored))
        return real(model, tokens, ctx, scored)

    stream = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1))
    ctx = AttentionContext(backend="torch")
    evaluate.window_loss = spy
    try:
        perplexity_by_length(_model(checkpoint, ctx), stream, [64, 128], ctx, stride=32, max_windows=2)
    finally:
        evaluate.window_loss = real
    assert seen[:2] == seen[2:] and all(n == 32 for _, n in seen)


def test_one_forward_passkey_check_agrees_with_greedy_generation(checkpoint):
    ctx = AttentionContext(backend="torch")
    model = _model(checkpoint, ctx)
    prompt, _ = passkey_prompt(ByteTokenizer(), 200, 0.5, "12345")
    greedy = model.causal_lm.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    greedy = greedy.tolist()
    assert answer_hits(model, prompt, greedy, ctx).all()
    wrong = [*greedy[:-1], (greedy[-1] + 1) % 256]
    assert answer_hits(model, prompt, wrong, ctx).tolist() == [True] * 5 + [False]


def test_passkey_prompt_hides_the_key_at_the_asked_depth():
    tok = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tok, 1000, depth, "55555")
        text = tok.decode(prompt)
        assert abs(len(prompt) + len(answer) - 1000) < 100 and text.endswith("The pass key is")
        where = text.index("The pass key is 55555") / len(text)
        assert abs(where - depth) < 0.2, (depth, where)


def test_split_k_decoding_in_generation_equals_sdpa(checkpoint, monkeypatch):
    monkeypatch.setattr(hf_attention, "DECODE_UNIT", 7)  # every decode step of a 40-token prompt splits
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    want = plain.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours = use_lsts_attention(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
    got = ours.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-4


def test_eval_command_writes_its_results(checkpoint, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_cli", "launch/eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "eval.json"
    cli.main([f"--model={checkpoint}", "--lengths=128,256", "--max-windows=1", "--passkey-trials=1",
              "--depths=0.5", "--h2o=32,32", "--eval-tokens=4096", f"--out={out}"])  # fmt: skip
    results = json.loads(out.read_text())
    assert set(results["perplexity"]) == {"128", "256"} and all(v > 1 for v in results["perplexity"].values())
    assert results["passkey"]["256"]["trials"] == 1 and "256" in results["passkey_h2o"]
