"""Fine-tuning any attention-interface decoder: the LoRA targets found from each architecture's own
modules (fused and Conv1D projections included), and position interpolation written into its
config with every RoPE setting kept (partial rotary, existing linear factors, per-layer-type dicts),
checked against rotary frequencies computed here from theta."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig
from transformers.pytorch_utils import Conv1D

from lsts.finetune.positions import extend_positions
from lsts.finetune.recipes import load_extended
from lsts.finetune.targets import lora_config, lora_targets, mlp_targets
from tests.hf_models import TINY_DECODERS, save_tiny_decoder, tiny_decoder

# What each architecture names its attention and MLP projections (from its modeling file).
ATTENTION = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gemma2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi3": {"qkv_proj", "o_proj"},
    "gpt_neox": {"query_key_value", "dense"},
    "gpt2": {"c_attn", "c_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense"},
    "qwen3": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
}
MLP = {
    "phi3": {"gate_up_proj", "down_proj"},
    "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
    "gpt2": {"c_fc", "c_proj"},
    "phi": {"fc1", "fc2"},
}
SWIGLU = {"gate_proj", "up_proj", "down_proj"}


def _leaves(names, part):
    return {n.rsplit(".", 1)[-1] for n in names if f".{part}." in n}


@pytest.mark.parametrize("arch", sorted(TINY_DECODERS))
def test_lora_targets_are_every_attention_projection_and_mlp_targets_the_feed_forward(arch):
    model = tiny_decoder(arch)
    targets = lora_targets(model)
    layers = 2
    assert len(targets) == layers * len(ATTENTION[arch]) == len(set(targets))
    attn_part = "attn" if arch == "gpt2" else ("attention" if arch == "gpt_neox" else "self_attn")
    assert _leaves(targets, attn_part) == ATTENTION[arch]
    mlp = mlp_targets(model)
    assert {n.rsplit(".", 1)[-1] for n in mlp} == MLP.get(arch, SWIGLU)
    assert all(".mlp." in n for n in mlp) and not set(mlp) & set(targets)

    adapted = get_peft_model(copy.deepcopy(model), lora_config(model, targets, r=4, alpha=8))
    lora_layers = [n for n, m in adapted.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == len(targets)
    adapted(torch.randint(0, 256, (1, 8)))  # the adapted layers run (Conv1D with fan_in_fan_out)


def test_gpt2_conv1d_targets_take_fan_in_fan_out_and_the_adapter_acts_on_the_right_side():
    model = tiny_decoder("gpt2").eval()
    config = lora_config(model, lora_targets(model), r=4, alpha=8)
    assert config.fan_in_fan_out
    adapted = get_peft_model(copy.deepcopy(model), config)
    c_attn = adapted.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        c_attn.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(3, 64)
    delta = (x @ c_attn.lora_A["default"].weight.T @ c_attn.lora_B["default"].weight.T) * c_attn.scaling["default"]
    base = model.transformer.h[0].attn.c_attn
    want = x @ base.weight + base.bias + delta  # Conv1D: weight [in, out]
    torch.testing.assert_close(c_attn(x), want, rtol=1e-5, atol=1e-6)


class _NoLinearAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_idx, self.scaling = 0, 1.0
        self.mix = nn.Parameter(torch.ones(4))


def test_a_model_without_attention_linears_is_a_clear_error():
    model = nn.Module()
    model.layers = nn.ModuleList([_NoLinearAttention()])
    model.config = LlamaConfig()
    with pytest.raises(ValueError, match="model type 'llama': found no linear layers inside attention"):
        lora_targets(model)


def test_attention_mixing_conv1d_and_linear_is_a_clear_error():
    model = nn.Module()
    model.layers = nn.ModuleList([_NoLinearAttention()])
    model.layers[0].qkv, model.layers[0].out = Conv1D(12, 4), nn.Linear(4, 4)
    model.config = LlamaConfig()
    assert lora_targets(model) == ["layers.0.qkv", "layers.0.out"]
    with pytest.raises(ValueError, match="mixes Conv1D and Linear LoRA targets"):
        lora_config(model, lora_targets(model), r=2, alpha=4)


# --- position interpolation ---------------------------------------------------------------------------


def _inv_freq(model):
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    assert rotary.attention_scaling == 1.0  # interpolation leaves cos/sin unscaled
    return rotary.inv_freq.double()


def _oracle(theta, head_dim, partial, factor):
    dim = int(head_dim * partial)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)) / factor


@pytest.mark.parametrize("arch,partial", [("llama", 1.0), ("phi3", 0.5), ("gpt_neox", 0.25), ("phi", 0.5)])
def test_interpolation_keeps_partial_rotary_and_theta_and_divides_every_frequency(tmp_path, arch, partial):
    base = save_tiny_decoder(tmp_path / arch, arch, max_position_embeddings=32)
    model = load_extended(base, 100)  # ceil(100 / 32) = 4
    rope = model.config.rope_parameters
    assert rope.get("partial_rotary_factor", 1.0) == partial
    assert rope["rope_theta"] == 1e4 and model.config.max_position_embeddings == 100
    torch.testing.assert_close(_inv_freq(model), _oracle(1e4, 16, partial, 4), rtol=1e-6, atol=0)
    # the config travels: a save / load gives the same frequencies, and extends again by multiplying
    model.save_pretrained(tmp_path / "extended")
    again = load_extended(tmp_path / "extended", 300)  # ceil(300 / 100) = 3 more
    torch.testing.assert_close(_inv_freq(again), _oracle(1e4, 16, partial, 12), rtol=1e-6, atol=0)


def test_an_existing_linear_factor_is_multiplied_and_other_keys_kept():
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
    )  # fmt: skip
    assert extend_positions(config, 200) == 4
    assert config.rope_parameters == {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}
    assert config.max_position_embeddings == 200
    assert extend_positions(config, 150) == 1 and config.rope_parameters["factor"] == 8.0  # already covered


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e4},
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "rope_theta": 1e4},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    ],
)  # fmt: skip
def test_uneven_rope_scalings_are_a_clear_error_and_leave_the_config_alone(rope):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters=rope)
    before = copy.deepcopy(config.rope_parameters)
    with pytest.raises(ValueError, match=f"rope_type '{rope['rope_type']}' already rescales positions"):
        extend_positions(config, 256)
    assert config.rope_parameters == before and config.max_position_embeddings == 64
    assert extend_positions(config, 64) == 1  # within the model's length: nothing to extend


def test_per_layer_type_rope_extends_the_full_layers_and_keeps_sliding_ones_within_their_window():
    config = Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2, max_position_embeddings=64,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    )  # fmt: skip
    extend_positions(config, 128)
    assert config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}


def test_learned_absolute_positions_cannot_be_interpolated_beyond_their_table(tmp_path):
    base = save_tiny_decoder(tmp_path / "gpt2", "gpt2", max_position_embeddings=32)
    assert load_extended(base, 32).config.n_positions == 32  # within the table: allowed, unchanged
    with pytest.raises(ValueError, match="model type 'gpt2' has no rotary position embedding"):
        load_extended(base, 64)


def test_phi3_takes_the_interpolation_as_uniform_longrope():
    config = tiny_decoder("phi3").config
    extend_positions(config, 64)
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["partial_rotary_factor"] == 0.5
    assert rope["short_factor"] == rope["long_factor"] == [2.0] * 4 and rope["attention_factor"] == 1.0
    model = AutoModelForCausalLM.from_config(config)
    torch.testing.assert_close(_inv_freq(model), _oracle(1e4, 16, 0.5, 2), rtol=1e-6, atol=0)
