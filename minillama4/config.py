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

import copy
import dataclasses
import math
import numbers
import reprlib
from dataclasses import dataclass, field

from .checks import is_int

ROPE_TYPES = ("default", "llama3")
# Limits on values that validate as finite numbers but make the forward NaN or crash (Llama 4:
# attn_scale 0.1, floor_scale 8192; far inside both). attn_scale multiplies NoPE queries by
# s(p) = 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1): 1e300 is inf in float32, and inf * 0
# at the first positions is NaN; 100 keeps s below 1,700 even at 10M positions with floor_scale 1.
# floor_scale divides positions in torch (int64) and in the fused kernel: 2**80 raised OverflowError;
# an int32 is already far beyond any context (Scout advertises 10M positions, 2**23.3).
MAX_ATTN_SCALE = 100.0
MAX_FLOOR_SCALE = 2**31 - 1


# ------------------------------------------------------------------- field checks
# Every refusal reads "<Class>.<field>=<value>: <what is accepted>". Types are checked too: a string,
# a bool or a NaN would otherwise pass a comparison silently, be coerced, or fail deep in torch.

def _refuse(obj, name: str, why: str):
    raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}: {why}")


def _check_ints(obj, names, minimum: int = 1):
    for name in names:
        v = getattr(obj, name)
        if not is_int(v) or v < minimum:
            _refuse(obj, name, "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}")


def _check_reals(obj, names, positive: bool):
    """Finite numbers (NaN fails no `<=` test, so it is named here), > 0 or >= 0."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or (v <= 0 if positive else v < 0):
            _refuse(obj, name, f"must be a finite {'positive' if positive else 'non-negative'} number")


def _check_bools(obj, names):
    for name in names:
        if not isinstance(getattr(obj, name), bool):
            _refuse(obj, name, "must be True or False")


def _check_token_id(obj, name: str, vocab_size: int, value=None):
    v = getattr(obj, name) if value is None else value
    if not is_int(v) or not 0 <= v < vocab_size:
        _refuse(obj, name, f"a token id must be an integer in [0, vocab_size={vocab_size})")


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
    # generation stops at any of these: <|end_of_text|>, <|eom|>, <|eot|> (hub configs give one id or a list)
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [200001, 200007, 200008])
    pad_token_id: int | None = 200018  # <|finetune_right_pad|>

    def __post_init__(self):
        # The fields are checked before anything is derived from them: range() and int() below
        # would otherwise crash on a wrong type or round a wrong value silently.
        self._validate_fields()
        # HF stores attn_temperature_tuning as the int 4 in old configs: any nonzero int means on.
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
        if not self.no_rope_layers:
            n = self.no_rope_layer_interval
            self.no_rope_layers = [int((i + 1) % n != 0) for i in range(self.num_hidden_layers)]
        self.moe_layers = [int(i) for i in self.moe_layers]  # numpy ints -> int (checked integral above)
        self.no_rope_layers = [int(v) for v in self.no_rope_layers]
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
        """Raise ValueError naming the first bad or inconsistent field."""
        self._validate_fields()

        def bad(name: str, why: str):
            _refuse(self, name, why)

        if self.intermediate_size_mlp < 1 and len(self.moe_layers) < self.num_hidden_layers:
            bad("intermediate_size_mlp", "dense layers exist, so it must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even: RoPE rotates pairs of dimensions")
        if self.num_experts_per_tok > self.num_local_experts:
            bad("num_experts_per_tok", f"top-k exceeds num_local_experts={self.num_local_experts}")
        if self.rope_type == "llama3" and self.rope_low_freq_factor > self.rope_high_freq_factor:
            bad("rope_low_freq_factor", "need 0 < low_freq_factor <= high_freq_factor")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            bad("moe_layers", f"indices must lie in [0, {self.num_hidden_layers})")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            bad("moe_layers", "repeated layer index")
        if len(self.no_rope_layers) != self.num_hidden_layers:
            bad("no_rope_layers", f"needs exactly one entry per layer ({self.num_hidden_layers})")
        if any(v not in (0, 1) for v in self.no_rope_layers):
            bad("no_rope_layers", "entries must be 1 (RoPE layer) or 0 (NoPE layer)")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "Llama 4 has an untied lm_head; tied heads are not supported")

    def _validate_fields(self) -> None:
        """Each field alone: its type and range (validate() adds the checks across fields)."""

        def bad(name: str, why: str):
            _refuse(self, name, why)

        _check_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                           "num_experts_per_tok", "interleave_moe_layer_step", "no_rope_layer_interval",
                           "floor_scale", "rope_original_max_position_embeddings", "max_position_embeddings"))
        _check_ints(self, ("intermediate_size_mlp",), minimum=0)  # 0 is fine when every layer is MoE
        _check_reals(self, ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                            "rms_norm_eps"), positive=True)
        _check_reals(self, ("attn_scale", "initializer_range"), positive=False)  # 0 = no temperature / zero init
        # Finite and positive is not enough for these (each gave NaN logits or an OverflowError):
        if self.rope_theta <= 1:  # inv_freq = theta^(-2j/dh) is >= 1 for every pair, inf below float32's range
            bad("rope_theta", "must be > 1: the RoPE base (Llama 4 uses 500000)")
        if self.rope_factor < 1:  # llama3 divides long-wavelength frequencies by it; transformers asks >= 1 too
            bad("rope_factor", "must be >= 1: the llama3 scaling factor (Scout uses 16)")
        if self.attn_scale > MAX_ATTN_SCALE:
            bad("attn_scale", f"must be in [0, {MAX_ATTN_SCALE:g}] (Llama 4 uses 0.1; 1e300 overflowed the query scale)")
        if self.floor_scale > MAX_FLOOR_SCALE:
            bad("floor_scale", f"must be an integer in [1, 2**31 - 1 = {MAX_FLOOR_SCALE}] (Llama 4 uses 8192)")
        _check_bools(self, ("use_qk_norm", "attention_bias", "tie_word_embeddings"))
        if not isinstance(self.attn_temperature_tuning, int):  # bool, or the legacy int 4 (see __post_init__)
            bad("attn_temperature_tuning", "must be True or False (or an int, as in old config.json files)")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"unknown rope type; expected one of {ROPE_TYPES}")
        if self.attention_chunk_size is not None and (
            not is_int(self.attention_chunk_size) or self.attention_chunk_size < 1
        ):
            bad("attention_chunk_size", "must be a positive integer or None")
        for name in ("moe_layers", "no_rope_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (list, tuple)) or any(
                    isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in v)):
                bad(name, "must be None or a list of integers")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                _check_token_id(self, name, self.vocab_size)
        eos = self.eos_token_id  # hub configs hold one id or a list of them
        for token in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]):
            _check_token_id(self, "eos_token_id", self.vocab_size, token)

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
            _refuse(self, name, why)

        _check_ints(self, ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                           "intermediate_size", "image_size", "patch_size", "projector_input_dim",
                           "projector_output_dim", "vision_output_dim"))
        _check_reals(self, ("pixel_shuffle_ratio", "rope_theta"), positive=True)
        if self.rope_theta <= 1:  # as TextConfig.rope_theta: frequencies theta^(-2j/d) >= 1, inf below float32
            bad("rope_theta", "must be > 1: the RoPE base (Llama 4's vision tower uses 10000)")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_attention_heads) % 4:
            bad("num_attention_heads", "head dim must be a multiple of 4: 2D RoPE splits its pairs into x and y halves")
        if self.image_size % self.patch_size:
            bad("patch_size", f"must divide image_size={self.image_size}")
        side = self.image_size // self.patch_size
        shuffle = 1 / self.pixel_shuffle_ratio
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
        if self.multi_modal_projector_bias is not False:
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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        # A dict here (say a config.json's text_config) would only fail later, far from the cause.
        if not isinstance(self.text, TextConfig):
            raise TypeError(f"Llama4Config.text={reprlib.repr(self.text)}: must be a TextConfig "
                            "(for a config.json dict use from_hf_dict)")
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            raise TypeError(f"Llama4Config.vision={reprlib.repr(self.vision)}: must be a VisionConfig or None "
                            "(for a config.json dict use from_hf_dict)")
        # Not checked against vocab_size: text-only presets keep Scout's ids with a small vocabulary,
        # and a multimodal config whose ids lie outside it still runs text (the forward counts
        # <|patch|> tokens against the image features and names a mismatch).
        for name in ("boi_token_index", "eoi_token_index", "image_token_index"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                _refuse(self, name, "a token id must be a non-negative integer")

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


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _hf_object(value, where: str) -> dict:
    """A JSON object (a dict once parsed) of config.json, or an error saying where the bad value sits."""
    if not isinstance(value, dict):
        raise ValueError(f"config.json: {where}={value!r}: expected a JSON object")
    return value


def _as_float(v):
    """int -> float for numbers only; anything else is passed on for the dataclass to refuse by name."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _as_int(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v  # 8192.0 -> 8192; 8192.5 is refused later


def _rope_from_hf(d: dict, default_theta: float) -> dict:
    """Read RoPE settings from either config.json form into our flat rope_* fields."""
    if d.get("rope_parameters"):  # transformers 5.x
        where, scaling = "rope_parameters", _hf_object(d["rope_parameters"], "rope_parameters")
        theta = scaling.get("rope_theta", d.get("rope_theta", default_theta))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    else:  # transformers 4.x: rope_theta next to rope_scaling (null for Maverick)
        where, scaling = "rope_scaling", d.get("rope_scaling")
        theta = d.get("rope_theta", default_theta)
        if scaling is not None:
            _hf_object(scaling, where)
        rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
    # The type first: a 'linear' or 'yarn' block lacks llama3's fields, and naming those would mislead.
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: {where}.rope_type={rope_type!r} is not supported; "
                         f"expected one of {ROPE_TYPES}")
    if rope_type == "default":
        return {"rope_theta": _as_float(theta), "rope_type": "default"}
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"config.json: {where} (rope_type 'llama3') is missing the field {missing[0]!r}")
    return {
        "rope_theta": _as_float(theta),
        "rope_type": rope_type,
        "rope_factor": _as_float(scaling["factor"]),
        "rope_low_freq_factor": _as_float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": _as_float(scaling["high_freq_factor"]),
        "rope_original_max_position_embeddings": _as_int(scaling["original_max_position_embeddings"]),
    }


def text_config_from_hf(d: dict) -> TextConfig:
    _hf_object(d, "text_config")
    kwargs = {k: copy.deepcopy(d[k]) for k in _TEXT_HF_FIELDS if k in d}  # the config must not share d's lists
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"TextConfig.hidden_act={d['hidden_act']!r}: Llama 4 uses 'silu'")
    kwargs.update(_rope_from_hf(d, 500000.0))
    return TextConfig(**kwargs)


def vision_config_from_hf(d: dict) -> VisionConfig:
    _hf_object(d, "vision_config")
    kwargs = {k: d[k] for k in _VISION_HF_FIELDS if k in d}
    if d.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"VisionConfig.hidden_act={d['hidden_act']!r}: Llama 4's vision tower uses 'gelu'")
    for k in ("image_size", "patch_size"):  # HF allows [h, w]; Llama 4 tiles are square
        if isinstance(kwargs.get(k), (list, tuple)):
            if len(set(kwargs[k])) != 1:
                raise ValueError(f"VisionConfig.{k}={kwargs[k]!r}: only square sizes are supported")
            kwargs[k] = kwargs[k][0]
    kwargs["rope_theta"] = _rope_from_hf(d, 10000.0)["rope_theta"]
    return VisionConfig(**kwargs)


def from_hf_dict(d: dict) -> Llama4Config:
    """Parse a Hugging Face config.json (model_type "llama4" or "llama4_text")."""
    if not isinstance(d, dict):
        raise TypeError(f"from_hf_dict: d={reprlib.repr(d)}: expected a parsed config.json object (a dict), "
                        f"got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type == "llama4":
        if "text_config" not in d:
            raise ValueError("config.json: model_type 'llama4' needs a 'text_config'")
        # The flag may sit at the top level as well as in text_config: refuse it at either.
        if d.get("tie_word_embeddings") not in (None, False):
            raise ValueError(f"config.json: tie_word_embeddings={d['tie_word_embeddings']!r}: Llama 4 has an "
                             "untied lm_head; tied heads are not supported")
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
    # copies: the caller may edit the dict (moe_layers, no_rope_layers and eos_token_id are lists),
    # and an append there changed the config itself
    d = {k: copy.deepcopy(getattr(t, k)) for k in _TEXT_HF_FIELDS}
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
