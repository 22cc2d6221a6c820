"""Parameter counting from a config alone (no weights), total and active per token.

Active = what one text token touches: all attention, norms, routers, the shared expert or dense
MLP of each layer, top-k routed experts per MoE layer, and (by the convention of Meta's "17B
active") the whole embedding and lm_head matrices. The vision tower runs only on image tokens,
so it counts as total but not active.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Llama4Config, TextConfig, VisionConfig

# Bytes per weight. int4: 4 bits plus one bf16 scale per group of 128 weights.
BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}


@dataclass
class ParamCount:
    total: int = 0  # every parameter of the model
    active: int = 0  # parameters one text token touches
    components: dict = field(default_factory=dict)  # name -> (total, active)

    def add(self, name: str, total: int, active: int | None = None):
        active = total if active is None else active
        t, a = self.components.get(name, (0, 0))
        self.components[name] = (t + total, a + active)
        self.total += total
        self.active += active

    def part(self, prefix: str) -> int:
        return sum(t for name, (t, _) in self.components.items() if name.startswith(prefix))

    def memory_gib(self, fmt: str) -> float:
        if not isinstance(fmt, str) or fmt not in BYTES_PER_PARAM:
            raise ValueError(f"fmt={fmt!r}: expected one of {sorted(BYTES_PER_PARAM)}")
        return self.total * BYTES_PER_PARAM[fmt] / 2**30

    def as_dict(self) -> dict:
        return {"total": self.total, "active": self.active,
                "text_total": self.part("text."), "vision_total": self.part("vision."),
                "components": {k: {"total": t, "active": a} for k, (t, a) in self.components.items()}}


def _text(t: TextConfig, pc: ParamCount):
    d, hd = t.hidden_size, t.head_dim
    n_moe = len(t.moe_layers)
    n_dense = t.num_hidden_layers - n_moe
    one_expert = 3 * d * t.intermediate_size  # gate, up, down
    bias = t.attention_bias
    q_o = 2 * d * t.num_attention_heads * hd + (t.num_attention_heads * hd + d) * bias
    k_v = 2 * d * t.num_key_value_heads * hd + 2 * t.num_key_value_heads * hd * bias
    pc.add("text.embed_tokens", t.vocab_size * d)
    pc.add("text.attention", t.num_hidden_layers * (q_o + k_v))
    pc.add("text.norms", t.num_hidden_layers * 2 * d + d)
    pc.add("text.routers", n_moe * d * t.num_local_experts)
    pc.add("text.routed_experts", n_moe * t.num_local_experts * one_expert,
           n_moe * t.num_experts_per_tok * one_expert)
    pc.add("text.shared_experts", n_moe * one_expert)
    pc.add("text.dense_mlps", n_dense * 3 * d * t.intermediate_size_mlp)
    pc.add("text.lm_head", t.vocab_size * d)


def _vision(v: VisionConfig, text_hidden: int, pc: ParamCount):
    w, n_layers = v.hidden_size, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    patch_in = v.num_channels * v.patch_size**2
    layer = 4 * (w * w + w) + (w * v.intermediate_size + v.intermediate_size) \
        + (v.intermediate_size * w + w) + 2 * 2 * w  # q/k/v/o, fc1, fc2, two LayerNorms
    shuffled = int(w / v.pixel_shuffle_ratio**2)  # channels after pixel shuffle
    pc.add("vision.patch_embedding", w * patch_in, 0)
    pc.add("vision.cls_and_positions", w + (patches + 1) * w, 0)
    pc.add("vision.layernorm_pre_post", 2 * 2 * w, 0)
    pc.add("vision.encoder_layers", n_layers * layer, 0)
    pc.add("vision.adapter", shuffled * v.projector_input_dim + v.projector_output_dim**2, 0)
    pc.add("vision.projector", v.vision_output_dim * text_hidden
           + text_hidden * v.multi_modal_projector_bias, 0)


def count_params(config: Llama4Config | TextConfig) -> ParamCount:
    """Exact parameter counts by component, computed from the config's shapes."""
    if not isinstance(config, (Llama4Config, TextConfig)):
        raise TypeError(f"count_params: config={config!r}: expected a Llama4Config or TextConfig, "
                        "e.g. configs.scout() or configs.get('scout')")
    pc = ParamCount()
    text = config.text if isinstance(config, Llama4Config) else config
    _text(text, pc)
    if isinstance(config, Llama4Config) and config.vision is not None:
        _vision(config.vision, text.hidden_size, pc)
    return pc
