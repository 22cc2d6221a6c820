"""A Triton W4A16 kernel for MoE decode: each token copy's expert is read from device memory.

    y[m] = x[m] @ W[expert[m]]^T        x [m, k] (bf16 or fp32), W int4 in quant.py's layout

Why: at decode, a routed expert's weights are read once per token. Dequantizing the chosen
expert to bf16 first (the "gather" dispatch's fallback) writes and re-reads four times the int4
bytes; torch's int4 kernel (`_weight_int4pack_mm`) takes one weight matrix, so picking the expert
needs its index on the host (a sync, no CUDA graph). This kernel takes the expert index as a
device tensor and dequantizes in registers: int4 bytes in, one output row out.

One program computes BLOCK_N outputs of one row m over one SPLIT-th of k. It walks its part of k
one quantization group at a time:
loads the group's 64 bytes per output (128 int4 weights: even k in the high nibble, odd k in the
low one), the matching even and odd inputs, and the group's scale, and accumulates in fp32:
    y[m, n] = sum_g scale[e, g, n] * sum_{j in g} (q[e, n, j] - 8) * x[m, j]      (quant.py)

With SPLIT > 1 the fp32 partial sums of the splits are added afterwards. The (BLOCK_N, SPLIT) pair is timed once per shape on the GPU
(`choose`), the one tuning done here.

Simplifications: a GEMV per row (good for the few rows of decode, not for prefill, which
dequantizes into a scratch buffer and uses a grouped matmul); no num_warps/stages search; gate/up
and SwiGLU are not fused. Runs on CUDA, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, how the tests check it without a GPU).

Axes: m rows (token copies), n outputs, k inputs, e experts, g groups along k, s splits of k.
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
# (BLOCK_N outputs per program, SPLIT programs along k): split-k gives decode's few rows enough
# programs to keep every multiprocessor reading (Scout's down_proj has only 5120 outputs)
CANDIDATES = tuple((block_n, split) for block_n in (16, 32, 64, 128) for split in (1, 2, 4, 8))
DEFAULT = (64, 1)
CHOSEN: dict = {}  # (rows, n, k, dtype, device) -> (block_n, split): measured on first CUDA use


def available(x: torch.Tensor) -> bool:
    """True when the kernel can run on x's device: Triton on a CUDA device, or its interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _w4a16_rows(x_ptr, ids_ptr, w_ptr, s_ptr, y_ptr, N, G, GROUPS_PER_SPLIT,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sg, stride_ys, stride_ym,
                    GROUP: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        split = tl.program_id(2)
        n_ok = offs_n < N
        e = tl.load(ids_ptr + m).to(tl.int64)  # the expert, read on the device
        j = tl.arange(0, GROUP // 2)  # byte j of a group holds k = 2j (high nibble) and 2j + 1 (low)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        first = split * GROUPS_PER_SPLIT
        last = tl.minimum(first + GROUPS_PER_SPLIT, G)
        for g in range(first, last):
            x_even = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j).to(tl.float32)
            x_odd = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j + 1).to(tl.float32)
            w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + (g * (GROUP // 2) + j)[None, :],
                        mask=n_ok[:, None], other=136)  # 136 = 0x88: q - 8 = 0 in both nibbles
            hi = (w >> 4).to(tl.float32) - 8.0
            lo = (w & 15).to(tl.float32) - 8.0
            part = tl.sum(hi * x_even[None, :] + lo * x_odd[None, :], axis=1)
            scale = tl.load(s_ptr + e * stride_se + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * scale
        tl.store(y_ptr + split * stride_ys + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def _launch(x, expert_ids, packed, scales, block_n: int, split: int) -> torch.Tensor:
    m, k = x.shape
    e, n, _ = packed.shape
    groups = scales.shape[1]
    per_split = triton.cdiv(groups, split)
    split = triton.cdiv(groups, per_split)  # no empty splits
    # one split writes y directly; several write fp32 partial sums, added up here (deterministic,
    # unlike atomics: a replayed CUDA graph gives the same bits as the step it recorded)
    y = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    grid = (m, triton.cdiv(n, block_n), split)
    _w4a16_rows[grid](x, expert_ids, packed, scales, y, n, groups, per_split,
                      x.stride(0), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
                      y.stride(0), y.stride(1), GROUP=k // groups, BLOCK=block_n)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)


def choose(x, expert_ids, packed, scales) -> tuple[int, int]:
    """The (BLOCK_N, SPLIT) for this shape: on CUDA the fastest of CANDIDATES, timed once per
    (rows, n, k, dtype, device) with triton.testing.do_bench and remembered in CHOSEN; DEFAULT on
    the interpreter, and while a CUDA graph is being recorded (timing would break the capture;
    decode.DecodeStep runs the step once before recording, so the choice is made by then)."""
    if not x.is_cuda:
        return DEFAULT
    key = (x.shape[0], packed.shape[1], x.shape[1], x.dtype, x.device)
    if key not in CHOSEN:
        if torch.cuda.is_current_stream_capturing():
            return DEFAULT
        from triton.testing import do_bench

        times = {c: do_bench(lambda c=c: _launch(x, expert_ids, packed, scales, *c), warmup=5, rep=20)
                 for c in CANDIDATES}
        CHOSEN[key] = min(times, key=times.get)
    return CHOSEN[key]


def expert_matmul(x: torch.Tensor, expert_ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  config: tuple[int, int] | None = None) -> torch.Tensor:
    """x [m, k], expert_ids [m] (device), packed uint8 [e, n, k/2], scales [e, k/group, n] -> [m, n].
    config: (BLOCK_N, SPLIT) to force one; by default `choose` picks it."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    m, k = x.shape
    e, n, half = packed.shape
    groups = scales.shape[1]
    if half * 2 != k or k % groups or scales.shape != (e, groups, n) or expert_ids.shape != (m,):
        raise ValueError(f"w4a16: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)}, packed {tuple(packed.shape)}"
                         f" and scales {tuple(scales.shape)} do not fit together")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    block_n, split = config or choose(x, expert_ids, packed, scales)
    return _launch(x, expert_ids, packed, scales, block_n, split)
