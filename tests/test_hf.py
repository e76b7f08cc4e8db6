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


# --- generation, mixed precision and registration, on the architectures that need them -------------


NO_SDPA = {"gemma2", "gpt_oss"}  # transformers runs these on eager (or flash) only


def _pair(arch):
    import copy

    from tests.hf_models import tiny_causal_lm

    ref = tiny_causal_lm(arch, attn_implementation="eager" if arch in NO_SDPA else "sdpa")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("lsts")
    return ref, ours


GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3_text", "gemma2", "gpt_oss"])
def test_left_padded_batched_generation_equals_sdpa(arch):
    ref, ours = _pair(arch)
    prompts = _tokens(2, 14) + 1
    mask = torch.ones_like(prompts)
    mask[1, :6] = 0  # left padding
    kw = {**GREEDY, "max_new_tokens": 12, "attention_mask": mask}
    assert torch.equal(ours.generate(prompts, **kw), ref.generate(prompts, **kw))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_static_cache_generation_equals_sdpa(arch):
    ref, ours = _pair(arch)
    prompts = _tokens(2, 10) + 1
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    kw = {**GREEDY, "max_new_tokens": 8, "attention_mask": mask, "cache_implementation": "static"}
    assert torch.equal(ours.generate(prompts, **kw), ref.generate(prompts, **kw))


def test_sliding_window_generation_runs_past_the_window_like_sdpa():
    ref, ours = _pair("mistral")  # window of 8: the cache slides from the 9th token on
    prompt = _tokens(1, 12) + 1
    kw = {**GREEDY, "max_new_tokens": 16}
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_autocast_and_bf16_weights_behave_as_sdpa(arch):
    ref, ours = _pair(arch)
    tokens = _tokens(2, 24) + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(tokens, labels=tokens), ref(tokens, labels=tokens)
    assert got.logits.dtype == want.logits.dtype
    assert torch.isfinite(got.loss) and abs(got.loss.item() - want.loss.item()) < 2e-2 * want.loss.item()
    got.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    assert rel_err(ours(tokens).logits, ref(tokens).logits) < 2e-2


def test_from_pretrained_takes_lsts_after_importing_lsts(checkpoint):
    import subprocess
    import sys

    code = (
        "import torch, lsts.models.hf\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, attn_implementation='lsts')\n"
        "assert m.config._attn_implementation == 'lsts'\n"
        "m(torch.arange(1, 9)[None])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_user_spans_compose_with_the_models_own():
    from lsts.models.hf.attention import compose_spans

    window = Span("window", 64)
    assert compose_spans(window, None) == window
    assert compose_spans(window, Span("s2", 32)) == Span("s2", 32)  # groups inside the window
    assert compose_spans(window, Span("window", 16)) == Span("window", 16)
    with pytest.raises(ValueError, match="does not fit the model's sliding window"):
        compose_spans(window, Span("s2", 128))
    with pytest.raises(ValueError, match="does not fit"):
        compose_spans(window, Span("sf", 32, n_sink=4))  # sinks outside the window
    with pytest.raises(ValueError, match="future tokens"):
        compose_spans(Span("causal"), Span("full"))


def test_an_attention_argument_lsts_lacks_is_an_error(checkpoint):
    from lsts.models.hf.attention import lsts_attention_forward

    model = _load(checkpoint, "lsts")
    q = torch.zeros(1, 4, 3, 16)
    kv = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="'position_bias'"):
        lsts_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, position_bias=torch.zeros(1))
