"""Configs for the Llama 4 family: dataclasses, presets, validation, Hugging Face config.json.

Field names follow the Hugging Face `config.json` (`Llama4TextConfig`, `Llama4VisionConfig`,
`Llama4Config`), so a learner can put the two side by side. Only fields that change the math or
the checkpoint shapes are kept; `from_hf_dict` ignores the rest (dropout, tp plans, ...).

Both config.json forms are read and written:
  legacy (transformers 4.x):  "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", ...} or null
  current (transformers 5.x): "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, ...}

Simplifications: no padding-token embedding masking (HF's padding_idx has no forward effect);
`hidden_act` must be "silu" (text) and "gelu" (vision), the only values the checkpoints use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROPE_TYPES = ("default", "llama3")


@dataclass
class TextConfig:
    """The language model. Defaults are Llama 4 Scout (17B active, 16 experts)."""

    vocab_size: int = 202048  # rows of embed_tokens and lm_head: 200,000 BPE + 2,048 special slots
    hidden_size: int = 5120  # d, the residual stream width
    intermediate_size: int = 8192  # f, hidden width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 16384  # hidden width of the dense SwiGLU in non-MoE layers (Maverick)
    num_hidden_layers: int = 48  # decoder layers
    num_attention_heads: int = 40  # h, query heads
    num_key_value_heads: int = 8  # k, key/value heads (GQA: h // k query heads share one kv head)
    head_dim: int = 128  # dh, width of one head (RoPE rotates pairs, so it must be even)
    num_local_experts: int = 16  # e, routed experts per MoE layer
    num_experts_per_tok: int = 1  # top-k experts per token (Llama 4 ships 1)
    interleave_moe_layer_step: int = 1  # every step-th layer is MoE (Scout 1 = all, Maverick 2 = odd)
    moe_layers: list[int] | None = None  # explicit MoE layer indices; None derives them from the step
    no_rope_layer_interval: int = 4  # every interval-th layer is a NoPE layer (3, 7, 11, ...)
    no_rope_layers: list[int] | None = None  # per layer 1 = RoPE, 0 = NoPE; None/[] derives from interval
    attention_chunk_size: int | None = 8192  # RoPE layers attend within chunks of this size; None = full
    use_qk_norm: bool = True  # weightless RMS norm on q and k after RoPE, RoPE layers only (Scout)
    attn_temperature_tuning: bool = True  # scale NoPE-layer queries up with position (long context)
    floor_scale: int = 8192  # temperature: s = 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1)
    attn_scale: float = 0.1  # temperature strength (see floor_scale)
    rope_theta: float = 500000.0  # RoPE base
    rope_type: str = "llama3"  # "default" (plain RoPE, Maverick) or "llama3" (frequency scaling, Scout)
    rope_factor: float = 16.0  # llama3: long wavelengths are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above orig / low are scaled fully
    rope_high_freq_factor: float = 1.0  # llama3: wavelengths below orig / high are left alone
    rope_original_max_position_embeddings: int = 8192  # llama3: the pre-training context length
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm, QK norm included
    attention_bias: bool = False  # biases on q/k/v/o projections (False in every Llama 4 checkpoint)
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' matrix (False in Llama 4)
    max_position_embeddings: int = 10485760  # advertised context; not used by the math
    initializer_range: float = 0.02  # std of the normal init for random weights
    bos_token_id: int | None = 200000  # <|begin_of_text|>
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int | None = 200018  # <|finetune_right_pad|>

    def __post_init__(self):
        # HF stores attn_temperature_tuning as the int 4 in old configs: any truthy value means on.
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self.use_qk_norm = bool(self.use_qk_norm)
        if self.moe_layers is None and self.interleave_moe_layer_step >= 1:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
        if not self.no_rope_layers and self.no_rope_layer_interval >= 1:
            n = self.no_rope_layer_interval
            self.no_rope_layers = [int((i + 1) % n != 0) for i in range(self.num_hidden_layers)]
        self.moe_layers = [int(i) for i in self.moe_layers or []]
        self.no_rope_layers = [int(v) for v in self.no_rope_layers or []]
        self.validate()

    # ---------------------------------------------------------------- derived views
    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers use chunked attention; NoPE layers use full causal attention."""
        return self.uses_rope(layer) and self.attention_chunk_size is not None

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""

        def bad(name: str, why: str):
            raise ValueError(f"TextConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok", "interleave_moe_layer_step", "no_rope_layer_interval",
                     "floor_scale", "rope_original_max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.intermediate_size_mlp < 1 and len(self.moe_layers) < self.num_hidden_layers:
            bad("intermediate_size_mlp", "dense layers exist, so it must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even: RoPE rotates pairs of dimensions")
        if self.num_experts_per_tok > self.num_local_experts:
            bad("num_experts_per_tok", f"top-k exceeds num_local_experts={self.num_local_experts}")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"unknown rope type; expected one of {ROPE_TYPES}")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be positive")
        if self.rope_type == "llama3":
            if self.rope_factor <= 0:
                bad("rope_factor", "must be positive")
            if not 0 < self.rope_low_freq_factor <= self.rope_high_freq_factor:
                bad("rope_low_freq_factor", "need 0 < low_freq_factor <= high_freq_factor")
        if self.attention_chunk_size is not None and (
            not isinstance(self.attention_chunk_size, int) or self.attention_chunk_size < 1
        ):
            bad("attention_chunk_size", "must be a positive integer or None")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            bad("moe_layers", f"indices must lie in [0, {self.num_hidden_layers})")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            bad("moe_layers", "repeated layer index")
        if len(self.no_rope_layers) < self.num_hidden_layers:
            bad("no_rope_layers", f"needs one entry per layer ({self.num_hidden_layers})")
        if any(v not in (0, 1) for v in self.no_rope_layers):
            bad("no_rope_layers", "entries must be 1 (RoPE layer) or 0 (NoPE layer)")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be positive")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "Llama 4 has an untied lm_head; tied heads are not supported")


@dataclass
class VisionConfig:
    """The vision tower (identical in Scout and Maverick). Defaults are the checkpoint values,
    which differ from the HF class defaults (hidden 768, image 448, output 7680)."""

    hidden_size: int = 1408  # ViT width
    num_hidden_layers: int = 34  # ViT encoder layers
    num_attention_heads: int = 16  # ViT heads (head dim 88)
    num_channels: int = 3  # RGB
    intermediate_size: int = 5632  # ViT MLP width (= 4 * 1408; also the adapter's input width)
    image_size: int = 336  # tile side in pixels
    patch_size: int = 14  # patch side in pixels (24 x 24 patches per tile)
    norm_eps: float = 1e-5  # LayerNorm epsilon: must be 1e-5 (Meta's and transformers' code use LayerNorm's default)
    pixel_shuffle_ratio: float = 0.5  # 2x2 neighbouring patches merged into one token
    projector_input_dim: int = 4096  # adapter fc1 output width
    projector_output_dim: int = 4096  # adapter fc2 output width
    vision_output_dim: int = 4096  # input width of the multimodal projector
    rope_theta: float = 10000.0  # base of the 2D vision RoPE
    multi_modal_projector_bias: bool = False  # bias on the projector: must be False (no bias in Meta's or transformers' code)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"VisionConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "intermediate_size", "image_size", "patch_size", "projector_input_dim",
                     "projector_output_dim", "vision_output_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_attention_heads) % 4:
            bad("num_attention_heads", "head dim must be a multiple of 4: 2D RoPE splits its pairs into x and y halves")
        if self.image_size % self.patch_size:
            bad("patch_size", f"must divide image_size={self.image_size}")
        side = self.image_size // self.patch_size
        shuffle = 1 / self.pixel_shuffle_ratio if self.pixel_shuffle_ratio > 0 else 0
        if shuffle < 1 or abs(shuffle - round(shuffle)) > 1e-6 or side % round(shuffle):
            bad("pixel_shuffle_ratio", f"1/ratio must divide the {side}-patch grid side")
        # The adapter's input is the pixel-shuffled width; Llama 4 (and transformers) size it with
        # intermediate_size, and chain adapter -> projector with equal widths.
        if self.intermediate_size != round(self.hidden_size * shuffle**2):
            bad("intermediate_size", f"must equal hidden_size / pixel_shuffle_ratio^2 = {round(self.hidden_size * shuffle**2)}")
        if self.projector_output_dim != self.projector_input_dim:
            bad("projector_output_dim", f"must equal projector_input_dim={self.projector_input_dim}")
        if self.vision_output_dim != self.projector_output_dim:
            bad("vision_output_dim", f"must equal projector_output_dim={self.projector_output_dim}")
        # Two fields the checkpoints' config.json carries but no implementation reads: transformers
        # (and Meta's code) build the vision LayerNorms with the default eps 1e-5 and the projector
        # without a bias. Honouring other values would silently disagree with them on the same weights.
        if self.norm_eps != 1e-5:
            bad("norm_eps", "Llama 4's vision LayerNorms use eps 1e-5 whatever the config says (transformers and "
                            "Meta's code ignore this field); only 1e-5 is supported")
        if self.multi_modal_projector_bias:
            bad("multi_modal_projector_bias", "Llama 4's multimodal projector has no bias in transformers or Meta's "
                                              "code (a bias would be dropped on loading there); only False is supported")

    @property
    def tokens_per_tile(self) -> int:
        """Text-side tokens one tile becomes: (image/patch)^2 patches, pixel shuffle merges ratio^-2."""
        return round((self.image_size // self.patch_size) ** 2 * self.pixel_shuffle_ratio**2)


@dataclass
class Llama4Config:
    """A whole Llama 4 model: text (always) and vision (None for text-only models)."""

    text: TextConfig = field(default_factory=TextConfig)  # the language model
    vision: VisionConfig | None = field(default_factory=VisionConfig)  # None = text only
    boi_token_index: int = 200080  # <|image_start|>
    eoi_token_index: int = 200081  # <|image_end|>
    image_token_index: int = 200092  # <|patch|>: these positions receive image features
    name: str = "custom"  # preset name, for printing

    def replace_text(self, **changes) -> "Llama4Config":
        """A copy with some text fields changed (validated again). The derived layer lists
        (moe_layers, no_rope_layers) are derived again when the depth or their step changes,
        unless they are given explicitly."""
        if {"num_hidden_layers", "interleave_moe_layer_step"} & changes.keys():
            changes.setdefault("moe_layers", None)
        if {"num_hidden_layers", "no_rope_layer_interval"} & changes.keys():
            changes.setdefault("no_rope_layers", None)
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **changes))


# ------------------------------------------------------------------- Hugging Face config.json

_TEXT_HF_FIELDS = [f.name for f in dataclasses.fields(TextConfig) if not f.name.startswith("rope_")]
_VISION_HF_FIELDS = [f.name for f in dataclasses.fields(VisionConfig) if f.name != "rope_theta"]


def _rope_from_hf(d: dict, default_theta: float) -> dict:
    """Read RoPE settings from either config.json form into our flat rope_* fields."""
    if d.get("rope_parameters"):  # transformers 5.x
        rp = dict(d["rope_parameters"])
        theta = rp.get("rope_theta", d.get("rope_theta", default_theta))
        scaling = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None
    else:  # transformers 4.x: rope_theta next to rope_scaling (null for Maverick)
        theta = d.get("rope_theta", default_theta)
        scaling = d.get("rope_scaling")
    if not scaling:
        return {"rope_theta": float(theta), "rope_type": "default"}
    return {
        "rope_theta": float(theta),
        "rope_type": scaling.get("rope_type", scaling.get("type")),
        "rope_factor": float(scaling["factor"]),
        "rope_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
    }


def text_config_from_hf(d: dict) -> TextConfig:
    kwargs = {k: d[k] for k in _TEXT_HF_FIELDS if k in d}
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"TextConfig.hidden_act={d['hidden_act']!r}: Llama 4 uses 'silu'")
    try:
        kwargs.update(_rope_from_hf(d, 500000.0))
    except KeyError as e:
        raise ValueError(f"config.json: rope scaling is missing the field {e.args[0]!r}") from None
    return TextConfig(**kwargs)


def vision_config_from_hf(d: dict) -> VisionConfig:
    kwargs = {k: d[k] for k in _VISION_HF_FIELDS if k in d}
    for k in ("image_size", "patch_size"):  # HF allows [h, w]; Llama 4 tiles are square
        if isinstance(kwargs.get(k), (list, tuple)):
            if len(set(kwargs[k])) != 1:
                raise ValueError(f"VisionConfig.{k}={kwargs[k]!r}: only square sizes are supported")
            kwargs[k] = kwargs[k][0]
    kwargs["rope_theta"] = float(_rope_from_hf(d, 10000.0)["rope_theta"])
    return VisionConfig(**kwargs)


def from_hf_dict(d: dict) -> Llama4Config:
    """Parse a Hugging Face config.json (model_type "llama4" or "llama4_text")."""
    model_type = d.get("model_type")
    if model_type == "llama4":
        if "text_config" not in d:
            raise ValueError("config.json: model_type 'llama4' needs a 'text_config'")
        vision = vision_config_from_hf(d["vision_config"]) if d.get("vision_config") else None
        keep = ("boi_token_index", "eoi_token_index", "image_token_index")
        return Llama4Config(text=text_config_from_hf(d["text_config"]), vision=vision,
                            **{k: d[k] for k in keep if k in d})
    if model_type == "llama4_text":
        return Llama4Config(text=text_config_from_hf(d), vision=None)
    raise ValueError(f"config.json: model_type={model_type!r} is not a Llama 4 model "
                     "(expected 'llama4' or 'llama4_text')")


def _rope_to_hf(rope: dict, form: str) -> dict:
    if form == "legacy":
        if rope["rope_type"] == "default":
            return {"rope_theta": rope["rope_theta"], "rope_scaling": None}
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}
    if form == "v5":
        return {"rope_parameters": dict(rope)}
    raise ValueError(f"form={form!r}: expected 'v5' or 'legacy'")


def text_config_to_hf(t: TextConfig, form: str = "v5") -> dict:
    d = {k: getattr(t, k) for k in _TEXT_HF_FIELDS}
    d["hidden_act"] = "silu"
    rope = {"rope_type": t.rope_type, "rope_theta": t.rope_theta}
    if t.rope_type == "llama3":
        rope.update(factor=t.rope_factor, low_freq_factor=t.rope_low_freq_factor,
                    high_freq_factor=t.rope_high_freq_factor,
                    original_max_position_embeddings=t.rope_original_max_position_embeddings)
    d.update(_rope_to_hf(rope, form))
    return d


def to_hf_dict(cfg: Llama4Config, form: str = "v5", text_only: bool | None = None,
               dtype: str = "bfloat16") -> dict:
    """Write a Hugging Face config.json dict. `form` is "v5" (rope_parameters) or "legacy"
    (rope_theta + rope_scaling, as the hub files written with transformers 4.51). We always write
    attn_temperature_tuning as a bool: transformers 5.x rejects the int 4 that old configs hold.
    `dtype` is the stored weights' dtype (transformers loads in it by default)."""
    text = text_config_to_hf(cfg.text, form)
    text_only = cfg.vision is None if text_only is None else text_only
    if text_only:
        return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
                "torch_dtype": dtype, **text}
    v = cfg.vision
    vision = {k: getattr(v, k) for k in _VISION_HF_FIELDS}
    vision.update(hidden_act="gelu", model_type="llama4_vision_model")
    vision.update(_rope_to_hf({"rope_type": "default", "rope_theta": v.rope_theta}, form))
    vision.pop("rope_scaling", None)
    return {
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "torch_dtype": dtype, "boi_token_index": cfg.boi_token_index,
        "eoi_token_index": cfg.eoi_token_index, "image_token_index": cfg.image_token_index,
        "tie_word_embeddings": False,
        "text_config": {"model_type": "llama4_text", **text}, "vision_config": vision,
    }
