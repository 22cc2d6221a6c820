"""Configs: validation names the bad field; config.json is read and written in both forms."""

import copy
import dataclasses
import json
import re

import pytest
import torch
from helpers import small_text

import minillama4 as ml4
from minillama4 import configs
from minillama4.config import VisionConfig, from_hf_dict, to_hf_dict
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
    # NaN fails every `<=` test and infinities pass them: floats must be finite
    ("rope_theta", float("nan")), ("rope_theta", float("inf")), ("rms_norm_eps", float("nan")),
    ("attn_scale", float("nan")), ("attn_scale", -0.1), ("rope_factor", float("nan")),
    ("rope_high_freq_factor", float("inf")), ("initializer_range", -1.0), ("initializer_range", float("nan")),
    # wrong types are named, not met by a TypeError from a comparison or from torch.empty
    ("rope_theta", "5e5"), ("rope_theta", None), ("rms_norm_eps", "1e-5"), ("intermediate_size_mlp", 2.5),
    ("hidden_size", True), ("max_position_embeddings", None),
    # no silent coercions: 1.7 -> 1, "no" -> True
    ("moe_layers", [1.7]),
    ("no_rope_layers", [1, 1, 0, 1.9]),
    ("no_rope_layers", [1, 1, 1, 0, 1]),   # longer than the 4 layers
    ("use_qk_norm", "no"),
    ("attn_temperature_tuning", "false"),
    ("attention_bias", 1),
    # token ids must exist in the 320-token vocabulary
    ("bos_token_id", 320), ("pad_token_id", -1), ("eos_token_id", [2, 320]), ("eos_token_id", "2"),
])
def test_bad_text_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TextConfig\.{field}="):
        small_text(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    ("rope_theta", float("nan"), "must be a finite positive number"),
    ("moe_layers", [1.7], "must be None or a list of integers"),
    ("use_qk_norm", "no", "must be True or False"),
    ("bos_token_id", 320, r"a token id must be an integer in \[0, vocab_size=320\)"),
])
def test_bad_text_config_says_what_is_accepted(field, value, match):
    with pytest.raises(ValueError, match=rf"TextConfig\.{field}={re.escape(repr(value))}: {match}"):
        small_text(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    # each was accepted and gave NaN logits (or an OverflowError in the forward)
    ("rope_theta", 1e-300, r"must be > 1: the RoPE base \(Llama 4 uses 500000\)"),
    ("rope_theta", 1.0, "must be > 1"),  # every frequency 1: no position information
    ("rope_factor", 1e-300, r"must be >= 1: the llama3 scaling factor \(Scout uses 16\)"),
    ("rope_factor", 0.5, "must be >= 1"),
    ("attn_scale", 1e300, r"must be in \[0, 100\] \(Llama 4 uses 0.1"),
    ("floor_scale", 2**80, r"must be an integer in \[1, 2\*\*31 - 1 = 2147483647\] \(Llama 4 uses 8192\)"),
    ("rms_norm_eps", float("nan"), "must be a finite positive number"),
])
def test_values_that_break_the_forward_are_refused(field, value, match):
    with pytest.raises(ValueError, match=rf"TextConfig\.{field}={re.escape(repr(value))}: {match}"):
        small_text(**{field: value})


def test_bounds_keep_the_published_values_and_the_edges_run_finite():
    """The limits keep every preset (and so the hub's config.json values) and their edges give finite logits."""
    for name in configs.PRESETS:
        configs.get(name).text.validate()
    ids = torch.tensor([[1, 2, 3] * 8])
    for edge in ({"rope_theta": 1.0001}, {"rope_factor": 1.0}, {"attn_scale": 100.0, "floor_scale": 1},
                 {"floor_scale": 2**31 - 1}):
        model = ml4.Llama4Text.random(configs.tiny().replace_text(**edge), seed=0)
        with torch.no_grad():
            assert model(ids).isfinite().all(), edge
    cfg = configs.tiny()
    cfg.text.rms_norm_eps = float("nan")  # set after construction: validate() names it
    with pytest.raises(ValueError, match=r"TextConfig\.rms_norm_eps=nan: must be a finite positive number"):
        cfg.text.validate()


def test_published_token_ids_and_legacy_temperature_flag_are_accepted():
    scout = configs.scout()
    assert scout.text.eos_token_id == [200001, 200007, 200008] and scout.text.pad_token_id == 200018
    assert small_text(attn_temperature_tuning=4).attn_temperature_tuning is True  # old config.json: the int 4
    assert small_text(eos_token_id=None, bos_token_id=None, pad_token_id=None).eos_token_id is None
    # image ids are not checked against the vocabulary: text-only presets keep Scout's ids
    assert configs.tiny().image_token_index == 200092


@pytest.mark.parametrize("changes, error, match", [
    ({"text": {"vocab_size": 320}}, TypeError, r"Llama4Config\.text=\{'vocab_size': 320\}: must be a TextConfig"),
    ({"vision": {}}, TypeError, r"Llama4Config\.vision=\{\}: must be a VisionConfig or None"),
    ({"image_token_index": "<|patch|>"}, ValueError,
     r"Llama4Config\.image_token_index='<\|patch\|>': .*non-negative integer"),
    ({"boi_token_index": -1}, ValueError, r"Llama4Config\.boi_token_index=-1"),
])
def test_bad_llama4_config_names_the_field(changes, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(configs.tiny_multimodal(), **changes)


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 5), ("patch_size", 13), ("pixel_shuffle_ratio", 0.3), ("hidden_size", -1),
    # fields transformers' and Meta's code never read (LayerNorm's default eps, a projector without bias):
    # another value would silently disagree with them on the same weights
    ("norm_eps", 1e-6), ("multi_modal_projector_bias", True),
    ("rope_theta", 0), ("rope_theta", -1.0), ("rope_theta", float("nan")), ("rope_theta", "1e4"),
    ("rope_theta", 1e-300), ("rope_theta", 1.0),  # 1e-300: inf frequencies, NaN features
    ("pixel_shuffle_ratio", float("nan")), ("multi_modal_projector_bias", "no"),
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


def test_hf_dicts_share_no_lists_with_the_config():
    """to_hf_dict(cfg)["moe_layers"].append(7) changed cfg.text.moe_layers; from_hf_dict kept d's eos list."""
    cfg = configs.tiny_multimodal()
    before = copy.deepcopy(cfg)
    for form in ("v5", "legacy"):
        for d in (to_hf_dict(cfg, form), to_hf_dict(cfg, form, text_only=True)):
            text = d.get("text_config", d)
            for name in ("moe_layers", "no_rope_layers", "eos_token_id"):
                text[name].append(7)
    assert cfg == before
    d = to_hf_dict(cfg)
    back = from_hf_dict(d)
    d["text_config"]["eos_token_id"].append(7)
    assert back.text.eos_token_id == cfg.text.eos_token_id


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
    ({"model_type": "llama4", "text_config": None}, r"config\.json: text_config=None: expected a JSON object"),
    ({"model_type": "llama4_text", "rope_scaling": "llama3"}, r"rope_scaling='llama3': expected a JSON object"),
    ({"model_type": "llama4_text", "rope_parameters": [1]}, r"rope_parameters=\[1\]: expected a JSON object"),
    # the type is named before llama3's fields, which a linear block does not have
    ({"model_type": "llama4_text", "rope_scaling": {"type": "linear", "factor": 8}},
     r"rope_scaling\.rope_type='linear' is not supported; expected one of \('default', 'llama3'\)"),
    ({"model_type": "llama4_text", "rope_scaling": {"factor": 8}}, r"rope_type=None is not supported"),
])
def test_bad_hf_dicts(d, match):
    with pytest.raises(ValueError, match=match):
        from_hf_dict(d)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["text_config"]["rope_parameters"].update(factor=None),
     r"TextConfig\.rope_factor=None: must be a finite"),
    (lambda d: d["text_config"]["rope_parameters"].update(rope_theta=float("nan")), r"TextConfig\.rope_theta=nan"),
    (lambda d: d["text_config"]["rope_parameters"].update(rope_theta="5e5"), r"TextConfig\.rope_theta='5e5'"),
    (lambda d: d["text_config"].update(use_qk_norm="no"), r"TextConfig\.use_qk_norm='no': must be True or False"),
    (lambda d: d["vision_config"].update(hidden_act="relu"), r"VisionConfig\.hidden_act='relu': .*'gelu'"),
    (lambda d: d["vision_config"].update(rope_parameters={"rope_type": "default", "rope_theta": 0}),
     r"VisionConfig\.rope_theta=0"),
    (lambda d: d.update(tie_word_embeddings=True), r"config\.json: tie_word_embeddings=True: .*untied lm_head"),
    (lambda d: d.update(vision_config="x"), r"config\.json: vision_config='x': expected a JSON object"),
    (lambda d: d.update(image_token_index=None), r"Llama4Config\.image_token_index=None"),
])
def test_bad_values_in_a_multimodal_config_json_name_the_field(edit, match):
    d = json.loads(json.dumps(to_hf_dict(configs.tiny_multimodal())))  # NaN survives Python's json
    edit(d)
    with pytest.raises(ValueError, match=match):
        from_hf_dict(d)


@pytest.mark.parametrize("d", [[1], None, "config.json"])
def test_from_hf_dict_wants_a_dict(d):
    with pytest.raises(TypeError, match=r"from_hf_dict: d=.*: expected a parsed config\.json object \(a dict\)"):
        from_hf_dict(d)


def test_hub_config_with_a_vision_field_no_implementation_reads_is_refused():
    d = to_hf_dict(configs.tiny_multimodal())
    d["vision_config"]["norm_eps"] = 1e-6
    with pytest.raises(ValueError, match=r"VisionConfig\.norm_eps=1e-06: .*only 1e-5 is supported"):
        from_hf_dict(d)


def test_presets_build_and_run_a_forward():
    import minillama4 as ml4

    for name in ("tiny", "small"):
        cfg = configs.get(name)
        model = ml4.Llama4Text.random(cfg)
        ids = torch.randint(0, cfg.text.vocab_size, (1, 32))
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (1, 32, cfg.text.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get("llama5")
    assert "guess" in configs.behemoth().name
