"""Parity with Hugging Face transformers' Llama 4 on the same random weights.

fp32 logits within 1e-4 relative, identical greedy tokens over 24 new tokens (transformers'
own generate with its own cache), and bf16 logits close. Every case runs sequences longer than
the attention chunk (8), with NoPE temperature tuning switched on at floor_scale 2.
"""

import json

import pytest
import torch
from helpers import rel_err, small_text

import minillama4 as ml4
from minillama4.config import Llama4Config, to_hf_dict

transformers = pytest.importorskip("transformers")
from minillama4.hf_reference import to_transformers  # noqa: E402

pytestmark = pytest.mark.parity

CASES = {
    # Scout-like: all-MoE, top-1, QK norm, llama3 RoPE with a non-empty smoothing band
    "scout_like": small_text(),
    # Scout's own RoPE shape: low == high frequency factor (empty smoothing band, no NaN)
    "scout_rope_low_eq_high": small_text(rope_low_freq_factor=1.0, rope_high_freq_factor=1.0),
    # Maverick-like: dense/MoE interleaved (odd layers MoE), no QK norm, plain RoPE, 8 experts
    "maverick_like": small_text(interleave_moe_layer_step=2, use_qk_norm=False, rope_type="default",
                                num_local_experts=8, num_hidden_layers=6),
    "top2": small_text(num_experts_per_tok=2, num_local_experts=6),
    "top3_all_dense_first": small_text(num_experts_per_tok=3, moe_layers=[1, 2, 3]),
    "no_chunk": small_text(attention_chunk_size=None),
    "gqa_3": small_text(num_attention_heads=6, num_key_value_heads=2),
    "mqa": small_text(num_attention_heads=4, num_key_value_heads=1),
    "mha_no_temperature": small_text(num_key_value_heads=4, attn_temperature_tuning=False),
    "explicit_nope_layers": small_text(no_rope_layers=[0, 1, 0, 1], num_hidden_layers=4),
    # q/k/v/o with biases (attention_bias: False in every published Llama 4, accepted by both)
    "attention_bias": small_text(attention_bias=True),
    # expert width whose rows are not 16-byte aligned: torch._grouped_mm cannot take it (it crashed)
    "unaligned_expert_width": small_text(intermediate_size=90),
}


def pair(cfg, dtype=torch.float32, seed=0):
    ours = ml4.Llama4Text.random(cfg, seed=seed, dtype=dtype)
    biases = [p for name, p in ours.named_parameters() if name.endswith(".bias")]
    with torch.no_grad():  # random init zeroes biases, which would test nothing
        for p in biases:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.1)
    assert bool(biases) == cfg.attention_bias
    return ours, to_transformers(ours)


def test_the_reference_holds_its_own_copy_of_the_weights():
    """Shared tensors would hide a forward that wrote into a weight: both models would change alike."""
    ours, hf = pair(CASES["scout_like"])
    ptrs = {t.data_ptr() for t in ours.state_dict().values()}
    assert not ptrs & {t.data_ptr() for t in hf.state_dict().values()}
    for name, t in ours.state_dict().items():
        assert torch.equal(t, hf.state_dict()[name]), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_logits_and_greedy_tokens(name):
    cfg = CASES[name]
    ours, hf = pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 37, cfg.vocab_size)
    assert rel_err(got, ref) < 1e-4
    prompt = ids[:, :11]
    new = 24
    ref_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    got_tokens = ours.generate(prompt, max_new_tokens=new)
    assert got_tokens.shape == (2, 11 + new)
    assert torch.equal(got_tokens, ref_tokens)
    # the static decode step (decode.py: in-place cache, masked whole buffer, gather dispatch)
    assert torch.equal(ours.generate(prompt, max_new_tokens=new, decode="static"), ref_tokens)


def test_batch_of_three_and_reference_dispatch():
    cfg = CASES["top2"]
    ours, hf = pair(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (3, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(ours(ids), ref) < 1e-4
        assert rel_err(ours.set_dispatch("reference")(ids), ref) < 1e-4


def test_temperature_tuning_is_exercised():
    """The parity cases would not prove much if temperature tuning changed nothing at this length."""
    cfg = CASES["scout_like"]
    ours, hf = pair(cfg)
    off = ml4.Llama4Text(cfg.__class__(**{**cfg.__dict__, "attn_temperature_tuning": False}))
    off.load_state_dict(ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(off(ids), hf(ids).logits) > 1e-3


def test_bf16_logits_close():
    cfg = CASES["scout_like"]
    ours32 = ml4.Llama4Text.random(cfg, seed=5)
    ours = ml4.Llama4Text(cfg).to(torch.bfloat16)
    ours.load_state_dict(ours32.state_dict())
    hf = to_transformers(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got, exact = hf(ids).logits, ours(ids), ours32(ids)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 2e-2
    # and bf16 error against fp32 is of the same size for both implementations
    assert rel_err(got, exact) < 2 * rel_err(ref, exact) + 1e-2


@pytest.mark.parametrize("form", ["legacy", "v5"])
def test_config_json_forms_load_in_both(tmp_path, form):
    """Our save_pretrained in either config.json form loads in transformers and back in ours.
    The legacy form is what the hub had at transformers 4.51: rope_theta + rope_scaling, and
    attn_temperature_tuning stored as the int 4, which transformers 5.x's strict config rejects
    (so transformers reads the file with the bool, ours reads it with the int)."""
    cfg = CASES["scout_like"]
    ours = ml4.Llama4Text.random(cfg, seed=6)
    ours.save_pretrained(tmp_path, form=form)
    written = json.loads((tmp_path / "config.json").read_text())
    if form == "legacy":
        assert "rope_scaling" in written and "rope_parameters" not in written
    else:
        assert written["rope_parameters"]["rope_type"] == "llama3"
    assert written["attn_temperature_tuning"] is True
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    if form == "legacy":
        written["attn_temperature_tuning"] = 4
        (tmp_path / "config.json").write_text(json.dumps(written))
    back = ml4.from_pretrained(tmp_path)
    assert back.cfg == ours.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 33), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(back(ids), hf(ids).logits) < 1e-4


def test_round_trip_ours_transformers_ours(tmp_path):
    cfg = CASES["maverick_like"]
    ours = ml4.Llama4Text.random(cfg, seed=8)
    ours.save_pretrained(tmp_path / "a", max_shard_size=200_000)  # sharded, with an index
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "b")
    back = ml4.from_pretrained(tmp_path / "b")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_conditional_generation_checkpoint_loads_text_part(tmp_path):
    """A Llama4ForConditionalGeneration directory (language_model.* keys + vision keys) loaded
    with text_only=True gives the same text model, skipping the vision tensors (the full
    multimodal model is tested in test_vision.py)."""
    from minillama4.config import VisionConfig

    text = CASES["scout_like"]
    vision = VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                          image_size=28, patch_size=14, projector_input_dim=64, projector_output_dim=64,
                          vision_output_dim=64)
    hcfg = transformers.Llama4Config(**{k: v for k, v in to_hf_dict(Llama4Config(text=text, vision=vision)).items()
                                        if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(9)
    hf = transformers.Llama4ForConditionalGeneration(hcfg).eval()
    hf.save_pretrained(tmp_path)
    ours = ml4.from_pretrained(tmp_path, dtype=torch.float32, text_only=True)
    assert isinstance(ours, ml4.Llama4Text)
    assert ours.config.vision is not None and ours.config.vision.hidden_size == 32
    ids = torch.randint(0, text.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf.language_model(ids).logits  # transformers' forward of the text part alone
        assert rel_err(ours(ids), ref) < 1e-4
