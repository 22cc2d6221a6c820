"""Triton kernels for int4 weights and MoE decode: GEMVs where each row brings its own weight
matrix, read on the device, and a one-kernel dequantize for prefill.

    y[m] = x[m] @ W[expert[m]]^T        W int4 in quant.py's layout (expert_matmul)
    y[m] = x[m] @ W[expert[m]]          W bf16/fp32 stacked experts [e, k, n] (expert_matmul_dense)

Why: at decode a routed expert's weights are read once per token. Dequantizing (or, for bf16,
gathering) the chosen expert first writes and re-reads a copy of it; torch's matmuls take one
weight matrix, so picking the expert needs its index on the host (a sync, no CUDA graph). These
kernels take the expert index as a device tensor and read the weights once. The int4 one is also
what an int4 linear uses at decode when it beats torch's tinygemm kernel (quant.py: measured).

int4: one program computes BLOCK_N outputs of row m over one SPLIT-th of k, GROUPS quantization
groups per trip of its loop (unrolled: more loads in flight), into an fp32 accumulator summed once
after the loop:
    y[m, n] = sum_g sum_{j in g} scale[e, g, n] * (q[e, n, j] - 8) * x[m, j]      (quant.py)
Two kernels read the same bytes (quant.py's layout, byte j: k = 2j in the high nibble, 2j + 1 low):
  _w4a16_rows (bytes): a [BLOCK_N, 64] tile of bytes per group, the even and odd inputs, each
      nibble converted to a float ("convert") or built from its bits ("magic", below).
  _w4a16_words (words): the bytes read as int32 words, [BLOCK_N, 16] per group; word u holds
      inputs 8u .. 8u + 7. Per group it masks out the high and the low nibbles of all 4 bytes at
      once, then, for each input position p, moves byte p // 2 into the low byte of 0x4B000000
      (one byte-permute instruction, prmt): the float with bits 0x4B000000 | q is exactly
      2^23 + q, so minus (2^23 + 8) is q - 8, with no int-to-float conversion. It sums
      (q - 8) * x over a group before multiplying by the scale.
  Why two: compiled for sm_90 (Triton's compiler, no GPU needed; tools in docs/benchmarks.md),
  the byte kernel's loop runs 12-22 instructions per weight byte (address arithmetic, byte
  extracts, a quarter-rate conversion per nibble), the word kernel's 8.5 (no spills). A GPU issues
  about 4 x 32 instructions per cycle per multiprocessor, so 20 per byte caps an H100 (132 of them,
  ~1.75 GHz) near 1.5 TB/s (1.0-1.1 TB/s was measured) and 8.5 near 3.5 TB/s. Both stay, timed against each other per shape.
  Both have an unmasked path (EVEN: whole tiles, every split of k the same whole trips), which
  the tuner's splits aim for (`_even_split`); it saves up to 3 instructions per byte.
dense: one program computes BLOCK_N outputs over one SPLIT-th of k, BLOCK_K inputs at a time,
into a [BLOCK_K, BLOCK_N] accumulator summed after the loop.
With SPLIT > 1 the fp32 partial sums of the splits are added afterwards (no atomics: a replayed
CUDA graph gives the same bits as the step it recorded). The tile shape, the split, the warps and
(int4) the kernel variant are timed once per shape on the GPU (`choose`), the one tuning done here.
dequantize: one program per (expert, BLOCK_N outputs, group) writes W' = (q - 8) * scale, in
either layout, so prefill's grouped matmul gets bf16 weights without fp32 temporaries.

Measured (docs/benchmarks.md, H100 and H200, before the word kernel): the int4 GEMV read Scout's
experts at about 1 TB/s, a third of the copy bandwidth; torch's tinygemm (1.3 TB/s) won every
linear shape. The word kernel has not run on a GPU yet (its interpreter twin is tested on CPU).

Simplifications: a GEMV per row (good for the few rows of decode, not for prefill, which
dequantizes and uses a grouped matmul); no pipelining-stage search; SwiGLU's activation is not fused
into the GEMV (q/k/v or gate/up can share one launch: `linears_matmul`). Runs on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, how the tests check it without a GPU).

Axes: m rows (token copies), n outputs, k inputs, e experts, g groups along k, s splits of k,
j bytes of a group (byte kernel), u int32 words of a group and p inputs within a word (word kernel).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without Triton the gather dispatch dequantizes instead
    triton = None

from .devices import multiprocessors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# int4 tiles (BLOCK_N outputs, GROUPS groups of k per trip, warps: a [BLOCK_N, 64]-byte tile per
# group gives 16-byte loads per thread when BLOCK_N = 8 * warps) and dense tiles (BLOCK_N, BLOCK_K),
# each tried with SPLIT = 1 and with enough splits of k to fill the GPU (_candidates, _splits).
# The byte kernel's list keeps the tiles some shape chose on the H100 and H200 (docs/gpu/) and
# their neighbours: (8, 4, 1), (16, 2, 2), (16, 4, 2), (32, 4, 4) and (64, 2, 8) never won.
INT4_TILES = ((8, 2, 1), (8, 8, 1), (16, 8, 2), (8, 4, 4), (8, 8, 4), (16, 4, 4), (32, 2, 4), (64, 1, 4))
# the word kernel's tiles: with BLOCK_N = 32 * warps a thread holds 16 bytes of a group in each of
# 4 rows, which share its inputs (compiled for sm_90, none of these spills registers)
WORD_TILES = ((16, 1, 1), (32, 1, 1), (32, 2, 1), (64, 1, 2), (64, 2, 2), (128, 1, 4))
# how a kernel turns nibbles into floats, each timed with its tiles:
#   "convert": the byte kernel converts the integer (a quarter-rate instruction on the GPU)
#   "magic":   the byte kernel ORs the nibble into the mantissa of 2^23 and subtracts (same value)
#   "words":   the word kernel (_w4a16_words), magic too, 32-bit words unpacked with byte permutes
INT4_VARIANTS = ("convert", "magic")
DENSE_TILES = ((32, 64), (64, 32), (64, 64), (128, 16), (128, 32), (256, 8), (256, 16))
# configurations (BLOCK_N, GROUPS, SPLIT, warps, variant) and (BLOCK_N, BLOCK_K, SPLIT) used on the
# interpreter and while a CUDA graph is being recorded before any was timed
DEFAULT_INT4, DEFAULT_DENSE = (128, 1, 1, 4, "words"), (64, 32, 1)
CHOSEN: dict = {}  # (kernel, rows, n, k, dtype, device) -> the fastest configuration, measured
TIMES: dict = {}  # the same keys -> {configuration: milliseconds} of every candidate timed
_ZERO_IDS: dict = {}


def available(x: torch.Tensor) -> bool:
    """True when the kernels can run on x's device: Triton on a CUDA device, or its interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


def zero_ids(m: int, device) -> torch.Tensor:
    """m zeros (long) on the device, kept: an int4 linear is expert 0 of a one-expert stack."""
    key = torch.device(device)
    if key not in _ZERO_IDS or _ZERO_IDS[key].shape[0] < m:
        _ZERO_IDS[key] = torch.zeros(max(m, 16), dtype=torch.long, device=device)
    return _ZERO_IDS[key][:m]


if triton is not None:
    @triton.jit
    def _w4a16_rows(x_ptr, ids_ptr, w_ptr, s_ptr, y_ptr, N, G, GROUPS_PER_SPLIT,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sg, stride_ys, stride_ym,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, MAGIC: tl.constexpr,
                    EVEN: tl.constexpr):
        HALF: tl.constexpr = GROUP // 2  # bytes per group and output
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        n_ok = offs_n < N
        e = tl.load(ids_ptr + m).to(tl.int64)  # the expert, read on the device
        j = tl.arange(0, HALF)  # byte j of a group holds k = 2j (high nibble) and 2j + 1 (low)
        w_rows = w_ptr + e * stride_we + offs_n[:, None] * stride_wn
        acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)  # summed over j once, after the loop
        first = split * GROUPS_PER_SPLIT
        last = tl.minimum(first + GROUPS_PER_SPLIT, G)
        for g0 in range(first, last, GROUPS):
            for i in tl.static_range(GROUPS):  # GROUPS groups per trip: more bytes in flight
                g = g0 + i
                if EVEN:  # whole tiles and splits (Scout's shapes): no masks
                    w = tl.load(w_rows + (g * HALF + j)[None, :])
                    scale = tl.load(s_ptr + e * stride_se + g * stride_sg + offs_n).to(tl.float32)
                    x_even = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j).to(tl.float32)
                    x_odd = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j + 1).to(tl.float32)
                else:
                    j_ok = g + 0 * j < last  # (as vectors: the interpreter takes no scalar masks)
                    w = tl.load(w_rows + (g * HALF + j)[None, :], mask=n_ok[:, None] & j_ok[None, :],
                                other=136)  # 136 = 0x88: q - 8 = 0 in both nibbles
                    scale = tl.load(s_ptr + e * stride_se + g * stride_sg + offs_n,
                                    mask=n_ok & (g + 0 * offs_n < last), other=0.0).to(tl.float32)
                    x_even = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
                    x_odd = tl.load(x_ptr + m * stride_xm + g * GROUP + 2 * j + 1, mask=j_ok,
                                    other=0.0).to(tl.float32)
                if MAGIC:  # q - 8 without int-to-float conversions (a quarter-rate instruction on
                    # the GPU): the float whose bits are 0x4B000000 | q is exactly 2^23 + q
                    wi = w.to(tl.int32)
                    hi = ((wi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    lo = ((wi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                else:
                    hi = (w >> 4).to(tl.float32) - 8.0
                    lo = (w & 15).to(tl.float32) - 8.0
                acc += (hi * x_even[None, :] + lo * x_odd[None, :]) * scale[:, None]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + split * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _byte_into_magic(src, magic, B: tl.constexpr, ASM: tl.constexpr):
        """Byte B of each int32 in src (a nibble, 0..15) as the low byte of magic = 2^23's bits."""
        if not ASM:  # the interpreter: the same bits with shifts
            out = ((src >> (8 * B)) & 255) | magic
        elif B == 0:  # prmt: byte 0 from src, bytes 1-3 from magic (its bytes 5-7 in prmt's numbering)
            out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7650;", "=r,r,r", [src, magic],
                                            dtype=tl.int32, is_pure=True, pack=1)
        elif B == 1:
            out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7651;", "=r,r,r", [src, magic],
                                            dtype=tl.int32, is_pure=True, pack=1)
        elif B == 2:
            out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7652;", "=r,r,r", [src, magic],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7653;", "=r,r,r", [src, magic],
                                            dtype=tl.int32, is_pure=True, pack=1)
        return out

    @triton.jit
    def _w4a16_words(x_ptr, ids_ptr, w_ptr, s_ptr, w2_ptr, s2_ptr, w3_ptr, s3_ptr, y_ptr, N, N1, N2, G,
                     GROUPS_PER_SPLIT, stride_xm, stride_we, stride_wn, stride_se, stride_sg, stride_sg2, stride_sg3,
                     stride_ys, stride_ym, MAGIC_BITS, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUPS: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, PARTS: tl.constexpr):
        WORDS: tl.constexpr = GROUP // 8  # int32 words per group and output, 8 nibbles each
        m = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N  # the first output, of all PARTS matrices' outputs side by side
        offs_n = n0 + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        n_ok = offs_n < N
        e = tl.load(ids_ptr + m).to(tl.int64)
        # PARTS > 1: up to three matrices sharing x (q, k, v or gate, up), outputs 0..N1-1 from the
        # first, N1..N1+N2-1 from the second, the rest from the third; no tile straddles two
        first_n = n0
        if PARTS >= 2:
            if n0 >= N1:
                w_ptr = w2_ptr
                s_ptr = s2_ptr
                stride_sg = stride_sg2
                first_n = n0 - N1
        if PARTS >= 3:
            if n0 >= N1 + N2:
                w_ptr = w3_ptr
                s_ptr = s3_ptr
                stride_sg = stride_sg3
                first_n = n0 - N1 - N2
        rows = first_n + tl.arange(0, BLOCK_N)  # output rows of the matrix this tile reads
        u = tl.arange(0, WORDS)  # word u of a group holds inputs k = 8u .. 8u + 7
        w_rows = w_ptr + e * stride_we + rows[:, None] * stride_wn + u[None, :]
        # 2^23's bits, passed in at run time so that the compiler keeps them in a register
        magic = tl.zeros((BLOCK_N, WORDS), tl.int32) + MAGIC_BITS
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # summed over words once, after the loop
        first = split * GROUPS_PER_SPLIT
        last = tl.minimum(first + GROUPS_PER_SPLIT, G)
        for g0 in range(first, last, GROUPS):
            for i in tl.static_range(GROUPS):
                g = g0 + i
                if EVEN:  # whole tiles and splits (Scout's shapes): no masks
                    w = tl.load(w_rows + g * WORDS)
                    scale = tl.load(s_ptr + e * stride_se + g * stride_sg + rows).to(tl.float32)
                else:
                    g_ok = g + 0 * offs_n < last  # (vectors: the interpreter takes no scalar masks)
                    w = tl.load(w_rows + g * WORDS, mask=(n_ok & g_ok)[:, None], other=0)  # (scale 0 there)
                    scale = tl.load(s_ptr + e * stride_se + g * stride_sg + rows, mask=n_ok & g_ok,
                                    other=0.0).to(tl.float32)
                # byte b of a word holds input 8u + 2b in its high nibble, 8u + 2b + 1 in its low one
                highs = (w >> 4) & 0x0F0F0F0F  # each byte's high nibble, moved to the low half
                lows = w & 0x0F0F0F0F
                part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                for p in tl.static_range(8):  # input k = 8u + p
                    if EVEN:
                        x_p = tl.load(x_ptr + m * stride_xm + g * GROUP + 8 * u + p).to(tl.float32)
                    else:
                        x_p = tl.load(x_ptr + m * stride_xm + g * GROUP + 8 * u + p, mask=g + 0 * u < last,
                                      other=0.0).to(tl.float32)
                    if p % 2 == 0:
                        bits = _byte_into_magic(highs, magic, p // 2, ASM)
                    else:
                        bits = _byte_into_magic(lows, magic, p // 2, ASM)
                    # the float with bits 0x4B000000 | q is 2^23 + q: minus 2^23 + 8 gives q - 8, exactly
                    part += (bits.to(tl.float32, bitcast=True) - 8388616.0) * x_p[None, :]
                acc += part * scale[:, None]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + split * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _dense_rows(x_ptr, ids_ptr, w_ptr, y_ptr, N, K, K_PER_SPLIT,
                    stride_xm, stride_we, stride_wk, stride_ys, stride_ym,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        n_ok = offs_n < N
        e = tl.load(ids_ptr + m).to(tl.int64)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # summed over k once, after the loop
        first = split * K_PER_SPLIT
        last = tl.minimum(first + K_PER_SPLIT, K)
        for k0 in range(first, last, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < last
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            acc += w * x[:, None]
        y = tl.sum(acc, axis=0)
        tl.store(y_ptr + split * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


    @triton.jit
    def _dequantize_tiles(w_ptr, s_ptr, out_ptr, N,
                          stride_we, stride_wn, stride_se, stride_sg, stride_oe, stride_on, stride_ok,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        HALF: tl.constexpr = GROUP // 2
        e = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.program_id(2)  # one quantization group of k per program
        n_ok = offs_n < N
        j = tl.arange(0, HALF)
        w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + (g * HALF + j)[None, :],
                    mask=n_ok[:, None], other=136)
        scale = tl.load(s_ptr + e * stride_se + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        # W' = (q - 8) * scale in fp32, then the output dtype (as quant.dequantize_int4)
        hi = ((w >> 4).to(tl.float32) - 8.0) * scale[:, None]
        lo = ((w & 15).to(tl.float32) - 8.0) * scale[:, None]
        out = out_ptr + e * stride_oe + offs_n[:, None] * stride_on
        tl.store(out + (g * GROUP + 2 * j)[None, :] * stride_ok, hi.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])
        tl.store(out + (g * GROUP + 2 * j + 1)[None, :] * stride_ok, lo.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype, out: torch.Tensor | None = None,
               transpose: bool = False) -> torch.Tensor:
    """quant.dequantize_int4 in one kernel: packed [e, n, k/2], scales [e, k/group, n] ->
    W' [e, n, k] (or [e, k, n], the x @ W layout, with transpose=True), written into `out` if
    given. For prefill, which multiplies whole dequantized matrices; the same values as the
    readable version (fp32 products, then one cast)."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    e, n, half = packed.shape
    groups = scales.shape[1]
    k = 2 * half
    if k % groups or scales.shape != (e, groups, n):
        raise ValueError(f"dequantize: packed {tuple(packed.shape)} and scales {tuple(scales.shape)} do not fit together")
    shape = (e, k, n) if transpose else (e, n, k)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != shape:
        raise ValueError(f"dequantize: out {tuple(out.shape)} should be {shape}")
    packed, scales = packed.contiguous(), scales.contiguous()
    stride_on, stride_ok = (out.stride(2), out.stride(1)) if transpose else (out.stride(1), out.stride(2))
    block_n = 64
    _dequantize_tiles[(e, triton.cdiv(n, block_n), groups)](
        packed, scales, out, n, packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), stride_on, stride_ok, GROUP=k // groups, BLOCK_N=block_n)
    return out


def _per_split(steps: int, split: int, step: int) -> int:
    """Groups (or inputs) per split of k when `steps` of them go into `split` parts, rounded up to
    whole trips of `step`; the launchers then use cdiv(steps, per_split) splits (none empty)."""
    return triton.cdiv(triton.cdiv(steps, split), step) * step


def _even(n: int, block_n: int, groups: int, per_split: int, groups_per_iter: int) -> bool:
    """True when every tile is whole and every split runs whole trips of its own groups: no masks."""
    return n % block_n == 0 and groups % per_split == 0 and per_split % groups_per_iter == 0


def _splits(programs: int, steps: int, device, per_sm: int = 2) -> int:
    """Splits of k that give about `per_sm` programs per multiprocessor (at most one per step of k)."""
    sms = multiprocessors(device) or 132  # under the interpreter: as many as an H100, so tests split as there
    return max(1, min(steps, triton.cdiv(per_sm * sms, programs)))


def _finish(y: torch.Tensor, dtype) -> torch.Tensor:
    return y[0] if y.shape[0] == 1 else y.sum(0).to(dtype)


def _launch_int4(x, expert_ids, packed, scales, block_n: int, groups_per_iter: int, split: int,
                 warps: int = 4, variant: str = "magic") -> torch.Tensor:
    if variant == "words":  # int32 words [e, n, k/8]: little-endian, byte b of word u is byte 4u + b
        return _launch_words(x, expert_ids, [(packed.view(torch.int32), scales)], block_n, groups_per_iter,
                             split, warps)
    if variant not in INT4_VARIANTS:
        raise ValueError(f"w4a16: variant {variant!r} is not one of {INT4_VARIANTS + ('words',)}")
    m, k = x.shape
    n, groups = packed.shape[1], scales.shape[1]
    per_split = _per_split(groups, split, groups_per_iter)
    split = triton.cdiv(groups, per_split)  # no empty splits
    y = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    _w4a16_rows[(m, triton.cdiv(n, block_n), split)](
        x, expert_ids, packed, scales, y, n, groups, per_split, x.stride(0), packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1), GROUP=k // groups, BLOCK_N=block_n,
        GROUPS=groups_per_iter, MAGIC=variant == "magic", EVEN=_even(n, block_n, groups, per_split, groups_per_iter),
        num_warps=warps)
    return _finish(y, x.dtype)


def _launch_dense(x, expert_ids, w, block_n: int, block_k: int, split: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[2]
    per_split = _per_split(k, split, block_k)
    split = triton.cdiv(k, per_split)
    y = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    _dense_rows[(m, triton.cdiv(n, block_n), split)](
        x, expert_ids, w, y, n, k, per_split, x.stride(0), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k)
    return _finish(y, x.dtype)


def time_ms(fn) -> float:
    """GPU milliseconds per call of fn (a few kernel launches): fn is recorded once in a CUDA graph
    and its replays are timed with triton's do_bench, which flushes the L2 cache between calls, so
    weights come from memory as at decode. Python's launch overhead is left out, as it is from a
    replayed decode step (timing fn itself measured mostly Python for these 10-50 us kernels)."""
    from triton.testing import do_bench

    fn()  # compiles and warms up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=5, rep=20)


def choose(kind: str, x, n: int, candidates, default, launch):
    """The fastest configuration for this shape: on CUDA each of `candidates()` is timed once per
    (kind, rows, n, k, dtype, device) (time_ms) and the winner kept in CHOSEN; `default` on the
    interpreter, and while a CUDA graph is being recorded (timing would break the capture;
    decode.DecodeStep runs the step once before recording, so the choice is made by then).
    A configuration that raises (say, a kernel variant this GPU's Triton cannot compile) is skipped
    with a warning."""
    if not x.is_cuda:
        return default
    key = (kind, x.shape[0], n, x.shape[1], x.dtype, x.device)
    if key not in CHOSEN:
        if torch.cuda.is_current_stream_capturing():
            return default
        times, failed = {}, {}
        for c in candidates():
            try:
                times[c] = time_ms(lambda c=c: launch(*c))
            except Exception as err:  # e.g. a variant this GPU's Triton cannot compile: skip it, loudly
                failed[c] = f"{type(err).__name__}: {err}"
        if failed:
            warnings.warn(f"w4a16: {len(failed)} of {len(failed) + len(times)} configurations failed for {key[:4]}, "
                          f"e.g. {next(iter(failed.items()))}", RuntimeWarning, stacklevel=2)
        if not times:
            raise RuntimeError(f"w4a16: no configuration ran for {key[:4]}: {failed}")
        CHOSEN[key], TIMES[key] = min(times, key=times.get), times
    return CHOSEN[key]


def _even_split(split: int, steps: int) -> int:
    """The number of splits nearest `split` (by ratio, the larger on a tie) that divides `steps`:
    every split then runs the same trips, and the kernels take their unmasked path (`_even`)."""
    return min((d for d in range(1, steps + 1) if steps % d == 0), key=lambda d: (abs(math.log(d / split)), -d))


def _candidates(tiles, n: int, steps_of, x, warps_of=lambda tile: 4) -> list[tuple]:
    """Each tile (BLOCK_N, b, *options) with SPLIT = 1 and with the splits of k that fill the GPU:
    about two programs per multiprocessor, and (for small programs) about 16 warps per multiprocessor."""
    out = []
    for tile in tiles:
        a, b = tile[:2]
        programs = x.shape[0] * triton.cdiv(n, a)
        steps = steps_of(b)
        splits = {1, _splits(programs, steps, x.device),
                  _splits(programs, steps, x.device, per_sm=max(2, 16 // warps_of(tile)))}
        if steps * b == steps_of(1):  # b divides k's steps: a split into equal parts needs no masks
            splits = {_even_split(s, steps) for s in splits}
        out += [(a, b, s, *tile[2:]) for s in sorted(splits)]
    return out


def expert_matmul(x: torch.Tensor, expert_ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [m, k], expert_ids [m] (device), packed uint8 [e, n, k/2], scales [e, k/group, n] -> [m, n].
    config: (BLOCK_N, GROUPS per trip, SPLIT[, warps[, variant]]) to force one (variant: "convert",
    "magic" or "words"); by default `choose` picks it."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    m, k = x.shape
    e, n, half = packed.shape
    groups = scales.shape[1]
    if half * 2 != k or k % groups or scales.shape != (e, groups, n) or expert_ids.shape != (m,):
        raise ValueError(f"w4a16: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)}, packed {tuple(packed.shape)}"
                         f" and scales {tuple(scales.shape)} do not fit together")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    launch = lambda *c: _launch_int4(x, expert_ids, packed, scales, *c)  # noqa: E731
    if config is None:
        steps = lambda gpi: triton.cdiv(groups, gpi)  # noqa: E731
        config = choose("int4", x, n, lambda: [
            *(c + (v,) for c in _candidates(INT4_TILES, n, steps, x, lambda t: t[2]) for v in INT4_VARIANTS),
            *(c + ("words",) for c in _candidates(WORD_TILES, n, steps, x, lambda t: t[2]))], DEFAULT_INT4, launch)
    return launch(*config)


def linears_matmul(x: torch.Tensor, parts: list, config: tuple | None = None) -> torch.Tensor:
    """x [m, k] through up to three int4 matrices that share it, in one launch of the word kernel:
    parts = [(packed [n_i, k/2], scales [k/group, n_i]), ...] (quant.Int4Linear's buffers) ->
    [m, n_1 + n_2 + ...], the outputs side by side (q, k, v or gate, up). Every n_i must be a
    multiple of some word tile's BLOCK_N. config: (BLOCK_N, GROUPS, SPLIT, warps) to force one."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    m, k = x.shape
    ns = [packed.shape[0] for packed, _ in parts]
    groups = parts[0][1].shape[0] if parts else 0
    if not 1 <= len(parts) <= 3 or any(packed.shape != (n, k // 2) or scales.shape != (groups, n) or k % groups
                                       for n, (packed, scales) in zip(ns, parts)):
        raise ValueError(f"linears_matmul: x {tuple(x.shape)} and parts "
                         f"{[(tuple(p.shape), tuple(s.shape)) for p, s in parts]} do not fit together")
    tiles = [t for t in WORD_TILES if all(n % t[0] == 0 for n in ns)]
    if not tiles:
        raise ValueError(f"linears_matmul: outputs {ns} are not multiples of any word tile {WORD_TILES}")
    x = x.contiguous()
    words = [(packed.contiguous().view(torch.int32)[None], scales.contiguous()[None]) for packed, scales in parts]
    launch = lambda *c: _launch_words(x, zero_ids(m, x.device), words, *c)  # noqa: E731
    if config is None:
        config = choose(f"int4 x{len(parts)}", x, sum(ns), lambda: _candidates(
            tiles, sum(ns), lambda gpi: triton.cdiv(groups, gpi), x, lambda t: t[2]), _widest(tiles), launch)
    return launch(*config)


def _widest(tiles) -> tuple:
    """The default (no timing: the interpreter, a graph being recorded): the widest tile, fewest programs."""
    block_n, groups, warps = max(tiles, key=lambda t: t[0])
    return block_n, groups, 1, warps


def _launch_words(x, ids, words, block_n: int, groups_per_iter: int, split: int, warps: int) -> torch.Tensor:
    """The word kernel over words = [(int32 words [e, n_i, k/8], scales [e, k/group, n_i]), ...]: one
    matrix (row m reads expert ids[m]) or up to three side by side (with ids all 0)."""
    m, k = x.shape
    ns = [w.shape[1] for w, _ in words]
    n, groups = sum(ns), words[0][1].shape[1]
    per_split = _per_split(groups, split, groups_per_iter)
    split = triton.cdiv(groups, per_split)  # no empty splits
    y = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    (w1, s1), (w2, s2), (w3, s3) = (words + [words[0]] * 2)[:3]
    _w4a16_words[(m, triton.cdiv(n, block_n), split)](
        x, ids, w1, s1, w2, s2, w3, s3, y, n, ns[0], ns[1] if len(ns) > 1 else 0, groups, per_split,
        x.stride(0), w1.stride(0), w1.stride(1), s1.stride(0), s1.stride(1), s2.stride(1), s3.stride(1),
        y.stride(0), y.stride(1), 0x4B000000, GROUP=k // groups, BLOCK_N=block_n, GROUPS=groups_per_iter,
        EVEN=_even(n, block_n, groups, per_split, groups_per_iter), ASM=x.is_cuda and not INTERPRET,
        PARTS=len(words), num_warps=warps)
    return _finish(y, x.dtype)


def expert_matmul_dense(x: torch.Tensor, expert_ids: torch.Tensor, w: torch.Tensor,
                        config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [m, k], expert_ids [m] (device), w [e, k, n] (moe.Experts' x @ W layout) -> [m, n].
    config: (BLOCK_N, BLOCK_K, SPLIT) to force one; by default `choose` picks it."""
    if triton is None:
        raise RuntimeError("minillama4.w4a16 needs Triton (pip install triton)")
    m, k = x.shape
    if w.dim() != 3 or w.shape[1] != k or expert_ids.shape != (m,):
        raise ValueError(f"dense rows: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)} and w {tuple(w.shape)}"
                         f" do not fit together")
    n = w.shape[2]
    x, w = x.contiguous(), w.contiguous()
    launch = lambda *c: _launch_dense(x, expert_ids, w, *c)  # noqa: E731
    if config is None:
        config = choose("dense", x, n, lambda: _candidates(DENSE_TILES, n, lambda bk: triton.cdiv(k, bk), x),
                        DEFAULT_DENSE, launch)
    return launch(*config)
