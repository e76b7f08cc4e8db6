"""Every decoder on lsts attention computes what it computes on ``eager``: logits and every
parameter gradient, on plain, left-padded and packed rows (fp32, relative error <= 1e-5).

``eager`` is the oracle because it shares nothing with lsts: on CPU ``sdpa`` runs the same aten
kernel as lsts' torch backend. Each architecture switches on what makes its attention more than
causal softmax (sliding windows, logit softcapping, learnable sinks, chunks, MLA head sizes,
partial rotary, ...), see `tests.hf_models.TINY_ARCHS`; `tests.hf_models.parity_errors` says how
each mode is measured (``bench/hf_parity.py`` prints the table of docs/hf_models.md).
"""

import pytest

import lsts.models.hf
from tests.hf_models import TINY_ARCHS, parity_errors

ARCHS = sorted(TINY_ARCHS)
TOL = 1e-5


@pytest.mark.parametrize("mode", ["plain", "left_padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_every_gradient_equal_eager(arch, mode):
    errors = parity_errors(arch, mode)
    assert errors["logits"] < TOL
    assert errors["grad"] < TOL, errors["grad_param"]


def test_packed_rows_are_what_eager_makes_of_them():
    """The packed oracle above runs each document alone; eager on the packed row agrees where it
    packs (no cache; with a cache it does not, while lsts, like FlashAttention, still does)."""
    import copy

    import torch

    from tests.hf_models import tiny_causal_lm
    from tests.oracle import rel_err

    ref = tiny_causal_lm("mistral")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("lsts")
    tokens = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        got = ours(tokens, position_ids=positions, use_cache=False).logits
        assert rel_err(got, ref(tokens, position_ids=positions, use_cache=False).logits) < TOL
        assert rel_err(ours(tokens, position_ids=positions, use_cache=True).logits, got) < TOL


def test_a_model_off_the_interface_is_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("stablelm", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"does not dispatch its attention through transformers\.AttentionInterface"):
        lsts.models.hf.use_lsts_attention(model)
