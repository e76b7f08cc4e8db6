"""SPT (``docs/algorithms.md`` §8): product quantizer, top-L key selection, sparse MHA, routed FFN — each
backend against a float64 oracle — and the model pass on a local tiny Llama."""

import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.finetune.spt import RoutedMLP, SPTConfig, aux_loss, prepare_spt, set_stage
from lsts.kernels.spt import (
    ProductQuantizer,
    budget_for,
    dense_mask,
    route,
    routed_ffn,
    routed_ffn_reference,
    select_keys,
    select_keys_reference,
    sparse_attention,
    sparse_attention_reference,
)
from tests.hf_models import save_tiny_llama
from tests.oracle import full_attention, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3}
BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]
BACKEND_IDS = [f"{b}-{str(d)[6:]}" for b, d in BACKENDS]


def _qkv(n, h, h_kv, d, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, h, d, generator=g, dtype=torch.float64) * spread
    k, v = (torch.randn(1, n, h_kv, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(1, n, h, d, generator=g, dtype=torch.float64)


def _codes(q, k, seed=0):
    torch.manual_seed(seed)
    pq = ProductQuantizer(q.shape[-1])
    pq.initialize(torch.cat([q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])]))
    return pq.encode(q), pq.encode(k)


def _run(backend, dtype, q, k, v, dout, idx, **kw):
    xs = [x.detach().to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    out, lse = sparse_attention(*xs, idx.to(DEVICE), backend=backend, **kw)
    out.backward(dout.to(DEVICE, dtype))
    return [out.detach().cpu(), lse.cpu()] + [x.grad.cpu() for x in xs]


def _assert_close(got, want, dtype, names=("out", "lse", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert not a.isnan().any(), f"{name}: unwritten (NaN) entries"
        assert rel_err(a, b) <= TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


# ---------------------------------------------------------------------------------- quantizer


def test_decode_of_encode_is_the_nearest_codeword():
    torch.manual_seed(0)
    pq = ProductQuantizer(24)  # 3 sub-spaces of 8 dims, 16 codewords each
    z = torch.randn(5, 7, 24)
    dist = (z.view(35, 3, 1, 8) - pq.codebooks.detach()[None]).abs().sum(-1)  # [35, 3, 16] L1
    nearest = pq.codebooks.detach()[torch.arange(3), dist.argmin(-1)].reshape(5, 7, 24)
    codes = pq.encode(z)
    assert codes.shape == (5, 7, 3) and codes.dtype == torch.uint8
    assert torch.equal(pq.decode(codes), nearest)


def test_codebook_loss_moves_codebooks_only_and_decreases():
    torch.manual_seed(0)
    pq = ProductQuantizer(16)
    z = torch.randn(512, 16, requires_grad=True)
    opt = torch.optim.SGD(pq.parameters(), lr=0.5)
    first = pq.codebook_loss(z)
    assert bool(pq.initialized), "the first loss initializes the codebooks from the data"
    for _ in range(20):
        opt.zero_grad()
        loss = pq.codebook_loss(z)
        loss.backward()
        opt.step()
    assert z.grad is None
    assert pq.codebook_loss(z).item() < first.item()


# ---------------------------------------------------------------------------------- selection

GEOMETRIES = [
    pytest.param(37, 4, 2, 16, 5, id="N37-gqa-d16-L5"),
    pytest.param(37, 4, 2, 24, 1, id="N37-gqa-d24-L1"),
    pytest.param(50, 2, 2, 16, 64, id="N50-L-over-N"),
    pytest.param(70, 4, 1, 24, 9, id="N70-mqa-d24-L9"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,h,h_kv,d,budget", GEOMETRIES)
def test_selection_is_the_exact_collision_top_l(n, h, h_kv, d, budget, backend):
    q, k, _, _ = _qkv(n, h, h_kv, d)
    qc, kc = _codes(q, k)
    want = select_keys_reference(qc, kc, budget)
    got = select_keys(qc.to(DEVICE), kc.to(DEVICE), budget, backend=backend).cpu()
    assert got.dtype == torch.int32 and got.shape == (1, h, n, budget)
    # Same key set per query; slot order is the backend's (empty slots always last).
    assert torch.equal(got.sort(-1, descending=True).values, want)
    assert torch.equal(got < 0, want < 0)


def test_selection_recall_against_brute_force_scores():
    """Recall of the selection against the top-L of a brute-force [N, N] collision count (ties
    excluded from the count: any key scoring as high as the L-th best is a valid pick)."""
    n, budget = 256, budget_for(256)
    q, k, _, _ = _qkv(n, 4, 2, 32, seed=3)
    qc, kc = _codes(q, k, seed=3)
    idx = select_keys(qc, kc, budget, backend="torch")
    score = (qc.transpose(1, 2)[..., None, :] == kc.repeat_interleave(2, 2).transpose(1, 2)[..., None, :, :]).sum(-1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    score = score.masked_fill(~causal, -1)
    kth = score.topk(budget, dim=-1).values[..., -1:]  # the L-th best score per query
    picked = score.gather(-1, idx.clamp(min=0).long()).masked_fill(idx < 0, -2)
    valid = (picked >= kth) | ((idx < 0) & (causal.sum(-1)[:, None] < budget))
    assert valid.float().mean().item() >= 0.8
    assert valid.all(), "the selection is exact"


def test_empty_slots_are_masked_not_key_zero():
    q, k, v, _ = _qkv(8, 1, 1, 16)
    idx = select_keys(*_codes(q, k), 4, backend="torch")
    assert (idx[0, 0, 0] == torch.tensor([0, -1, -1, -1], dtype=torch.int32)).all()
    assert sorted(idx[0, 0, 1].tolist()) == [-1, -1, 0, 1]
    out, _ = sparse_attention(q, k, v, idx, backend="torch")
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0])  # query 0 sees key 0 once, nothing else


# ----------------------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("n,h,h_kv,d", [(37, 4, 2, 16), (29, 2, 2, 24)], ids=["N37-gqa-d16", "N29-d24"])
def test_budget_at_least_n_equals_dense_causal(n, h, h_kv, d, backend, dtype):
    q, k, v, dout = _qkv(n, h, h_kv, d)
    idx = select_keys(*_codes(q, k), n + 3, backend="torch")
    got = _run(backend, dtype, q, k, v, dout, idx)
    out, lse, dq, dk, dv = full_attention(q, k, v, dout, causal=True)
    _assert_close(got, [out, lse, dq, dk, dv], dtype)


@pytest.mark.parametrize("path", ["sampled", "gather"])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("spread", [1.0, 8.0], ids=["in-range", "clamped"])
def test_sparse_attention_equals_masked_reference(backend, dtype, spread, path, monkeypatch):
    if path == "gather":
        if backend != "torch":
            pytest.skip("the gather path is the CPU twin's")
        # the package re-exports a function of the module's name: reach the module itself
        monkeypatch.setattr(sys.modules["lsts.kernels.spt.sparse_attention"], "_SAMPLED_DENSITY", 0)
    n, h, h_kv, d = 37, 4, 2, 16
    q, k, v, dout = _qkv(n, h, h_kv, d, spread=spread)
    idx = select_keys(*_codes(q, k), 5, backend="torch")
    got = _run(backend, dtype, q, k, v, dout, idx)
    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = sparse_attention_reference(qq, kk, vv, idx)
    out.backward(dout)
    if spread > 1:
        assert (torch.einsum("bnhd,bmhd->bhnm", q, k.repeat_interleave(2, 2)).abs() / 4 > 10).any()
    _assert_close(got, [out.detach(), lse, qq.grad, kk.grad, vv.grad], dtype)


def test_saved_state_is_order_n_times_l():
    n, budget = 64, 8
    q, k, v, _ = (x.float() for x in _qkv(n, 2, 2, 16))
    q.requires_grad_()
    idx = select_keys(*_codes(q.detach(), k), budget, backend="torch")
    out, _ = sparse_attention(q, k, v, idx, backend="torch")
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) <= max(q.numel(), idx.numel())
    assert sum(t.numel() for t in saved if t.dtype == torch.int32) == 2 * n * budget  # idx: [B, H, N, L]
    assert dense_mask(idx, n).sum() == (torch.arange(n) + 1).clamp(max=budget).sum() * 2


# ---------------------------------------------------------------------------------- routed FFN


def _ffn_params(gated, t=37, d=24, hidden=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {
        "x": torch.randn(t, d, generator=g),
        "logits": torch.randn(t, 4, generator=g),
        "w_up": torch.randn(hidden, d, generator=g) / 5,
        "w_down": torch.randn(d, hidden, generator=g) / 7,
    }
    p.update({"b_up": torch.randn(hidden, generator=g), "b_down": torch.randn(d, generator=g)})
    if gated:  # SwiGLU, with an up bias (Llama's mlp_bias=True)
        p["w_gate"] = torch.randn(hidden, d, generator=g) / 5
    return {k: v.double() for k, v in p.items()}, torch.randn(t, d, generator=g).double()


def _ffn_run(backend, dtype, params, dout, gated):
    p = {k: v.detach().to(DEVICE, dtype).requires_grad_() for k, v in params.items()}
    act = F.silu if gated else F.gelu
    kw = {k: v for k, v in p.items() if k not in ("x", "logits", "w_up", "w_down")}
    out = routed_ffn(p["x"], p["logits"], p["w_up"], p["w_down"], act, backend=backend, **kw)
    out.backward(dout.to(DEVICE, dtype))
    return [out.detach().cpu()] + [v.grad.cpu() for v in p.values()], ["out", *(f"d{k}" for k in p)]


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu-biases", "gelu-biases"])
def test_routed_ffn_equals_dense_ffn_with_block_mask(backend, dtype, gated):
    params, dout = _ffn_params(gated)
    want, names = _ffn_run("reference", torch.float64, params, dout, gated)
    got, _ = _ffn_run(backend, dtype, params, dout, gated)
    _assert_close(got, want, dtype if dtype != torch.float16 else torch.float16, names)


def test_routing_picks_top_two_and_scales_by_two_p():
    logits = torch.randn(50, 4)
    r = route(logits, 2)
    assert r.offsets[-1] == 100
    assert torch.equal(torch.tensor(r.offsets).diff(), torch.bincount(r.top.flatten(), None, 4))
    assert torch.equal(r.top.sort(-1).values, logits.topk(2, -1).indices.sort(-1).values)
    block = torch.repeat_interleave(torch.arange(4), torch.tensor(r.offsets).diff())
    assert torch.allclose(r.scale, 2 * torch.sigmoid(logits[r.src, block]))


def test_routed_mlp_of_a_gelu_fc1_fc2_mlp():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.activation_fn = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.GELU()

    torch.manual_seed(0)
    mlp = RoutedMLP(GeluMLP(), backend="torch")
    x = torch.randn(2, 9, 16)
    r = route(mlp.spt_router(x.reshape(-1, 16)), 2)
    want = routed_ffn_reference(x.reshape(-1, 16), r, mlp.fc1.weight, mlp.fc2.weight, F.gelu, b_up=mlp.fc1.bias)
    assert rel_err(mlp(x), (want + mlp.fc2.bias).view(2, 9, 16)) < 1e-6


# ------------------------------------------------------------------------------ Hugging Face pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)


def _tokens(s=40):
    return torch.randint(0, 97, (2, s), generator=torch.Generator().manual_seed(1))


def test_spt_model_dense_then_sparse(checkpoint):
    ctx = AttentionContext(backend="torch")
    ref = _load(checkpoint).eval()
    model = prepare_spt(_load(checkpoint), SPTConfig(routed_ffn=False, budget_ratio=1.0, backend="torch"), ctx)
    tokens = _tokens()
    assert all(bool(m.spt_pq.initialized) for m in model.modules() if hasattr(m, "spt_pq"))  # calibrated
    model.train()
    dense = model(tokens, labels=tokens)
    assert rel_err(dense.logits, ref(tokens).logits) < 1e-5  # LoRA B starts at 0: the model is unchanged
    aux = aux_loss(model)
    assert aux.item() > 0
    (dense.loss + aux).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("spt_pq" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert all(p.grad is not None for n, p in trainable.items() if "spt_pq" in n or "lora_B" in n)
    set_stage(model, "sparse")
    sparse = model(tokens, labels=tokens)  # budget >= N: sparse MHA is dense causal attention
    assert rel_err(sparse.logits, dense.logits) < 1e-5


def test_spt_model_with_routed_ffn_trains_router_and_lora(checkpoint):
    cfg = SPTConfig(budget_ratio=1 / 8, backend="torch")
    model = prepare_spt(_load(checkpoint), cfg, AttentionContext(backend="torch")).train()
    routed = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    assert len(routed) == 2 and all(m.kind == "swiglu" for m in routed)
    tokens = _tokens(48)
    model(tokens, labels=tokens)
    set_stage(model, "sparse")
    out = model(tokens, labels=tokens)
    (out.loss + aux_loss(model)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for key in ("spt_router", "gate_proj.lora_B", "down_proj.lora_B", "q_proj.lora_B", "spt_pq"):
        assert any(key in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), key
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.weight"))


def test_sparse_attention_with_context_parallelism_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="context parallelism"):
        prepare_spt(_load(checkpoint), SPTConfig(), AttentionContext(mode="ring"))
    # Routed FFN + dense attention composes with sequence parallelism: accepted.
    prepare_spt(_load(checkpoint), SPTConfig(sparse_attention=False), AttentionContext(mode="ring"))
