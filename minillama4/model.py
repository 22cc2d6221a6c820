"""The Llama 4 text model: embeddings, decoder layers, final norm, lm_head.

    h = embed(ids)
    for each layer:  h = h + attention(norm(h))      RoPE+chunked or NoPE+temperature (attention.py)
                     h = h + ffn(norm(h))            MoE (moe.py) or dense SwiGLU (Maverick's even layers)
    logits = lm_head(norm(h))

Module names match the Hugging Face state dicts (`Llama4ForCausalLM`: `model.layers.0.self_attn.q_proj`,
`lm_head`; `Llama4ForConditionalGeneration`: the same under `language_model.`, plus `vision_model.*` and
`multi_modal_projector.*`), so checkpoints load without renaming.
Axes: b batch, t tokens, d model dim, v vocab, n image tiles, p tokens per tile, w vision feature width.
"""

from __future__ import annotations

import dataclasses
import reprlib

import torch
from einops import rearrange
from torch import nn

from .attention import Attention, KVCache
from .checks import check_seed
from .config import Llama4Config, TextConfig
from .devices import as_device, as_dtype
from .layers import RMSNorm, SwiGLU, add_rms_norm, rope_angles, rope_inv_freq
from .moe import DISPATCH_MODES, MoE


def _check_config(cls, config, multimodal: bool = False) -> None:
    if multimodal and not isinstance(config, Llama4Config):
        raise TypeError(f"{cls.__name__}({reprlib.repr(config)}): pass a Llama4Config with a vision config, "
                        "e.g. minillama4.configs.tiny_multimodal() (Llama4Text reads text only)")
    if not isinstance(config, (TextConfig, Llama4Config)):
        raise TypeError(f"{cls.__name__}({reprlib.repr(config)}): pass a TextConfig or Llama4Config, "
                        "e.g. minillama4.configs.tiny()")
    # configs are checked when made, but their fields can be changed afterwards (cfg.text.num_hidden_layers
    # = 6 leaves 4 entries in no_rope_layers): check again, or the forward fails far from the cause
    configs = (config.text, config.vision, config) if isinstance(config, Llama4Config) else (config,)
    try:
        for c in configs:
            if c is not None:
                c.validate()
    except ValueError as e:
        remake = ("config.replace_text(num_hidden_layers=6)" if isinstance(config, Llama4Config) else
                  "dataclasses.replace(config, num_hidden_layers=6, moe_layers=None, no_rope_layers=None)")
        raise ValueError(f"{e} (a field changed after the config was made? Make a new one instead, e.g. {remake}, "
                         "which derives moe_layers and no_rope_layers again)") from None


def _random_args(config, seed, dtype, device):
    """Check Llama4Text.random's and Llama4.random's arguments, and that the weights fit, before
    anything is allocated: (dtype, device) as torch objects."""
    from .plan import check_weights_fit

    check_seed(seed)
    dtype, device = as_dtype(dtype), as_device(device)
    check_weights_fit(config, dtype, device)
    return dtype, device


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg, layer) if cfg.is_moe(layer) else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(self, h, positions, freqs_cis, cache=None, router_outputs=None):
        # h = h + attention(norm(h)); x = norm(h)   (the add and the second norm: one kernel on CUDA)
        h, x = add_rms_norm(h, self.self_attn(self.input_layernorm(h), positions, freqs_cis, cache),
                            self.post_attention_layernorm)
        if isinstance(self.feed_forward, MoE):
            return h + self.feed_forward(x, router_outputs)
        return h + self.feed_forward(x)


class TextBackbone(nn.Module):
    """Named `model` inside Llama4Text, as in Hugging Face."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama4Text(nn.Module):
    """Llama 4 language model (Hugging Face `Llama4ForCausalLM`): model(ids) -> logits [b, t, v]."""

    def __init__(self, config: TextConfig | Llama4Config):
        super().__init__()
        _check_config(type(self), config)
        self.config = config if isinstance(config, Llama4Config) else Llama4Config(text=config, vision=None)
        self.cfg = self.config.text
        self.model = TextBackbone(self.cfg)
        self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
        self.trace = None  # the active RouterTrace, if any

    # ----------------------------------------------------------------- construction
    @classmethod
    def random(cls, config, seed: int = 0, dtype=torch.float32, device="cpu") -> "Llama4Text":
        """Random weights like Hugging Face's init: normal(0, initializer_range), norms at 1
        (Hugging Face also zeroes the pad token's embedding row; we do not, which only changes what
        a random model says after a pad token).
        dtype: a torch.dtype or a name ("bf16", "float32", ...: devices.DTYPES). Refused up front
        (MemoryPlanError, saying how much is needed) if the weights do not fit on the device."""
        _check_config(cls, config)
        if isinstance(config, Llama4Config):  # only the text model is built
            dtype, device = _random_args(dataclasses.replace(config, vision=None), seed, dtype, device)
        else:
            dtype, device = _random_args(config, seed, dtype, device)
        torch.manual_seed(seed)
        model = cls(config).to(device=device, dtype=dtype)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self):
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def set_dispatch(self, mode: str) -> "Llama4Text":
        """Choose the MoE dispatch path: "fast" (default), "reference" (loop over experts) or
        "gather" (weights gathered per token by index: for decode, no host sync; see moe.py)."""
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch={mode!r}: expected one of {DISPATCH_MODES}")
        for m in self.modules():
            if isinstance(m, MoE):
                m.dispatch = mode
        return self

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int, ring: bool = True) -> KVCache:
        """A KV cache for `max_len` positions; chunked layers keep only a ring of one chunk."""
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, ring)

    def check_cache(self, cache) -> KVCache:
        """`cache` if it is a KVCache made for this model (layout, dtype, device), else a clear error."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache={cache!r}: expected a KVCache from model.new_cache(batch, max_len)")
        cache.check_model(self.cfg, self.dtype, self.device)
        return cache

    # ----------------------------------------------------------------- forward
    def check_ids(self, input_ids) -> torch.Tensor:
        """Token ids (tensor or nested lists, [b, t] or [t], any integer dtype) -> [b, t] on the
        model's device, int32 or int64; anything else is refused before any work."""
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"input_ids={input_ids!r}: expected token ids as a tensor or (nested) lists of "
                                f"integers, rows of equal length ({e})") from None
        if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:  # before the dtype: [] is a float tensor
            raise ValueError(f"input_ids must have shape [batch, tokens] (or [tokens]) with batch > 0 and "
                             f"tokens > 0, got {tuple(input_ids.shape)}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dtype not in (torch.int32, torch.int64):  # the embedding takes only these two
            input_ids = input_ids.long()
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size={self.cfg.vocab_size}")
        return input_ids.to(self.device)

    def _check_extras(self, b: int, t: int, inputs_embeds, is_image, router_outputs) -> None:
        """forward's optional inputs must match the ids: [b, t, d] floats, a [b, t] bool mask, a list."""
        want = (b, t, self.cfg.hidden_size)
        if inputs_embeds is not None and not (isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.is_floating_point()
                                              and tuple(inputs_embeds.shape) == want):
            raise ValueError(f"inputs_embeds={_describe(inputs_embeds)}: expected a float tensor of shape {want} "
                             "(the ids' batch and tokens, hidden_size)")
        if is_image is not None and not (isinstance(is_image, torch.Tensor) and is_image.dtype == torch.bool
                                         and tuple(is_image.shape) == (b, t)):
            raise ValueError(f"is_image={_describe(is_image)}: expected a torch.bool tensor of shape {(b, t)} (the ids' shape)")
        if router_outputs is not None and not isinstance(router_outputs, list):
            raise TypeError(f"router_outputs={router_outputs!r}: pass a list to receive the router outputs, or None")

    def forward(self, input_ids, cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                is_image: torch.Tensor | None = None, router_outputs: list | None = None) -> torch.Tensor:
        """input_ids [b, t] (or [t]) -> logits [b, t, v]. With a cache, positions continue from
        cache.length and the cache advances by t. `inputs_embeds` replaces the embedding lookup
        (early fusion puts image features there); `is_image` marks those tokens for the trace.
        Pass a list as `router_outputs` to receive (layer, logits, top_ids, gates) per MoE layer
        with gradients (for balancing losses; see moe.py)."""
        input_ids = self.check_ids(input_ids)
        b, t = input_ids.shape
        self._check_extras(b, t, inputs_embeds, is_image, router_outputs)
        start = 0
        if cache is not None:
            self.check_cache(cache).check_room(t, b)
            start = cache.length
        positions = torch.arange(start, start + t, device=self.device)
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.trace is not None:
            self.trace.begin(input_ids, positions, torch.zeros_like(input_ids, dtype=torch.bool) if is_image is None else is_image)
        freqs_cis = rope_angles(positions, rope_inv_freq(self.cfg, self.device))
        for layer in self.model.layers:
            h = layer(h, positions, freqs_cis, cache, router_outputs)
        if cache is not None:
            cache.length += t
        return self.lm_head(self.model.norm(h))

    # ----------------------------------------------------------------- conveniences
    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy by default; see minillama4.generate.generate for sampling and stop tokens."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face directory (config.json + safetensors) that transformers loads."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)


class Projector(nn.Module):
    """Vision features -> text width (Hugging Face `multi_modal_projector.linear_1`)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        v = config.vision
        self.linear_1 = nn.Linear(v.vision_output_dim, config.text.hidden_size, bias=v.multi_modal_projector_bias)

    def forward(self, x):
        return self.linear_1(x)


class Llama4(nn.Module):
    """Llama 4 with early fusion (Hugging Face `Llama4ForConditionalGeneration`):
    model(ids, pixel_values) -> logits [b, t, v]. Image tiles go through the vision tower and
    the projector; the results replace, in order, the embeddings of the <|patch|> tokens of the
    prompt. Every other token, image markers included, keeps its text embedding, and from there
    on image and text tokens are one sequence through the same decoder (same attention, same
    experts)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        from .vision import VisionModel

        _check_config(type(self), config, multimodal=True)
        if config.vision is None:
            raise ValueError("Llama4 needs config.vision; use Llama4Text for a text-only model")
        for name in ("boi_token_index", "eoi_token_index", "image_token_index"):  # (config.py checks >= 0)
            if getattr(config, name) >= config.text.vocab_size:  # no prompt could ever carry an image
                raise ValueError(f"Llama4Config.{name}={getattr(config, name)} is not a row of the "
                                 f"{config.text.vocab_size}-token embedding table (text.vocab_size); a text-only "
                                 "model (Llama4Text, or from_pretrained(..., text_only=True)) does not read it")
        self.config, self.cfg = config, config.text
        self.vision_model = VisionModel(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = Llama4Text(config)

    @classmethod
    def random(cls, config: Llama4Config, seed: int = 0, dtype=torch.float32, device="cpu") -> "Llama4":
        """Random weights: text as Llama4Text.random; vision linears normal(0, initializer_range),
        CLS and positional embeddings normal(0, width^-0.5), LayerNorms at (1, 0)."""
        _check_config(cls, config, multimodal=True)
        dtype, device = _random_args(config, seed, dtype, device)
        torch.manual_seed(seed)
        model = cls(config).to(device=device, dtype=dtype)
        model.language_model.init_weights()
        std = config.text.initializer_range
        with torch.no_grad():
            for name, p in list(model.vision_model.named_parameters()) + list(model.multi_modal_projector.named_parameters()):
                if "layernorm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif name in ("class_embedding", "positional_embedding_vlm"):
                    p.normal_(0.0, config.vision.hidden_size**-0.5)
                else:
                    p.normal_(0.0, std)
        return model

    # the text model's conveniences, so generate() and RouterTrace treat both models alike
    trace = property(lambda self: self.language_model.trace)
    device = property(lambda self: self.language_model.device)
    dtype = property(lambda self: self.language_model.dtype)

    def set_dispatch(self, mode: str) -> "Llama4":
        self.language_model.set_dispatch(mode)
        return self

    def new_cache(self, batch: int, max_len: int, ring: bool = True) -> KVCache:
        return self.language_model.new_cache(batch, max_len, ring)

    def check_ids(self, input_ids):
        return self.language_model.check_ids(input_ids)

    def check_cache(self, cache) -> KVCache:
        return self.language_model.check_cache(cache)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles * tokens_per_tile, text width], in prompt order."""
        feats = self.vision_model(pixel_values)
        return self.multi_modal_projector(rearrange(feats, "n p w -> (n p) w"))

    def forward(self, input_ids, pixel_values: torch.Tensor | None = None, cache: KVCache | None = None,
                router_outputs: list | None = None) -> torch.Tensor:
        input_ids = self.check_ids(input_ids)
        self.language_model._check_extras(*input_ids.shape, None, None, router_outputs)
        if cache is not None:  # before the vision tower runs
            self.check_cache(cache).check_room(input_ids.shape[1], input_ids.shape[0])
        is_patch = input_ids == self.config.image_token_index
        n_patch = int(is_patch.sum())
        h = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is not None:
            self.vision_model.check_pixels(pixel_values)  # type, shape and finite values, before the vision tower runs
            per_tile = self.config.vision.tokens_per_tile
            if pixel_values.shape[0] * per_tile != n_patch:
                raise ValueError(f"the prompt has {n_patch} <|patch|> tokens but the images give "
                                 f"{pixel_values.shape[0] * per_tile} features ({pixel_values.shape[0]} tiles x "
                                 f"{per_tile}); expand the prompt with minillama4.image.image_prompt for each image")
            feats = self.image_features(pixel_values.to(self.device)).to(h.dtype)
            # early fusion: <|patch|> embeddings are replaced in order (batch-major), nothing else
            h = h.masked_scatter(is_patch[..., None], feats)
        elif n_patch:
            raise ValueError(f"the prompt has {n_patch} <|patch|> tokens but no pixel_values were given")
        return self.language_model(input_ids, cache=cache, inputs_embeds=h, is_image=is_patch,
                                   router_outputs=router_outputs)

    def generate(self, input_ids, max_new_tokens: int, pixel_values: torch.Tensor | None = None, **kwargs):
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, pixel_values=pixel_values, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)
