"""Configs: validation names the bad field; config.json is read and written in both forms."""

import dataclasses
import json

import pytest
import torch
from helpers import small_text

from minillama4 import configs
from minillama4.config import TextConfig, VisionConfig, from_hf_dict, to_hf_dict
from minillama4.layers import rope_inv_freq


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 3),        # does not divide 4 heads
    ("head_dim", 15),                  # odd: RoPE needs pairs
    ("num_experts_per_tok", 5),        # top-k > 4 experts
    ("rope_type", "yarn"),             # unknown rope type
    ("moe_layers", [0, 4]),            # layer 4 of 4 does not exist
    ("moe_layers", [1, 1]),
    ("no_rope_layers", [1, 1]),        # too short
    ("no_rope_layers", [1, 2, 1, 0]),  # not 0/1
    ("attention_chunk_size", 0),
    ("hidden_size", 0),
    ("rope_low_freq_factor", 4.0),     # low > high
    ("rms_norm_eps", 0.0),
    ("tie_word_embeddings", True),
])
def test_bad_text_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TextConfig\.{field}="):
        small_text(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 5), ("patch_size", 13), ("pixel_shuffle_ratio", 0.3), ("hidden_size", -1),
    # fields transformers' and Meta's code never read (LayerNorm's default eps, a projector without bias):
    # another value would silently disagree with them on the same weights
    ("norm_eps", 1e-6), ("multi_modal_projector_bias", True),
])
def test_bad_vision_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"VisionConfig\.{field}="):
        VisionConfig(**{field: value})


def test_derived_layer_layout_matches_published_models():
    scout, maverick = configs.scout().text, configs.maverick().text
    assert scout.moe_layers == list(range(48))
    assert maverick.moe_layers == list(range(1, 48, 2))  # odd layers MoE, even dense
    nope = [i for i in range(48) if not scout.uses_rope(i)]
    assert nope == list(range(3, 48, 4))  # every 4th layer, 0-based 3, 7, ..., 47
    assert [scout.is_chunked(i) for i in range(4)] == [True, True, True, False]
    no_chunk = dataclasses.replace(scout, attention_chunk_size=None)
    assert not any(no_chunk.is_chunked(i) for i in range(48))


def test_scout_rope_low_equals_high_has_no_nan():
    """Scout's llama3 scaling has low == high == 1: the smoothing band is empty, and a blend
    written as arithmetic would divide by zero."""
    inv = rope_inv_freq(configs.scout().text)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.isfinite(inv).all()
    long = 2 * torch.pi / base > 8192
    assert torch.allclose(inv[long], base[long] / 16) and torch.equal(inv[~long], base[~long])


def test_hf_dict_round_trip_both_forms():
    for cfg in (configs.scout(), configs.maverick(), configs.tiny()):
        for form in ("v5", "legacy"):
            d = json.loads(json.dumps(to_hf_dict(cfg, form)))  # through real JSON
            back = from_hf_dict(d)
            assert back.text == cfg.text and back.vision == cfg.vision


def test_reads_published_legacy_scout_config():
    """The fields of Scout's config.json as written at transformers 4.51 (legacy form)."""
    d = {"model_type": "llama4", "image_token_index": 200092, "text_config": {
        "model_type": "llama4_text", "attn_temperature_tuning": 4, "attention_chunk_size": 8192,
        "floor_scale": 8192, "attn_scale": 0.1, "head_dim": 128, "hidden_size": 5120,
        "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_attention_heads": 40,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "use_qk_norm": True,
        "no_rope_layers": [], "rope_theta": 500000.0, "hidden_act": "silu", "vocab_size": 202048,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "router_aux_loss_coef": 0.001, "rms_norm_eps": 1e-05},
        "vision_config": {"hidden_size": 1408, "image_size": 336, "intermediate_size": 5632,
                          "num_attention_heads": 16, "num_hidden_layers": 34, "patch_size": 14,
                          "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
                          "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000}}
    cfg = from_hf_dict(d)
    assert cfg.text.attn_temperature_tuning is True
    assert cfg.text.no_rope_layers == configs.scout().text.no_rope_layers
    for f in ("rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "moe_layers"):
        assert getattr(cfg.text, f) == getattr(configs.scout().text, f)
    assert cfg.vision == configs.scout().vision


def test_reads_maverick_null_rope_scaling_and_null_chunk():
    d = to_hf_dict(configs.maverick(), "legacy")["text_config"]
    assert d["rope_scaling"] is None
    d["attention_chunk_size"] = None  # Llama Guard 4 style: every layer full attention
    cfg = from_hf_dict(d | {"model_type": "llama4_text"})
    assert cfg.text.rope_type == "default" and cfg.text.attention_chunk_size is None


@pytest.mark.parametrize("d, match", [
    ({"model_type": "llama"}, "not a Llama 4 model"),
    ({"model_type": "llama4"}, "text_config"),
    ({"model_type": "llama4_text", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama4_text", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"model_type": "llama4_text", "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0,
      "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8}}, "rope_type"),
])
def test_bad_hf_dicts(d, match):
    with pytest.raises(ValueError, match=match):
        from_hf_dict(d)


def test_hub_config_with_a_vision_field_no_implementation_reads_is_refused():
    d = to_hf_dict(configs.tiny_multimodal())
    d["vision_config"]["norm_eps"] = 1e-6
    with pytest.raises(ValueError, match=r"VisionConfig\.norm_eps=1e-06: .*only 1e-5 is supported"):
        from_hf_dict(d)


def test_presets_build_and_tiny_is_fast():
    import time

    import minillama4 as ml4

    for name in ("tiny", "small"):
        cfg = configs.get(name)
        model = ml4.Llama4Text.random(cfg)
        ids = torch.randint(0, cfg.text.vocab_size, (1, 32))
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (1, 32, cfg.text.vocab_size)
    assert time.perf_counter() - t0 < 5  # generous: the point is "a forward, not a training run"
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get("llama5")
    assert "guess" in configs.behemoth().name
