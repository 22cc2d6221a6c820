"""A Triton W4A16 kernel for MoE decode: each token copy's expert is read from device memory.

    y[m] = x[m] @ W[expert[m]]^T        x [m, k] (bf16 or fp32), W int4 in quant.py's layout

Why: at decode, a routed expert's weights are read once per token. Dequantizing the chosen
expert to bf16 first (the "gather" dispatch's fallback) writes and re-reads four times the int4
bytes; torch's int4 kernel (`_weight_int4pack_mm`) takes one weight matrix, so picking the expert
needs its index on the host (a sync, no CUDA graph). This kernel takes the expert index as a
device tensor and dequantizes in registers: int4 bytes in, one output row out.

One program computes BLOCK_N outputs of one row m. It walks k one quantization group at a time:
loads the group's 64 bytes per output (128 int4 weights: even k in the high nibble, odd k in the
low one), the matching even and odd inputs, and the group's scale, and accumulates in fp32:
    y[m, n] = sum_g scale[e, g, n] * sum_{j in g} (q[e, n, j] - 8) * x[m, j]      (quant.py)

Simplifications: untuned (one block shape, no split-k, no autotuning), a GEMV per row (good for
the few rows of decode, not for prefill, which dequantizes into a scratch buffer and uses a
grouped matmul); gate/up and SwiGLU are not fused. Runs on CUDA, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, how the tests check it without a GPU).

Axes: m rows (token copies), n outputs, k inputs, e experts, g groups along k.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without Triton the gather dispatch dequantizes instead
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 64


def available(x: torch.Tensor) -> bool:
    """True when the kernel can run on x's device: Triton on a CUDA device, or its interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _w4a16_rows(x_ptr, ids_ptr, w_ptr, s_ptr, y_ptr, N, G,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sg, stride_ym,
                    GROUP: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n_ok = offs_n < N
        e = tl.load(ids_ptr + m).to(tl.int64)  # the expert, read on the device
        j = tl.arange(0, GROUP // 2)  # byte j of a group holds k = 2j (high nibble) and 2j + 1 (low)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in range(0, G):
            x_even = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j).to(tl.float32)
            x_odd = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j + 1).to(tl.float32)
            w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + (g * (GROUP // 2) + j)[None, :],
                        mask=n_ok[:, None], other=136)  # 136 = 0x88: q - 8 = 0 in both nibbles
            hi = (w >> 4).to(tl.float32) - 8.0
            lo = (w & 15).to(tl.float32) - 8.0
            part = tl.sum(hi * x_even[None, :] + lo * x_odd[None, :], axis=1)
            scale = tl.load(s_ptr + e * stride_se + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * scale
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def expert_matmul(x: torch.Tensor, expert_ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [m, k], expert_ids [m] (device), packed uint8 [e, n, k/2], scales [e, k/group, n] -> [m, n]."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    m, k = x.shape
    e, n, half = packed.shape
    groups = scales.shape[1]
    if half * 2 != k or k % groups or scales.shape != (e, groups, n) or expert_ids.shape != (m,):
        raise ValueError(f"w4a16: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)}, packed {tuple(packed.shape)}"
                         f" and scales {tuple(scales.shape)} do not fit together")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (m, triton.cdiv(n, BLOCK_N))
    _w4a16_rows[grid](x, expert_ids, packed, scales, y, n, groups,
                      x.stride(0), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1), y.stride(0),
                      GROUP=k // groups, BLOCK=BLOCK_N)
    return y
