"""MASFormer against a plain decoder written out here (explicit softmax attention with its mask
built by hand, HF-style rotate-half RoPE, RMSNorm, SwiGLU), in float64 to 1e-10: hidden states and
the gradient of every parameter. Then: the span layout of the presets, position ids (RoPE is
relative; positions must matter), sequence parallelism (ring and Ulysses on 2 gloo ranks equal the
single process), the output projection, pipeline stages, init, parameter and FLOP counts, bad configs.

The configs use head_dim 8 and rope_base 256 (scaling 2): every inverse frequency is then a power of
two, so the float32 angles of `lsts.kernels.rope` are exact and a float64 oracle can match to 1e-10
(the rounding of general bases is `tests/test_rope.py`'s business, against transformers)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lsts.attention import AttentionContext
from lsts.config import KernelsConfig, ModelConfig
from lsts.kernels.attention import Span
from lsts.kernels.loss import linear_cross_entropy
from lsts.kernels.rope import rope_frequencies
from lsts.models import MASFormer
from lsts.parallel import gather_sequence, sequence_positions, shard_sequence
from tests.distributed import run_ranks
from tests.oracle import rel_err

TOL = 1e-10
BATCH, SEQ = 2, 19  # an odd length: no block or window size divides it


def _config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=48, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, rope_base=256.0,
        rope_scaling=2.0, norm_eps=1e-6, tie_embeddings=False, full_layers="all", init_std=0.2,
    )  # fmt: skip
    return ModelConfig(**{**base, **overrides})


def _model(cfg: ModelConfig, backend: str = "reference", seed: int = 0) -> MASFormer:
    """A float64 model whose norm weights are random too, so that swapping two norms would show."""
    model = MASFormer(cfg, KernelsConfig(norm=backend, rope=backend)).double()
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _tokens(cfg: ModelConfig, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


# --- the oracle: a plain decoder, written out -----------------------------------------------------


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float, scaling: float) -> torch.Tensor:
    """HF Llama's convention: ``x cos + rotate_half(x) sin`` with dim i paired with i + D/2."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D) / scaling
    assert torch.equal(inv_freq, rope_frequencies(D, base).double() / scaling), "premise: exact frequencies"
    angles = positions.double()[..., None] * inv_freq  # [S, D/2] or [B, S, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    angles = angles[None, :, None, :] if positions.dim() == 1 else angles[:, :, None, :]
    rotated = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def _keep(kind: str, size: int, seq: int) -> torch.Tensor:
    """[S, S] True where query i may see key j."""
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    keep = j <= i
    if kind == "window":
        keep = keep & (i - j < size)
    if kind == "block":
        keep = keep & (i // size == j // size)
    return keep


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _plain_decoder(p: dict, cfg: ModelConfig, tokens, positions, spans: list[tuple[str, int]]) -> torch.Tensor:
    """``p``: parameter name -> tensor; ``spans`` as written by the test, not read from the model."""
    B, S = tokens.shape
    hd, group = cfg.dim // cfg.n_heads, cfg.n_heads // cfg.n_kv_heads
    h = p["tok_embeddings.weight"][tokens]
    for i, (kind, size) in enumerate(spans):
        w = lambda name, i=i: p[f"layers.{i}.{name}.weight"]  # noqa: E731
        x = _rms(h, w("attention_norm"), cfg.norm_eps)
        q = _rope((x @ w("attention.wq").T).view(B, S, cfg.n_heads, hd), positions, cfg.rope_base, cfg.rope_scaling)
        k = _rope((x @ w("attention.wk").T).view(B, S, -1, hd), positions, cfg.rope_base, cfg.rope_scaling)
        v = (x @ w("attention.wv").T).view(B, S, -1, hd)
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # query head h uses h // group
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~_keep(kind, size, S), float("-inf")).softmax(-1)
        h = h + torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, S, -1) @ w("attention.wo").T
        x = _rms(h, w("ffn_norm"), cfg.norm_eps)
        h = h + (F.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
    return _rms(h, p["norm.weight"], cfg.norm_eps)


def _compare_with_plain(cfg: ModelConfig, spans, backend: str, positions: torch.Tensor) -> dict[str, float]:
    """Relative errors of the hidden states and of each parameter's gradient."""
    model = _model(cfg, backend)
    tokens = _tokens(cfg)
    probe = torch.randn(BATCH, SEQ, cfg.vocab_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = dict(model.named_parameters())
    got = model(tokens, positions, AttentionContext(backend=backend))
    want = _plain_decoder(params, cfg, tokens, positions, spans)
    # A random linear function of the logits: every parameter, the output projection too, gets a gradient.
    got_grads = torch.autograd.grad((model.logits(got) * probe).sum(), list(params.values()))
    want_grads = torch.autograd.grad((want @ params["output.weight"].T * probe).sum(), list(params.values()))
    errors = {"hidden": rel_err(got, want)}
    errors |= {name: rel_err(a, b) for name, a, b in zip(params, got_grads, want_grads)}
    return errors


def _assert_small(errors: dict[str, float], tol: float = TOL) -> None:
    bad = [f"{name}: {err:.2e}" for name, err in errors.items() if not err <= tol]
    assert not bad, f"above {tol:.0e}: " + ", ".join(bad)


# --- equality with the plain decoder --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_full_layers_equal_the_plain_decoder(backend):
    cfg = _config(full_layers="all")
    errors = _compare_with_plain(cfg, [("causal", 0)] * 3, backend, torch.arange(SEQ))
    assert len(errors) == 1 + 3 + 3 * 9  # hidden, embedding + final norm + output, 9 tensors per block
    _assert_small(errors)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "span, size, preset, spans",
    [
        ("window", 5, "top", [("window", 5), ("window", 5), ("causal", 0)]),
        ("block", 4, "bottom", [("causal", 0), ("block", 4), ("block", 4)]),
        ("window", 2, "interleave", [("window", 2), ("window", 2), ("causal", 0)]),  # itself and one before
    ],
    ids=["window5-top", "block4-bottom", "window2-interleave"],
)
def test_sparse_layers_equal_the_plain_decoder_with_their_mask(backend, span, size, preset, spans):
    cfg = _config(full_layers=preset, n_full=1, span=span, span_size=size)
    _assert_small(_compare_with_plain(cfg, spans, backend, torch.arange(SEQ)))


def test_batch_positions_equal_the_plain_decoder():
    """``positions [B, S]``: each row of the batch at its own offsets."""
    cfg = _config(full_layers="top", n_full=1, span="window", span_size=4)
    positions = torch.stack((torch.arange(SEQ), torch.arange(SEQ) * 3 + 11))
    _assert_small(_compare_with_plain(cfg, [("window", 4), ("window", 4), ("causal", 0)], "torch", positions))


# --- layout of the spans --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, full",
    [("all", list(range(8))), ("bottom", [0, 1]), ("top", [6, 7]), ("interleave", [3, 7])],
)
def test_layer_spans_follow_the_preset(preset, full):
    cfg = _config(dim=16, n_layers=8, full_layers=preset, n_full=2, span="block", span_size=16)
    assert cfg.full_layer_ids() == full
    model = MASFormer(cfg)
    assert list(model.layers) == [str(i) for i in range(8)]
    spans = {int(i): block.span for i, block in model.layers.items()}
    assert [i for i, s in spans.items() if s == Span("causal")] == full
    assert all(s == Span("block", 16) for i, s in spans.items() if i not in full)


# --- positions ------------------------------------------------------------------------------------


def test_a_global_shift_of_positions_changes_nothing_but_other_positions_do():
    """RoPE scores depend on ``i - j`` only: a shift by P is exact in float64. A non-uniform change
    of the ids must change the output, or the first check would pass for a model that ignores them."""
    cfg = _config(full_layers="top", n_full=1, span="window", span_size=6)
    model, tokens = _model(cfg, "torch"), _tokens(cfg)
    with torch.no_grad():
        base = model(tokens, torch.arange(SEQ))
        assert rel_err(model(tokens, torch.arange(SEQ) + 1000), base) <= TOL
        assert rel_err(model(tokens, (torch.arange(SEQ) + 37).expand(BATCH, SEQ)), base) <= TOL
        assert rel_err(model(tokens, torch.arange(SEQ) * 2), base) > 1e-3


def test_a_chunk_with_its_global_positions_equals_the_rows_of_the_whole_sequence():
    """Causality: a prefix alone equals the prefix of the whole. Blocks: a block-aligned chunk with its
    global positions equals its rows, since no block layer looks outside its own block."""
    with torch.no_grad():
        full = _config(full_layers="all")
        model, tokens = _model(full, "torch"), _tokens(full)
        assert rel_err(model(tokens[:, :7], torch.arange(7)), model(tokens, torch.arange(SEQ))[:, :7]) <= TOL

        blocks = _config(full_layers="bottom", n_full=0, span="block", span_size=4)
        model = _model(blocks, "torch")
        whole = model(tokens, torch.arange(SEQ))
        assert rel_err(model(tokens[:, 8:16], torch.arange(8, 16)), whole[:, 8:16]) <= TOL


# --- sequence parallelism -------------------------------------------------------------------------


def _loss_and_grads(model: MASFormer, tokens, labels, positions, ctx):
    """Summed next-token loss through the chunked linear cross-entropy, as the trainer computes it."""
    hidden = model(tokens, positions, ctx)
    loss, _ = linear_cross_entropy(hidden, model.output_weight, labels, reduction="sum", chunk_size=7, backend="torch")
    return hidden.detach(), torch.autograd.grad(loss, list(model.parameters()))


def _sequence_parallel_worker(rank, world):
    """On each rank: the whole sequence locally, then its zigzag shard under ring and under Ulysses."""
    seq, errors = 2 * world * 5, {}  # zigzag chunks of 5 tokens: the spans below reach across them
    for span, size in (("window", 7), ("block", 3)):
        cfg = _config(full_layers="bottom", n_full=1, span=span, span_size=size, tie_embeddings=True)
        model = _model(cfg, "torch")
        names = [name for name, _ in model.named_parameters()]
        tokens, labels = _tokens(cfg, seq, seed=1), _tokens(cfg, seq, seed=2)
        want_hidden, want_grads = _loss_and_grads(model, tokens, labels, torch.arange(seq), AttentionContext())
        for mode in ("ring", "ulysses"):
            # Explicit groups, as the parallelize pass passes the mesh's cp axis.
            group = {"ring_group" if mode == "ring" else "ulysses_group": dist.group.WORLD}
            ctx = AttentionContext(mode=mode, backend="torch", layout="zigzag", **group)
            positions = sequence_positions(seq, layout="zigzag")
            shard = lambda x: shard_sequence(x, layout="zigzag")  # noqa: E731
            hidden, grads = _loss_and_grads(model, shard(tokens), shard(labels), positions, ctx)
            for g in grads:
                dist.all_reduce(g)  # each rank holds the gradient of its tokens' share of the loss
            errors[f"{span}-{mode}-hidden"] = rel_err(gather_sequence(hidden, layout="zigzag"), want_hidden)
            errors |= {f"{span}-{mode}-grad-{n}": rel_err(a, b) for n, a, b in zip(names, grads, want_grads)}
    errors["dtensor-init"] = _dtensor_init_error(world)
    return errors


def _dtensor_init_error(world) -> float:
    """`init_weights` gives a sharded parameter its shard of the very tensor an unsharded model gets."""
    cfg = _config(full_layers="top", n_full=1, span="window", span_size=4)
    plain, sharded = MASFormer(cfg), MASFormer(cfg)
    mesh = init_device_mesh("cpu", (world,))
    attn = sharded.layers["1"].attention
    for module, dim in ((attn.wq, 0), (attn.wo, 1), (sharded.tok_embeddings, 0)):
        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(dim)]))
    plain.init_weights(seed=3)
    sharded.init_weights(seed=3)
    want = plain.layers["1"].attention
    pairs = ((attn.wq, want.wq), (attn.wo, want.wo), (sharded.tok_embeddings, plain.tok_embeddings))
    return max(rel_err(got.weight.full_tensor(), ref.weight) for got, ref in pairs)


def test_ring_and_ulysses_equal_the_single_process_model():
    """The key property: a zigzag-sharded model with global positions computes the same hidden states
    and, summed over ranks, the same parameter gradients as one process on the whole sequence."""
    for errors in run_ranks(_sequence_parallel_worker, 2):
        assert len(errors) == 2 * 2 * (1 + 2 + 3 * 9) + 1  # spans × modes × (hidden + params) + init
        _assert_small(errors)


# --- output projection, pipeline stages, init, counts ---------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_output_weight_logits_and_chunked_loss(tied):
    cfg = _config(tie_embeddings=tied, full_layers="top", n_full=1, span="window", span_size=3)
    model = _model(cfg)
    assert (model.output is None) == tied
    assert model.output_weight is (model.tok_embeddings.weight if tied else model.output.weight)
    assert model.output_weight.shape == (cfg.vocab_size, cfg.dim)
    tokens = _tokens(cfg)
    hidden = model(tokens, torch.arange(SEQ))
    logits = model.logits(hidden)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size)
    loss, _ = linear_cross_entropy(hidden, model.output_weight, tokens, reduction="sum", backend="torch")
    want = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens.reshape(-1), reduction="sum")
    assert rel_err(loss, want) <= TOL


def test_pipeline_stages_compose_to_the_whole_model():
    """Stages delete layers and set tok_embeddings / norm to None; names and weights stay put."""
    cfg = _config(n_layers=4, full_layers="top", n_full=1, span="block", span_size=4)
    whole, first, last = _model(cfg), _model(cfg), _model(cfg)
    for i in ("2", "3"):
        del first.layers[i]
    for i in ("0", "1"):
        del last.layers[i]
    first.norm, last.tok_embeddings = None, None
    assert next(n for n, _ in last.named_parameters()) == "layers.2.attention.wq.weight"
    tokens, positions = _tokens(cfg), torch.arange(SEQ)
    with torch.no_grad():
        assert rel_err(last(first(tokens, positions), positions), whole(tokens, positions)) <= TOL
    tied = MASFormer(_config(tie_embeddings=True))
    tied.tok_embeddings = None
    with pytest.raises(ValueError, match="tok_embeddings"):
        _ = tied.output_weight


def test_init_is_deterministic_by_seed_and_scales_the_residual_projections():
    cfg = _config(dim=64, n_layers=4, n_heads=4, ffn_dim=256, init_std=0.02)
    a, b, c = MASFormer(cfg), MASFormer(cfg), MASFormer(cfg)
    a.init_weights(seed=7)
    b.init_weights(seed=7)
    c.init_weights(seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert name.endswith("norm.weight") or not torch.equal(pa, pc), name
    block = a.layers["0"]
    assert torch.equal(block.attention_norm.weight, torch.ones(64))
    assert not torch.equal(block.attention.wq.weight, block.attention.wk.weight[:64])  # one stream per tensor
    scale = 1 / math.sqrt(2 * cfg.n_layers)
    attn, ffn = block.attention, block.feed_forward
    for linear, std in ((attn.wq, 0.02), (attn.wo, 0.02 * scale), (ffn.w1, 0.02), (ffn.w2, 0.02 * scale)):
        assert abs(linear.weight.std().item() / std - 1) < 0.1


def test_num_params_and_flops_per_token():
    cfg = _config(vocab_size=50, dim=24, n_layers=24, n_heads=4, n_kv_heads=2, ffn_dim=40)
    hd = 6
    per_block = 24 * 4 * hd + 2 * 24 * 2 * hd + 4 * hd * 24 + 3 * 24 * 40 + 2 * 24
    for tied in (True, False):
        model = MASFormer(replace(cfg, tie_embeddings=tied))
        n = 24 * per_block + 24 + 50 * 24 * (1 if tied else 2)
        assert model.num_params() == n
        assert model.num_params(exclude_embedding=True) == n - (0 if tied else 50 * 24)
    # docs/algorithms.md §5: the attention cost of l full layers among L, the others blocks of b, is
    # (l·n + (L-l)·b) / (L·n) of an all-full model; 6N is the same for both.
    n_tok, b = 8192, 1024
    full = MASFormer(replace(cfg, full_layers="all"))
    mas = MASFormer(replace(cfg, full_layers="top", n_full=4, span="block", span_size=b))
    six_n = 6 * full.num_params(exclude_embedding=True)
    assert full.flops_per_token(n_tok) == six_n + 12 * 24 * 24 * n_tok
    ratio = (mas.flops_per_token(n_tok) - six_n) / (full.flops_per_token(n_tok) - six_n)
    assert ratio == pytest.approx((4 * n_tok + 20 * b) / (24 * n_tok), rel=1e-12)
    window = MASFormer(replace(cfg, full_layers="bottom", n_full=0, span_size=64))
    assert window.flops_per_token(32) == six_n + 12 * 24 * 24 * 32  # a window longer than the sequence


# --- bad configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
        ({"dim": 30, "n_heads": 4}, r"dim \(30\) must be n_heads \(4\) × an even head dim"),
        ({"dim": 12, "n_heads": 4}, r"even head dim"),  # head_dim 3: RoPE needs pairs
        ({"full_layers": "top", "n_full": 4}, r"n_full \(4\)"),
        ({"n_kv_heads": 0}, r"n_kv_heads \(0\) must be >= 1"),
        ({"full_layers": "top", "span_size": 0}, r"span_size must be >= 1 for the window layers"),
    ],
    ids=["kv-heads-do-not-divide", "dim-not-divisible", "odd-head-dim", "too-many-full", "zero-kv", "zero-window"],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        MASFormer(_config(**overrides))
