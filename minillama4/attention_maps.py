"""Attention weights of the text model, recomputed for visualisation.

The model never materialises its attention weights (it calls scaled_dot_product_attention). To
look at them, `record_attention` runs one ordinary forward with a forward hook on the chosen
layers' `self_attn` modules; each hook takes the module's own inputs (the normed hidden states,
positions and RoPE angles) and recomputes, with the module's own weights,

    q, k = q_proj(x), k_proj(x)                       per head
    RoPE layers: rotate q, k (interleaved RoPE), then the weightless QK RMS norm (if the config has it)
    NoPE layers: q *= 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1)   (temperature tuning)
    A = softmax(q k^T / sqrt(dh) + mask)             (Vaswani et al. 2017, eq. 1)
    mask: causal, and within the chunk on chunked (RoPE) layers

exactly as minillama4.attention.Attention does. tests/test_attention_maps.py checks that
A v through o_proj reproduces each layer's attention output, so the two cannot drift apart.

    maps = record_attention(model, ids, pixel_values=px)           # model: Llama4 or Llama4Text
    maps.probs[layer]                    # [b, h, t, s] attention weights (rows sum to 1)
    maps.to_image(layer, query=-1)       # [h, tiles, side, side] weight on each image token
    maps.image_share(layer)              # [b, h, t] total weight on image tokens per query

Simplifications: a single forward without a KV cache (prefill only); q and k come from the
model's dtype, the scores and softmax are computed in fp32.

Axes: b batch, t query tokens, s key tokens, h query heads, k kv heads, g query heads per kv
head (h = k * g), dh head dim, n image tokens, side = tokens along one side of a tile,
tiles image tiles, y and x a token's row and column in its tile (side of each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange

from .attention import Attention
from .checks import is_int


@torch.no_grad()
def attention_probs(attn: Attention, x: torch.Tensor, positions: torch.Tensor,
                    freqs_cis: torch.Tensor) -> torch.Tensor:
    """The weights one Attention module applies: x [b, t, d] (its input, after the layer's
    RMSNorm) at absolute positions [t] with RoPE angles freqs_cis -> [b, h, t, t] (fp32)."""
    q, k = attn.queries(x, positions, freqs_cis), attn.keys(x, freqs_cis)  # the layer's own steps
    return attn.weights(q, k, positions, positions)


@dataclass
class AttentionMaps:
    """Attention weights of one forward. `probs[layer]` is [b, h, t, s] for each recorded layer."""

    probs: dict[int, torch.Tensor]  # layer -> [b, h, t, s] attention weights
    input_ids: torch.Tensor  # [b, t] the prompt
    is_image: torch.Tensor  # [b, t] True at <|patch|> positions (image features)
    tokens_per_tile: int | None = None  # image tokens per tile (None: text-only model)
    logits: torch.Tensor | None = field(default=None, repr=False)  # [b, t, v] the forward's output

    @property
    def layers(self) -> list[int]:
        return sorted(self.probs)

    def _probs(self, layer: int) -> torch.Tensor:
        if layer not in self.probs:
            raise ValueError(f"layer {layer!r} was not recorded; recorded layers: {self.layers} "
                             "(record_attention(..., layers=[...]) picks them)")
        return self.probs[layer]

    def _batch(self, batch: int) -> int:
        b = self.input_ids.shape[0]
        if not is_int(batch) or not -b <= batch < b:
            raise IndexError(f"batch={batch!r}: the recorded batch has {b} sequences")
        return batch

    def _query(self, query: int) -> int:
        t = self.input_ids.shape[1]
        if not -t <= query < t:
            raise IndexError(f"query {query} is outside the {t}-token prompt")
        return query % t

    def to_image(self, layer: int, query: int = -1, batch: int = 0) -> torch.Tensor:
        """[h, tiles, side, side]: how much weight the token at position `query` (default: the
        last, which predicts the first answer token) puts on each image token, laid out as the
        tiles' token grids (row-major, like the pixel shuffle's output)."""
        if self.tokens_per_tile is None:
            raise ValueError("no image tokens: record_attention was given a text-only model")
        w = self._probs(layer)[self._batch(batch), :, self._query(query)]  # [h, s]
        w = w[:, self.is_image[batch]]  # [h, n] image keys, in order
        side = math.isqrt(self.tokens_per_tile)
        return rearrange(w, "h (tiles y x) -> h tiles y x", y=side, x=side)

    def image_share(self, layer: int) -> torch.Tensor:
        """[b, h, t]: the total attention weight each query puts on image tokens."""
        return (self._probs(layer) * self.is_image[:, None, None, :]).sum(-1)


def _layers(layers, n: int) -> list[int]:
    """Layer indices checked against the model's n layers before any hook is attached (negative
    ones count from the end and are stored under their positive index)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers={layers!r}: expected a list of layer indices")
    layers = list(layers)
    bad = [i for i in layers if not is_int(i) or not -n <= i < n]
    if bad:
        raise ValueError(f"layers={layers!r}: {bad} not a layer of this {n}-layer model (0 to {n - 1})")
    return [int(i) % n for i in layers]


@torch.no_grad()
def record_attention(model, input_ids, pixel_values: torch.Tensor | None = None,
                     layers: list[int] | None = None) -> AttentionMaps:
    """Run `model` (Llama4 or Llama4Text) once on input_ids [b, t] and return the attention weights
    of `layers` (default: all). The forward itself is unchanged; hooks only read its inputs."""
    from .model import Llama4Text

    lm = getattr(model, "language_model", model)
    if not isinstance(lm, Llama4Text):
        raise TypeError(f"record_attention takes a Llama4 or Llama4Text model, got {type(model).__name__}")
    blocks = lm.model.layers
    layers = list(range(len(blocks))) if layers is None else _layers(layers, len(blocks))
    probs: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, output):
            x, positions, freqs_cis = args[:3]
            cache = args[3] if len(args) > 3 else None
            if cache is not None:
                raise ValueError("record_attention works on a plain forward, not with a KV cache")
            probs[index] = attention_probs(module, x, positions, freqs_cis).cpu()
        return fn

    handles = [blocks[i].self_attn.register_forward_hook(hook(i)) for i in layers]
    try:
        ids = model.check_ids(input_ids)
        if hasattr(model, "language_model"):
            logits = model(ids, pixel_values=pixel_values)
            is_image = ids == model.config.image_token_index
            per_tile = model.config.vision.tokens_per_tile
        else:
            if pixel_values is not None:
                raise ValueError("pixel_values given to a text-only model")
            logits, is_image, per_tile = model(ids), torch.zeros_like(ids, dtype=torch.bool), None
    finally:
        for h in handles:
            h.remove()
    return AttentionMaps(probs, ids.cpu(), is_image.cpu(), per_tile, logits)
