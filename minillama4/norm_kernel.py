"""A fused RMS norm for CUDA inference: one kernel per norm instead of six or seven.

Same math, in the same order, as layers.rms_norm and layers.RMSNorm (the readable version, and
the one the CPU and training run):
    y = to_x_dtype(x / sqrt(mean(x^2) + eps)) * weight          (fp32 math; weight optional)
Why: eagerly, each norm is a cast, a square, a mean, an add and rsqrt, a multiply, a cast back
and the weight multiply, each its own kernel. A batch-1 decode step of full Scout ran 169 norms,
about 1,000 kernels of 1-2 us each: more time than reading the attention weights
(docs/benchmarks.md, the profile of the static decode step).

Simplifications: one program per row with the whole row in registers (rows up to 16,384 wide);
no backward, so layers.py calls it only when no gradient is needed.

Axes: r rows, d the normalised dim.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without Triton layers.py runs the readable version
    triton = None

MAX_DIM = 16384


def available(x: torch.Tensor) -> bool:
    """True when the kernel runs on x's device (CUDA, or Triton's interpreter) for x's width."""
    return (triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.shape[-1] <= MAX_DIM and x.is_floating_point())


if triton is not None:
    @triton.jit
    def _rms_norm_rows(x_ptr, w_ptr, y_ptr, D, eps, stride_xr, stride_yr,
                       HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        d_ok = d < D
        x = tl.load(x_ptr + r * stride_xr + d, mask=d_ok, other=0.0).to(tl.float32)
        # x / sqrt(mean(x^2) + eps), then cast to x's dtype before the weight (as Llama 4 does)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(x_ptr.dtype.element_ty)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            out = normed.to(tl.float32) * w
        else:
            out = normed
        tl.store(y_ptr + r * stride_yr + d, out.to(y_ptr.dtype.element_ty), mask=d_ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., d] -> the same shape; dtype x's, or torch's promotion of x and weight (as x * weight)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dtype = x.dtype if weight is None else torch.result_type(x, weight)
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_rows[(rows.shape[0],)](rows, weight if weight is not None else rows, out, d, eps,
                                     rows.stride(0), out.stride(0), HAS_WEIGHT=weight is not None, BLOCK=block,
                                     num_warps=4 if block <= 2048 else 8)
    return out.reshape(x.shape)
