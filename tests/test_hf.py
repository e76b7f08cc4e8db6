"""A small Llama-family checkpoint (GQA; built here with save_pretrained, nothing downloaded) on lsts
attention through transformers' AttentionInterface, against the same model on ``sdpa``."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.kernels.attention import Span
from lsts.models.hf import use_lsts_attention
from tests.distributed import run_ranks
from tests.hf_models import save_tiny_llama
from tests.oracle import rel_err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)


def _load(path, impl="sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


def _tokens(b=2, s=40):
    return torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(1))


def test_lsts_attention_equals_sdpa_logits_and_gradients(checkpoint):
    ref, ours = _load(checkpoint), use_lsts_attention(_load(checkpoint), ctx=AttentionContext(backend="torch"))
    tokens = _tokens()
    out_ref, out = ref(tokens, labels=tokens), ours(tokens, labels=tokens)
    assert rel_err(out.logits, out_ref.logits) < 1e-5
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_padded_batch_keeps_each_rows_mask(checkpoint):
    ref, ours = _load(checkpoint), use_lsts_attention(_load(checkpoint), ctx=AttentionContext(backend="torch"))
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[0, :7] = 0  # left padding on row 0
    mask[1, -5:] = 0  # right padding on row 1
    got, want = ours(tokens, attention_mask=mask).logits, ref(tokens, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got[keep], want[keep]) < 1e-5


def test_generation_with_a_cache_equals_sdpa(checkpoint):
    ref, ours = _load(checkpoint), use_lsts_attention(_load(checkpoint), ctx=AttentionContext(backend="torch"))
    prompt = _tokens(1, 12)
    kw = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_window_span_matches_sdpa_with_the_window_written_out(checkpoint):
    ours = use_lsts_attention(_load(checkpoint), span=Span("window", 8), ctx=AttentionContext(backend="torch"))
    ref = _load(checkpoint, "eager")
    tokens = _tokens(1, 30)
    i = torch.arange(30)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)
    mask = torch.zeros(1, 1, 30, 30).masked_fill(~allowed, float("-inf"))
    assert rel_err(ours(tokens).logits, ref(tokens, attention_mask=mask).logits) < 1e-5


def test_a_model_without_the_interface_is_a_clear_error():
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Plain does not dispatch"):
        use_lsts_attention(Plain())


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_sequence_parallel_equals_one_process(checkpoint, mode):
    want = _load(checkpoint)(_tokens(1, 48)).logits
    got = run_ranks(_sharded_logits, 2, str(checkpoint), mode)
    assert all(rel_err(torch.from_numpy(g), want) < 1e-5 for g in got)


def _sharded_logits(rank, world, path, mode):
    import torch.distributed as dist

    from lsts.parallel import gather_sequence, sequence_positions, shard_sequence

    group = dist.group.WORLD
    ctx = AttentionContext(mode, "torch", "zigzag", ring_group=group, ulysses_group=group)
    model = use_lsts_attention(_load(path), ctx=ctx)
    tokens = _tokens(1, 48)
    positions = sequence_positions(48, layout="zigzag")[None]
    logits = model(shard_sequence(tokens, layout="zigzag"), position_ids=positions).logits
    return gather_sequence(logits.detach(), layout="zigzag").numpy()
