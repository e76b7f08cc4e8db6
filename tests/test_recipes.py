"""Fine-tuning recipes on a local GQA Llama checkpoint: position interpolation written into the
config, the trainable parameters of each method, the span each installs, and a merged export that
plain transformers loads with logits equal to the LoRA model's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.attention import AttentionContext
from lsts.finetune.recipes import export_merged, interpolation_factor, load_extended, prepare, recipe
from lsts.models.hf import use_lsts_attention
from tests.hf_models import save_tiny_llama
from tests.oracle import rel_err

CTX = AttentionContext(backend="torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=64)


def test_interpolation_factor_and_config(checkpoint):
    assert interpolation_factor(8192, 2048) == 4 and interpolation_factor(100, 2048) == 1
    model = load_extended(checkpoint, 256)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0 and model.config.max_position_embeddings == 256


@pytest.mark.parametrize("method,kind", [("lora", None), ("longlora", "s2"), ("sinklora", "sf"), ("full", None)])
def test_each_method_trains_what_its_recipe_says(checkpoint, method, kind):
    model = prepare(load_extended(checkpoint, 128), method, 128, CTX)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) == (method != "full")
    assert any("embed_tokens" in n for n in trainable) == (method != "lora")
    assert any(n.endswith("norm.weight") for n in trainable) == (method != "lora")
    # None: the model's own attention on every layer
    spans = {getattr(m.lsts_span, "kind", None) for m in model.modules() if hasattr(m, "lsts_span")}
    assert spans == {kind} and getattr(recipe(method, 128).span, "kind", None) == kind


def test_merged_export_loads_in_plain_transformers_with_equal_logits(checkpoint, tmp_path):
    model = prepare(load_extended(checkpoint, 128), "longlora", 128, CTX)
    with torch.no_grad():  # adapters start at zero: give them weights so the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tokens = torch.randint(0, 97, (1, 128), generator=torch.Generator().manual_seed(2))
    want = use_lsts_attention(model, None, CTX)(tokens).logits
    path = export_merged(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert plain.config.rope_parameters["factor"] == 2.0
    assert rel_err(plain(tokens).logits, want) < 1e-5


def test_bad_method_and_length():
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        recipe("qlora", 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        recipe("longlora", 100)


def _own_preparation(model, ctx, sparse_attention):
    return ("prepared", model, ctx, sparse_attention)


def test_a_method_is_one_registry_entry(monkeypatch):
    """docs/architecture.md's recipes: a span-and-weights method is one `METHODS` line; a method with
    its own preparation names its function, which `prepare` imports and calls."""
    from lsts.finetune.methods import METHODS, Method
    from lsts.kernels.attention import Span

    monkeypatch.setitem(METHODS, "windowlora", Method("window + LoRA+", span="window", train_embeddings_and_norms=True))
    rec = recipe("windowlora", 128)
    assert rec.span == Span("window", 32) and rec.lora and rec.train_embeddings_and_norms
    monkeypatch.setitem(METHODS, "mine", Method("its own", prepare="tests.test_recipes:_own_preparation"))
    assert prepare("model", "mine", 128, CTX, sparse_attention=False) == ("prepared", "model", CTX, False)
