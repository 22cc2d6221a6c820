"""The Llama 4 vision tower: image tiles -> features ready to sit in the text sequence.

    tile [3, S, S] -> patches (unfold, linear, no bias) -> append CLS (LAST, not first)
    -> + learned positions -> LayerNorm -> ViT layers (pre-LN, biases, 2D RoPE, GELU MLP)
    -> LayerNorm -> drop CLS -> pixel shuffle (2x2 neighbours -> one token, 4x channels)
    -> adapter (fc1, GELU, fc2, GELU) -> [tiles, tokens_per_tile, projector_output_dim]
The multimodal projector (in model.py) maps these to the text width.

Axes (einops names used in this file):
  n tiles, c colour channels, gh gw patch-grid rows / columns, ph pw pixels in a patch,
  p patches (+1 with the CLS token), w vision width, h heads, dh head dim, j rotary pair,
  two = a pair's halves, dgh dgw = neighbours merged by the pixel shuffle

Simplifications: none in the math; attention weights are not returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VisionConfig


def vision_rope_angles(cfg: VisionConfig, device=None) -> torch.Tensor:
    """2D RoPE as unit complex numbers [p + 1, dh / 2]: for patch (row y, column x), 1-based,
    pairs j < dh/4 rotate by (x + 1) * f_j and pairs j >= dh/4 by (y + 1) * f_j, with
    f_j = theta^(-2j / (dh/2)). The CLS token (last) gets angle 0: it is not rotated.
    (as transformers' Llama4VisionRotaryEmbedding: the vision tower's parity tests in tests/test_vision.py
    go through these angles)"""
    side = cfg.image_size // cfg.patch_size
    dh = cfg.hidden_size // cfg.num_attention_heads
    quarter = dh // 4
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, device=device).float() * 2 / (dh // 2)))
    idx = torch.arange(side * side, device=device)
    x, y = idx % side, idx // side  # column first: llama.cpp found (y, x) gives incoherent output
    angles = torch.cat([(x + 1)[:, None] * freqs, (y + 1)[:, None] * freqs], dim=-1).float()
    angles = torch.cat([angles, torch.zeros(1, 2 * quarter, device=device)])  # CLS row: no rotation
    return torch.polar(torch.ones_like(angles), angles)


def apply_vision_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [n, p, h, dh] by freqs_cis [p, dh/2] (fp32, cast back)."""
    pairs = torch.view_as_complex(rearrange(x.float(), "n p h (j two) -> n p h j two", two=2).contiguous())
    rotated = pairs * rearrange(freqs_cis, "p j -> 1 p 1 j")
    return rearrange(torch.view_as_real(rotated), "n p h j two -> n p h (j two)").type_as(x)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n, gh*gw, w] -> [n, gh*gw*ratio^2, w/ratio^2]: each block of r x r neighbouring patches
    (r = 1/ratio) becomes one token whose channels are ordered (row in block, column in block, w)."""
    r = round(1 / ratio)
    side = round(x.shape[1] ** 0.5)
    return rearrange(x, "n (gh dgh gw dgw) w -> n (gh gw) (dgh dgw w)", dgh=r, dgw=r, gh=side // r)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w, self.h = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(w, w), nn.Linear(w, w)
        self.v_proj, self.o_proj = nn.Linear(w, w), nn.Linear(w, w)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "n p (h dh) -> n p h dh", h=self.h)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_vision_rope(q, freqs_cis), apply_vision_rope(k, freqs_cis)
        q, k, v = (rearrange(t, "n p h dh -> n h p dh") for t in (q, k, v))
        # bidirectional: every patch sees every patch of its tile (and the CLS token)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(rearrange(o, "n h p dh -> n p (h dh)"))


class VisionMLP(nn.Module):
    """fc2(gelu(fc1(x))), with biases and exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, out: int, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, freqs_cis):
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis)
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbedding(nn.Module):
    """Cut a tile into patch_size x patch_size patches and project each: a Conv2d with
    stride = kernel, written as unfold + linear like the checkpoint stores it."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        patches = rearrange(tiles, "n c (gh ph) (gw pw) -> n (gh gw) (c ph pw)", ph=self.patch, pw=self.patch)
        return self.linear(patches)


class VisionAdapter(nn.Module):
    """Pixel shuffle, then gelu(fc2(gelu(fc1(x)))): note the GELU after fc2 too."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = VisionMLP(cfg.intermediate_size, cfg.projector_input_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.mlp(pixel_shuffle(x, self.ratio)))


class VisionEncoder(nn.Module):
    """Named `model` inside the vision model, as in the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(n_patches + 1, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = VisionAdapter(cfg)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        c, s = self.cfg.num_channels, self.cfg.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = f"dtype {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise TypeError(f"pixel_values must be a float tensor [tiles, channels, size, size] (normalised, as "
                            f"minillama4.image.prepare returns it), got {got}")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c:
            raise ValueError(f"pixel_values must have shape [tiles, {c}, {s}, {s}], got {tuple(pixel_values.shape)}"
                             f"{' (wrong channel count)' if pixel_values.dim() == 4 else ''}")
        if tuple(pixel_values.shape[2:]) != (s, s):
            raise ValueError(f"tiles are {tuple(pixel_values.shape[2:])} pixels but this model takes {s}x{s} "
                             "tiles: preprocess images with minillama4.image.preprocess")
        # One NaN or inf pixel makes every logit NaN (attention mixes it into every token), and greedy
        # decoding of NaN logits returns token 0 without a word.
        bad = int((~pixel_values.isfinite()).sum())
        if bad:
            raise ValueError(f"pixel_values has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) in "
                             f"{pixel_values.numel()}: expected finite normalised pixels, as "
                             "minillama4.image.prepare returns them")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, c, S, S] -> [tiles, tokens_per_tile, projector_output_dim]."""
        self.check_pixels(pixel_values)
        x = self.patch_embedding(pixel_values.to(self.class_embedding.dtype))
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # CLS appended LAST
        x = self.layernorm_pre(x)
        freqs_cis = vision_rope_angles(self.cfg, x.device)
        for layer in self.model.layers:
            x = layer(x, freqs_cis)
        x = self.layernorm_post(x)[:, :-1]  # drop the CLS token
        return self.vision_adapter(x)
