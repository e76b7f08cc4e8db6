"""Fine-tuning recipes on a local GQA Llama checkpoint: position interpolation written into the
config, the trainable parameters of each method, the span each installs, a merged export that
plain transformers loads with logits equal to the LoRA model's, a recipe's auxiliary loss in the
training loss, and a new recipe as one class plus one registry line."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsts.attention import LOCAL, AttentionContext
from lsts.finetune.config import FinetuneConfig
from lsts.finetune.recipes import Recipe, interpolation_factor, load_extended, recipe
from lsts.finetune.trainer import CausalLMLoss
from lsts.models.hf import use_lsts_attention
from lsts.train.data import IGNORE_INDEX
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
    model = recipe(method, 128).prepare(load_extended(checkpoint, 128), CTX)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) == (method != "full")
    assert any("embed_tokens" in n for n in trainable) == (method != "lora")
    assert any(n.endswith("norm.weight") for n in trainable) == (method != "lora")
    # None: the model's own attention on every layer
    spans = {getattr(m.lsts_span, "kind", None) for m in model.modules() if hasattr(m, "lsts_span")}
    assert spans == {kind} and getattr(recipe(method, 128).span, "kind", None) == kind


def test_merged_export_loads_in_plain_transformers_with_equal_logits(checkpoint, tmp_path):
    longlora = recipe("longlora", 128)
    model = longlora.prepare(load_extended(checkpoint, 128), CTX)
    with torch.no_grad():  # adapters start at zero: give them weights so the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tokens = torch.randint(0, 97, (1, 128), generator=torch.Generator().manual_seed(2))
    want = use_lsts_attention(model, None, CTX)(tokens).logits
    path = longlora.export(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert plain.config.rope_parameters["factor"] == 2.0
    assert rel_err(plain(tokens).logits, want) < 1e-5


def test_bad_method_and_length():
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        recipe("qlora", 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        recipe("longlora", 100)


class ConstantAuxLoss(Recipe):
    """LoRA with a constant auxiliary loss, to see where the job's loss adds it."""

    def aux_loss(self, model):
        return torch.tensor(0.25, dtype=torch.float64)


def test_a_recipes_aux_loss_is_added_per_token_while_training(checkpoint):
    model = recipe("lora", 64).prepare(load_extended(checkpoint, 64, torch.float64), CTX)
    tokens = torch.randint(0, 97, (1, 65), generator=torch.Generator().manual_seed(3))
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX  # the aux loss counts the tokens the loss counts
    row = (tokens[:, :-1], torch.arange(64)[None], CTX, labels)
    plain = CausalLMLoss(model, backend="torch")(*row)
    with_aux = CausalLMLoss(model, backend="torch", recipe=ConstantAuxLoss(FinetuneConfig(method="lora"), 64))
    assert torch.allclose(with_aux.train()(*row), plain + 0.25 * 59, rtol=1e-12, atol=0)
    assert torch.equal(with_aux.eval()(*row), plain)  # evaluation is the language-model loss alone


class OwnRecipe(Recipe):
    """A method with behaviour of its own, as docs/architecture.md adds one."""

    def prepare(self, model, ctx=LOCAL, cp=1):
        return ("prepared", model, ctx, cp)


def test_a_method_is_one_registry_entry(monkeypatch):
    """docs/architecture.md's recipes: a span-and-weights method is one `METHODS` line; a method with
    behaviour of its own names its `Recipe` subclass, which `recipe` imports and builds."""
    from lsts.finetune.methods import METHODS, Method
    from lsts.kernels.attention import Span

    monkeypatch.setitem(METHODS, "windowlora", Method("window + LoRA+", span="window", train_embeddings_and_norms=True))
    rec = recipe("windowlora", 128)
    assert type(rec) is Recipe and rec.name == "windowlora"
    assert rec.span == Span("window", 32) and rec.lora and rec.train_embeddings_and_norms
    monkeypatch.setitem(METHODS, "mine", Method("its own", recipe="tests.test_recipes:OwnRecipe"))
    rec = recipe("mine", 128, FinetuneConfig(lora_r=3))
    assert type(rec) is OwnRecipe and rec.name == "mine" and rec.settings.lora_r == 3
    assert rec.prepare("model", CTX, 2) == ("prepared", "model", CTX, 2)
    assert rec.aux_loss("model") is None  # the hooks it does not override do nothing
