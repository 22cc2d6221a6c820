"""Presets: the published Llama 4 shapes, a Behemoth sizing guess, and CPU-sized course models.

`scout()` and `maverick()` are the exact shapes of the Hugging Face checkpoints
(meta-llama/Llama-4-Scout-17B-16E, meta-llama/Llama-4-Maverick-17B-128E);
`count_params` reproduces their published parameter counts to the last digit.

`tiny()` and `small()` keep every Llama 4 mechanism (MoE + shared expert, NoPE every 4th layer,
chunked attention, QK norm, llama3 RoPE scaling, temperature tuning) at a size a laptop runs.
Their chunk size and floor_scale are small so chunking and temperature tuning happen at
course-sized sequence lengths. Their vocabulary is the course's byte-level tokenizer.
"""

from __future__ import annotations

from .config import Llama4Config, TextConfig, VisionConfig
from .tokenizer import ByteTokenizer


def scout() -> Llama4Config:
    """Llama 4 Scout 17B-16E: 48 MoE layers, 16 experts, top-1, QK norm, llama3 RoPE x16."""
    return Llama4Config(text=TextConfig(), vision=VisionConfig(), name="scout")


def maverick() -> Llama4Config:
    """Llama 4 Maverick 17B-128E: dense and MoE layers alternate, 128 experts, no QK norm, plain RoPE."""
    text = TextConfig(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                      rope_type="default", max_position_embeddings=1048576)
    return Llama4Config(text=text, vision=VisionConfig(), name="maverick")


def behemoth() -> Llama4Config:
    """ILLUSTRATIVE GUESS, not a published config. Meta published only: 288B active parameters,
    16 experts, "nearly 2T" total, unreleased. The widths and depth below are chosen by us so
    that count_params gives about 288B active and about 2T total with a Scout-like layout
    (all-MoE, top-1, shared expert); do not read anything else into them."""
    text = TextConfig(hidden_size=16384, num_attention_heads=128, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=90, intermediate_size=25600,
                      num_local_experts=16, interleave_moe_layer_step=1)
    return Llama4Config(text=text, vision=VisionConfig(), name="behemoth (illustrative guess)")


def _course_text(**overrides) -> TextConfig:
    tok = ByteTokenizer()
    base = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=[tok.eot_id, tok.eos_id],
                pad_token_id=tok.pad_id, max_position_embeddings=4096, rope_original_max_position_embeddings=64)
    base.update(overrides)
    return TextConfig(**base)


def tiny() -> Llama4Config:
    """A forward in milliseconds on CPU: 4 layers (layer 3 is NoPE), 4 experts, d=64."""
    text = _course_text(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128,
                        intermediate_size_mlp=256, num_local_experts=4,
                        attention_chunk_size=32, floor_scale=32)
    return Llama4Config(text=text, vision=None, name="tiny")


def small() -> Llama4Config:
    """Trains in about a minute on 2 cores: 4 layers, 16 experts top-1 like Scout, d=128."""
    text = _course_text(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, intermediate_size=256,
                        intermediate_size_mlp=512, num_local_experts=16,
                        attention_chunk_size=64, floor_scale=64)
    return Llama4Config(text=text, vision=None, name="small")


def tiny_multimodal() -> Llama4Config:
    """tiny() plus a 2-layer vision tower on 84 px tiles of 14 px patches: a 6x6 patch grid,
    pixel-shuffled to 9 tokens per tile. The image markers are the byte tokenizer's."""
    tok = ByteTokenizer()
    vision = VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          image_size=84, patch_size=14, projector_input_dim=128, projector_output_dim=128,
                          vision_output_dim=128)
    return Llama4Config(text=tiny().text, vision=vision, name="tiny_multimodal",
                        boi_token_index=tok.special["<|image_start|>"], eoi_token_index=tok.special["<|image_end|>"],
                        image_token_index=tok.patch_id)


PRESETS = {"tiny": tiny, "small": small, "tiny_multimodal": tiny_multimodal, "scout": scout,
           "maverick": maverick, "behemoth": behemoth}


def get(name: str) -> Llama4Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
