"""Building blocks: RMSNorm, the weightless QK norm, interleaved RoPE with llama3 scaling, SwiGLU.

Axes (einops names used in this file):
  b batch, t tokens, h heads, dh head dim, j rotary pair (dh = 2 * j), two = the pair's two halves

Numerics follow Hugging Face transformers' Llama 4 so bf16 results agree: norms and RoPE compute
in fp32 and cast back to the input dtype before any weight multiply. On CUDA, inference runs the
norms and RoPE as one fused Triton kernel each (fused.py), the same math.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextConfig


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32, cast back to x's dtype.
    Used weightless as Llama 4's "L2Norm" on q and k: it is an RMS norm, not a unit-length norm."""
    if fused_ok(x, kernel="rms_norm"):
        return _fused().rms_norm(x, None, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def fused_ok(x: torch.Tensor, *others: torch.Tensor, kernel: str) -> bool:
    """Whether the fused Triton kernel `kernel` (fused.py: the same math as the readable code here)
    takes this step: on CUDA (or under Triton's interpreter, how the CPU tests run them), only
    when no gradient is needed, since they have no backward, and if the kernel is switched on
    (fused.KERNELS, from MINILLAMA4_FUSED)."""
    if not (x.is_cuda or _INTERPRET):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    return _fused().available(x, kernel)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation silu(gate) * up (one fused kernel on CUDA without gradients)."""
    if fused_ok(gate, up, kernel="silu_mul"):
        return _fused().silu_mul(gate, up)
    return F.silu(gate) * up


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """The same input through several linears: (linear(x) for each). Int4 linears may run as one
    kernel launch on CUDA without gradients (quant.Int4Linear.run_together: when measured faster)."""
    # looked up on the class: a miss on an nn.Module instance costs ~1 us (Module.__getattr__ raises)
    together = getattr(type(linears[0]), "run_together", None)
    if together is not None and fused_ok(x, kernel="linears_together"):
        out = together(x, linears)
        if out is not None:
            return out
    return tuple(linear(x) for linear in linears)


def _fused():
    from . import fused  # imported on first use: Triton is optional and slow to import

    return fused


class RMSNorm(nn.Module):
    """RMSNorm(x) = rms_norm(x) * weight, with the cast to x's dtype before the weight multiply."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ok(x, self.weight, kernel="rms_norm"):
            return _fused().rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.eps) * self.weight


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm that follows it: (h + delta, norm(h + delta)), one fused
    kernel on CUDA without gradients."""
    if fused_ok(h, delta, norm.weight, kernel="add_rms_norm") and h.shape == delta.shape and h.dtype == delta.dtype:
        return _fused().add_rms_norm(h, delta, norm.weight, norm.eps)
    h = h + delta
    return h, norm(h)


def rope_inv_freq(cfg: TextConfig, device=None) -> torch.Tensor:
    """The head_dim/2 rotary frequencies, fp32, with llama3 scaling when cfg.rope_type == "llama3".

    inv_freq_j = theta^(-2j / dh)                                    (RoFormer, Su et al. 2021, eq. 15)
    llama3: wavelength 2*pi/inv_freq above orig/low -> inv_freq / factor; below orig/high -> kept;
    between -> (1 - s) * inv_freq / factor + s * inv_freq,  s = (orig/wavelen - low) / (high - low)
    """
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float, device=device) / dh))
    if cfg.rope_type == "default":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    orig = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    if high > low:  # with low == high (Scout) the smoothing band is empty: no division by zero
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        in_band = (wavelen >= orig / high) & (wavelen <= orig / low)
        scaled = torch.where(in_band, blended, scaled)
    return scaled


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^{i * p * inv_freq_j}: positions [t] -> [t, j] complex64."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) as complex numbers (interleaved, Meta/GPT-J style;
    the Hugging Face q/k weights are not permuted for rotate_half). x: [b, t, h, dh], fp32 math."""
    if fused_ok(x, kernel="rope"):
        return _fused().rope(x, freqs_cis)
    pairs = torch.view_as_complex(rearrange(x.float(), "b t h (j two) -> b t h j two", two=2).contiguous())
    rotated = pairs * rearrange(freqs_cis, "t j -> 1 t 1 j")
    return rearrange(torch.view_as_real(rotated), "b t h j two -> b t h (j two)").type_as(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))   (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6).
    The dense MLP of Maverick's even layers and the shared expert of every MoE layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(silu_mul(gate, up))
