"""The Triton attention kernels (in Triton's interpreter on CPU, compiled on CUDA) against the
float64 reference with the span mask written out: out, lse, dq, dk, dv. Outputs are NaN-poisoned
by the launcher, so a tile the kernel skips by mistake fails here."""

import pytest
import torch

from lsts.kernels.attention import Span, attention
from lsts.kernels.backend import HAS_TRITON, triton_interpreting
from tests.oracle import rel_err
from tests.test_span_attention import oracle, run

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or triton_interpreting()),
    reason="needs triton with CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}

CASES = [  # (span, (sq, sk, q_offset, k_offset), (h, h_kv))
    pytest.param(Span("causal"), (63, 63, 0, 0), (2, 2), id="causal-63"),
    pytest.param(Span("full"), (33, 47, 0, 0), (2, 1), id="full-rect-mqa"),
    pytest.param(Span("causal"), (40, 50, 60, 10), (4, 2), id="causal-offsets-gqa"),
    pytest.param(Span("window", 7), (63, 63, 0, 0), (2, 1), id="window7"),
    pytest.param(Span("block", 16), (63, 63, 0, 0), (2, 2), id="block16"),
    pytest.param(Span("s2", 12), (63, 63, 0, 0), (4, 2), id="s2-gqa"),
    pytest.param(Span("sf", 12, 4), (63, 63, 0, 0), (6, 1), id="sf-sinks-mqa"),
    pytest.param(Span("sf", 20, 4), (37, 37, 40, 0), (2, 2), id="sf-next-chunk"),
    pytest.param(Span("s2", 12, shift_from=1), (63, 63, 0, 0), (4, 2), id="s2-head-slice"),  # a Ulysses shard
    pytest.param(Span("window", 4), (16, 16, 100, 0), (2, 2), id="no-key-visible"),
]


# 40 pads to a 64-wide feature tile (masked features); 32 fills its tile, which whole key blocks load unmasked.
@pytest.mark.parametrize("head_dim", [40, 32], ids=["d40", "d32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("span,geometry,heads", CASES)
def test_triton_matches_reference(span, geometry, heads, dtype, head_dim):
    sq, sk, q_offset, k_offset = geometry
    h, hkv = heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, sq, h, head_dim, generator=g)
    k, v = (torch.randn(1, sk, hkv, head_dim, generator=g) for _ in range(2))
    dout = torch.randn(1, sq, h, head_dim, generator=g)
    want = oracle(q, k, v, dout, span, q_offset, k_offset)
    got = run("triton", *(x.to(DEVICE, dtype) for x in (q, k, v, dout)), span, q_offset, k_offset)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a = a.cpu()
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert not a.isnan().any(), f"{name}: unwritten (NaN) entries"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: rows without keys differ"
        if finite.any():
            assert rel_err(a[finite], b[finite]) <= TOL[dtype], f"{name}: {rel_err(a[finite], b[finite]):.2e}"


def skip_tile(backend: str) -> int:
    """The granularity each backend skips at: Triton's key tile (the forward's), the CPU twin's query chunk."""
    if backend == "torch":
        return 256
    from lsts.kernels.attention.triton import launch_config  # imports triton

    return launch_config("fwd", 16, torch.float32, torch.device(DEVICE))["BLOCK_N"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("span", [Span("window", 16), Span("block", 16), Span("sf", 32, 4)], ids=lambda s: s.kind)
def test_unreachable_key_blocks_are_never_read(span, backend):
    """NaN in K/V blocks that the last queries' span cannot reach: had the kernel visited them,
    P·V (0 · NaN) would turn those output rows into NaN. Work is then proportional to the span."""
    tile = skip_tile(backend)
    n = 4 * tile
    q, k, v = (torch.randn(1, n, 1, 16) for _ in range(3))
    lo = span.key_range(n - tile, n - 1, span.shift(0, 1))[0] // tile * tile  # one head: shifted if s2/sf
    assert lo > tile, "the test must leave unreachable blocks to poison"
    for x in (k, v):
        x[:, tile:lo] = float("nan")  # block 0 (which holds the sinks) stays readable
    out, _ = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), span=span, backend=backend)
    assert torch.isfinite(out[:, n - tile :].cpu()).all()


def test_ring_with_triton_backend_equals_reference():
    from tests.distributed import run_ranks

    errors = run_ranks(_ring_triton, 2)[0]
    assert all(e <= 2e-5 for e in errors), errors


def _ring_triton(rank, world):
    from lsts.parallel import gather_sequence, ring_attention, shard_sequence
    from tests.oracle import full_attention

    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 64, 2, 24, generator=g) for _ in range(4))
    local = [shard_sequence(x, layout="zigzag").requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*local, layout="zigzag", return_lse=True, backend="triton")
    out.backward(shard_sequence(dout, layout="zigzag"))
    got = [gather_sequence(x.detach(), layout="zigzag") for x in (out, *(t.grad for t in local))]
    got.insert(1, gather_sequence(lse.transpose(1, 2).contiguous(), layout="zigzag").transpose(1, 2))
    return [rel_err(a, b) for a, b in zip(got, full_attention(q, k, v, dout, causal=True))]


def test_unknown_span_in_attention_call():
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown attention span"):
        attention(x, x, x, span=Span("ring"))


def test_unrounded_results_are_the_kernels_float32_accumulators():
    """``unrounded=True`` (ring steps, halo blocks) stores the float32 accumulators the kernels
    otherwise round: rounding them gives exactly the default results."""
    from lsts.kernels.attention import attention_bwd, attention_fwd

    g = torch.Generator().manual_seed(9)
    q, dout = (torch.randn(1, 24, 4, 16, generator=g).half().to(DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 24, 2, 16, generator=g).half().to(DEVICE) for _ in range(2))
    args = (0.25, Span("causal"), "triton", 8, 0)  # scale, span, backend, q_offset, k_offset
    out, lse = attention_fwd(q, k, v, *args)
    out32, lse32 = attention_fwd(q, k, v, *args, unrounded=True)
    assert out32.dtype == torch.float32 and torch.equal(out32.half(), out) and torch.equal(lse32, lse)
    grads = attention_bwd(dout, q, k, v, out, lse, *args)
    grads32 = attention_bwd(dout, q, k, v, out, lse, *args, unrounded=True)
    for g16, g32 in zip(grads, grads32):
        assert g32.dtype == torch.float32 and torch.equal(g32.half(), g16)


def test_head_dims_without_cuda_tiles_are_refused():
    from lsts.kernels.attention.triton import launch_config

    cuda = torch.device("cuda")  # refused before any CUDA call: no GPU needed
    with pytest.raises(ValueError, match=r"head dim 512 in torch\.bfloat16 does not fit"):
        launch_config("fwd", 512, torch.bfloat16, cuda)
    with pytest.raises(ValueError, match=r"head dim 256 in torch\.float32 does not fit"):
        launch_config("dkv", 256, torch.float32, cuda)
    assert launch_config("fwd", 512, torch.float32, torch.device("cpu"))["BLOCK_D"] == 512  # the interpreter
