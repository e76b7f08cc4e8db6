"""H2O / A2SF KV-cache eviction (`lsts.inference.H2OCache`): the rule on hand-made scores, the
scores of a prefill against the materialized softmax, and generation with a tiny Llama (GQA) on
lsts attention against plain generation."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.inference import H2OCache, accumulated_attention, attach_h2o, detach_h2o, keep_indices
from lsts.kernels.attention import Span, attention
from lsts.models.hf import use_lsts_attention
from tests.hf_models import save_tiny_llama
from tests.oracle import rel_err

CTX = AttentionContext(backend="torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)


def _load(path, impl="sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


def _prompt(b=1, s=12):
    return torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(3))


GREEDY = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}


# --- the rule -------------------------------------------------------------------------------------


def test_keeps_the_recent_window_and_the_heaviest_of_the_rest_per_head():
    scores = torch.tensor(
        [
            [9.0, 1.0, 5.0, 7.0, 0.5, 0.1, 8.0, 0.2],  # head 0: heavy among [:5] are 9 (0) and 7 (3)
            [0.1, 6.0, 0.3, 0.2, 4.0, 9.0, 9.0, 9.0],  # head 1: heavy among [:5] are 6 (1) and 4 (4)
        ]
    )[None]
    assert keep_indices(scores, heavy=2, recent=3).tolist() == [[[0, 3, 5, 6, 7], [1, 4, 5, 6, 7]]]
    assert keep_indices(scores, heavy=0, recent=2).tolist() == [[[6, 7], [6, 7]]]
    assert keep_indices(scores, heavy=3, recent=0).tolist() == [[[0, 3, 6], [5, 6, 7]]]
    assert keep_indices(scores, heavy=6, recent=2).tolist() == [[list(range(8))] * 2]  # within budget


def _step(cache, n_heads=2):
    """One decoding step of one token with q = 0: the token attends uniformly to every kept key."""
    new = torch.randn(1, 1, 1, 4, dtype=torch.float64)  # [B, H_kv, 1, D]
    keys, _ = cache.update(new, new, 0)
    n = keys.shape[-2]
    q = torch.zeros(1, 1, n_heads, 4, dtype=torch.float64)
    cache.observe(0, q, keys.transpose(1, 2), torch.full((1, n_heads, 1), math.log(n), dtype=torch.float64), None)
    return cache.layers[0]


def test_a2sf_decays_older_attention_by_alpha():
    # Uniform attention: a step over n kept keys gives each 1/n per query head (2 heads share the
    # K/V head, hence the factor 2). Per head: step 0: s = [1]; step 1: s = [0.5 + 1/2, 1/2];
    # step 2: s = [0.5 + 1/3, 0.25 + 1/3, 1/3] = [5/6, 7/12, 1/3], over the budget of 2: keep the
    # recent position 2 and the heavier of positions 0 and 1.
    cache = H2OCache(heavy=1, recent=1, alpha=0.5)
    for _ in range(3):
        layer = _step(cache)
    assert layer.positions.tolist() == [[[0, 2]]]
    assert torch.allclose(layer.scores, 2 * torch.tensor([[[5 / 6, 1 / 3]]], dtype=torch.float64), rtol=1e-12, atol=0)
    layer = _step(cache)  # s0 = 0.5 * 5/6 + 1/3 = 3/4 (of 3 keys), s2 = 0.5 * 1/3 + 1/3 = 1/2, s3 = 1/3
    assert layer.positions.tolist() == [[[0, 3]]] and layer.keys.shape[-2] == 2
    assert torch.allclose(layer.scores, 2 * torch.tensor([[[3 / 4, 1 / 3]]], dtype=torch.float64), rtol=1e-12, atol=0)
    assert cache.get_seq_length() == 4


def test_h2o_sums_attention_without_decay():
    cache = H2OCache(heavy=8, recent=8, alpha=1.0)
    for _ in range(3):
        layer = _step(cache)
    want = 2 * torch.tensor([[[1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]]], dtype=torch.float64)
    assert torch.allclose(layer.scores, want, rtol=1e-12, atol=0) and layer.positions.tolist() == [[[0, 1, 2]]]


@pytest.mark.parametrize("sq, sk", [(37, 37), (5, 41), (1, 9)], ids=["prefill", "block-after-cache", "one-token"])
@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_prefill_scores_are_column_sums_of_the_softmax(sq, sk, alpha):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, sq, 6, 10, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, sk, 3, 10, generator=g, dtype=torch.float64) for _ in range(2))
    _, lse = attention(q, k, v, q_offset=sk - sq, backend="reference")
    # Explicit softmax [B, H, Sq, Sk] with the queries at the end of the keys.
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / math.sqrt(10)
    s = s.masked_fill(torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq), float("-inf"))
    p = s.softmax(-1) * alpha ** torch.arange(sq - 1, -1, -1, dtype=torch.float64)[:, None]
    want = p.sum(2).view(2, 3, 2, sk).sum(2)  # over queries, then over the query heads of each K/V head
    got = accumulated_attention(q, k, lse, alpha=alpha, chunk_elements=2 * 6 * sk * 4)  # chunks of 4 queries
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-12


def test_bad_budgets_are_errors():
    with pytest.raises(ValueError, match="budget"):
        H2OCache(heavy=0, recent=0)
    with pytest.raises(ValueError, match="alpha"):
        H2OCache(heavy=1, recent=1, alpha=1.5)


# --- generation -----------------------------------------------------------------------------------


def test_a_budget_above_the_length_equals_full_attention(checkpoint):
    ours = use_lsts_attention(_load(checkpoint), ctx=CTX)
    prompt = _prompt(2, 12)
    cache = attach_h2o(ours, H2OCache(heavy=10, recent=10))  # 20 >= 12 + 8
    got = ours.generate(prompt, max_new_tokens=8, cache=cache, **GREEDY)
    want = _load(checkpoint).generate(prompt, max_new_tokens=8, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got.logits, want.logits))
    assert cache.get_seq_length() == 19 and cache.layers[0].keys.shape[-2] == 19


def test_the_cache_never_exceeds_its_budget(checkpoint):
    model = use_lsts_attention(_load(checkpoint), ctx=CTX)
    heavy, recent = 4, 3
    cache = attach_h2o(model, H2OCache(heavy, recent, alpha=0.9))
    token, seen = _prompt(2, 12), 0
    with torch.no_grad():
        for _ in range(10):
            logits = model(token, cache=cache, use_cache=True).logits
            seen += token.shape[1]
            assert torch.isfinite(logits).all()
            for layer in cache.layers:
                assert layer.keys.shape == layer.values.shape == (2, 2, min(seen, heavy + recent), 16)
                assert layer.scores.shape == layer.positions.shape == (2, 2, min(seen, heavy + recent))
                # Per head: the recent window is the newest positions, in order, after the heavy ones.
                assert (layer.positions[..., -recent:] == torch.arange(seen - recent, seen)).all()
                assert (layer.positions.diff(dim=-1) > 0).all()
            assert cache.get_seq_length() == seen
            token = logits[:, -1:].argmax(-1)


def test_a_recent_window_only_equals_sliding_window_attention(checkpoint):
    # heavy = 0 keeps the last R tokens: token p then sees positions p-R..p, a window of R + 1 (the
    # prompt fits in the window, so its prefill is the same). Checks positions after eviction.
    recent, prompt = 5, _prompt(1, 6)
    h2o = use_lsts_attention(_load(checkpoint), ctx=CTX)
    cache = attach_h2o(h2o, H2OCache(heavy=0, recent=recent))
    got = h2o.generate(prompt, max_new_tokens=12, cache=cache, **GREEDY)
    window = use_lsts_attention(_load(checkpoint), span=Span("window", recent + 1), ctx=CTX)
    want = window.generate(prompt, max_new_tokens=12, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got.logits, want.logits))


def test_a_cache_the_model_does_not_report_to_is_an_error(checkpoint):
    model = use_lsts_attention(_load(checkpoint), ctx=CTX)
    with pytest.raises(ValueError, match="attach_h2o"):
        model.generate(_prompt(), max_new_tokens=3, do_sample=False, cache=H2OCache(2, 2))
    attach_h2o(model, H2OCache(2, 2))
    with pytest.raises(ValueError, match="detach_h2o"):
        model(_prompt())  # a forward without the attached cache
    detach_h2o(model)
    model(_prompt())


def test_a_padded_batch_is_an_error(checkpoint):
    model = use_lsts_attention(_load(checkpoint), ctx=CTX)
    cache = attach_h2o(model, H2OCache(4, 4))
    prompt = _prompt(2, 8)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded batch"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, cache=cache)


def test_attaching_needs_lsts_attention_with_causal_spans(checkpoint):
    with pytest.raises(ValueError, match="use_lsts_attention"):
        attach_h2o(_load(checkpoint), H2OCache(2, 2))
    with pytest.raises(ValueError, match="causal spans"):
        attach_h2o(use_lsts_attention(_load(checkpoint), span=Span("window", 4), ctx=CTX), H2OCache(2, 2))
