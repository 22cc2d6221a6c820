"""Fused kernels for CUDA inference, one kernel each: the RMS norm (alone or after the residual
add), RoPE, attention's q/k preparation, the attention mask, decode attention over the static
cache, SwiGLU's silu(gate) * up, the static KV-cache write and the router's top-k with its gates.

Each computes what the readable version in layers.py / attention.py computes (which the CPU and
training run), in the same order and precision; the last bit of an fp32 sum or exp may differ
(tests: fp32 within 1e-6 relative, and the whole fused model against the readable one):
    rms_norm        y = to_x_dtype(x / sqrt(mean(x^2) + eps)) * weight     (fp32 math; weight optional)
    add_rms_norm    h = x + delta (x's dtype), then rms_norm(h): the residual add and the next norm
    rope            (x[2j] + i x[2j+1]) * e^{i p theta_j}, fp32, cast to x's dtype
    qk_prepare      attention's q and k from their projections: RoPE, QK norm, NoPE temperature
    attention_mask  (k <= q) & (k >= 0) & (k // chunk == q // chunk)
    silu_mul        to_dtype(silu(gate)) * up                             (fp32 math, as F.silu then *)
    cache_write     keys[slot], values[slot], slot_pos[slot] = k, v, p    slot = p % slots
    top_k_gates     the router's top-k experts by logit and their gates sigmoid(logit)
    decode_attention  softmax(q k^T / sqrt(dh) + mask) v for one query over the static cache,
                    the mask computed from the slots' positions (flash-decoding: split over slots)
Why: eagerly each is a chain of small kernels (a norm: cast, square, mean, add and rsqrt,
multiply, cast back, weight multiply). A batch-1 decode step of full Scout ran about 3,400
kernels, 1-2 us each even replayed from a CUDA graph: more time than reading the attention and
shared-expert weights (docs/benchmarks.md, the profile of the static decode step). The norm,
RoPE and mask kernels took it to 1,896 (measured); the others came after the GPU time was
spent (tested under the interpreter and compiled for sm_90, kernel_report.py; not yet timed).
decode_attention also stops attending to empty cache slots: SDPA read the whole 8,192-slot ring.

Simplifications: one program per row with the whole row in registers (rows up to 16,384 wide);
decode attention for one query token and power-of-two head dims; no backward, so layers.py
calls these only when no gradient is needed.

Axes: r rows, d the normalised (or head) dim, j rotary pair, t query positions, s key positions
(cache slots), f hidden features, b sequences, h kv heads, g query heads sharing a kv head, e experts.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without Triton layers.py runs the readable version
    triton = None

from .devices import multiprocessors

MAX_DIM = 16384
# the kernels below, by the name layers.fused_ok asks for ("linears_together": w4a16.linears_matmul)
NAMES = ("rms_norm", "add_rms_norm", "rope", "qk_prepare", "attention_mask", "decode_attention", "silu_mul",
         "cache_write", "top_k_gates", "linears_together")
# the ones measured on a GPU (docs/benchmarks.md); the others were written without one
MEASURED = ("rms_norm", "rope", "attention_mask")


def _from_environment(value: str | None) -> set:
    """MINILLAMA4_FUSED: unset or "1" = every kernel, "0" = none (the readable code everywhere),
    "measured" = MEASURED, or names separated by commas (to rule one out on a new GPU or Triton)."""
    if value is None or value.strip() in ("", "1"):
        return set(NAMES)
    if value.strip() == "0":
        return set()
    names = set(MEASURED) if value.strip() == "measured" else {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - set(NAMES)
    if unknown:
        raise ValueError(f"MINILLAMA4_FUSED: unknown kernels {sorted(unknown)}; known: {', '.join(NAMES)}")
    return names


KERNELS = _from_environment(os.environ.get("MINILLAMA4_FUSED"))
ENABLED = True  # False: the readable versions run everywhere (the tests compare the two)


def available(x: torch.Tensor, kernel: str) -> bool:
    """True when `kernel` is switched on and runs on x's device (CUDA, or Triton's interpreter)
    for x's width."""
    return (ENABLED and kernel in KERNELS and triton is not None
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and x.shape[-1] <= MAX_DIM)


if triton is not None:
    @triton.jit
    def _rms_norm_rows(x_ptr, w_ptr, y_ptr, delta_ptr, sum_ptr, D, eps, stride_xr, stride_yr, stride_dr, stride_sr,
                       HAS_WEIGHT: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        d_ok = d < D
        x = tl.load(x_ptr + r * stride_xr + d, mask=d_ok, other=0.0)
        if HAS_DELTA:  # the residual add first: x + delta in x's dtype (as torch adds), stored, then normed
            x = (x.to(tl.float32) + tl.load(delta_ptr + r * stride_dr + d, mask=d_ok, other=0.0).to(tl.float32)
                 ).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + r * stride_sr + d, x, mask=d_ok)
        x = x.to(tl.float32)
        # x / sqrt(mean(x^2) + eps), then cast to x's dtype before the weight (as Llama 4 does)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(x_ptr.dtype.element_ty)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            out = normed.to(tl.float32) * w
        else:
            out = normed
        tl.store(y_ptr + r * stride_yr + d, out.to(y_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _qk_rows(q_ptr, k_ptr, cs_ptr, pos_ptr, qo_ptr, ko_ptr, RQ, H, KVH, T, J, eps, attn_scale, FLOOR,
                 stride_qb, stride_qt, stride_kb, stride_kt,
                 ROPE: tl.constexpr, NORM: tl.constexpr, TEMP: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)  # rows 0..RQ-1: q's (b, t, head); then k's
        src, dst, heads, row = q_ptr, qo_ptr, H, r
        stride_b, stride_t = stride_qb, stride_qt
        if r >= RQ:
            src, dst, heads, row = k_ptr, ko_ptr, KVH, r - RQ
            stride_b, stride_t = stride_kb, stride_kt
        b, t, head = row // (T * heads), (row // heads) % T, row % heads
        src = src + b * stride_b + t * stride_t + head * 2 * J
        dst = dst + row * 2 * J
        j = tl.arange(0, BLOCK)
        j_ok = j < J
        even = tl.load(src + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
        odd = tl.load(src + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
        if ROPE:  # (even + i odd) * (cos + i sin) in fp32, cast to the input dtype (layers.apply_rope)
            cos = tl.load(cs_ptr + t * 2 * J + 2 * j, mask=j_ok, other=1.0)
            sin = tl.load(cs_ptr + t * 2 * J + 2 * j + 1, mask=j_ok, other=0.0)
            rotated = even * cos - odd * sin
            odd = (even * sin + odd * cos).to(qo_ptr.dtype.element_ty).to(tl.float32)
            even = rotated.to(qo_ptr.dtype.element_ty).to(tl.float32)
        if NORM:  # the weightless QK RMS norm over the head dim, cast to the input dtype
            inv = tl.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / (2 * J) + eps)
            even = (even * inv).to(qo_ptr.dtype.element_ty).to(tl.float32)
            odd = (odd * inv).to(qo_ptr.dtype.element_ty).to(tl.float32)
        if TEMP:  # queries only: s(p) = 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1)
            p = tl.load(pos_ptr + t + 0 * j)  # (a vector: the interpreter has no scalar loads)
            s = 1.0 + attn_scale * tl.log(((p + 1) // FLOOR).to(tl.float32) + 1.0)
            s = tl.where(r + 0 * j < RQ, s, 1.0)
            even, odd = even * s, odd * s
        tl.store(dst + 2 * j, even.to(qo_ptr.dtype.element_ty), mask=j_ok)
        tl.store(dst + 2 * j + 1, odd.to(qo_ptr.dtype.element_ty), mask=j_ok)

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, y_ptr, F, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        f_ok = f < F
        g = tl.load(g_ptr + r * stride_g + f, mask=f_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r * stride_u + f, mask=f_ok, other=0.0).to(tl.float32)
        # silu(g) = g * sigmoid(g) in fp32, cast to the input dtype (as F.silu), then times up
        s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + r * stride_y + f, (s * u).to(y_ptr.dtype.element_ty), mask=f_ok)

    @triton.jit
    def _cache_write(k_ptr, v_ptr, pos_ptr, keys_ptr, values_ptr, slot_pos_ptr, H, SLOTS, DH,
                     stride_kb, stride_kh, stride_cb, stride_ch, stride_cs, BLOCK: tl.constexpr):
        bh = tl.program_id(0)  # one (sequence, kv head) per program
        b, h = bh // H, bh % H
        d = tl.arange(0, BLOCK)
        d_ok = d < DH
        p = tl.load(pos_ptr + 0 * d)  # the position, read on the device (as a vector for the interpreter)
        slot = p % SLOTS
        src = b * stride_kb + h * stride_kh + d
        dst = b * stride_cb + h * stride_ch + slot * stride_cs + d
        tl.store(keys_ptr + dst, tl.load(k_ptr + src, mask=d_ok), mask=d_ok)
        tl.store(values_ptr + dst, tl.load(v_ptr + src, mask=d_ok), mask=d_ok)
        tl.store(slot_pos_ptr + slot, p, mask=(d == 0) & (bh + 0 * d == 0))  # once: program 0, lane 0

    @triton.jit
    def _top_k_gates(l_ptr, ids_ptr, g_ptr, E, stride_l, K: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)  # one token per program
        e = tl.arange(0, BLOCK)
        scores = tl.load(l_ptr + r * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
        for i in tl.static_range(K):  # the largest logit, then the largest of the rest, ...
            best = tl.max(scores, axis=0)
            pick = tl.min(tl.where(scores == best, e, BLOCK), axis=0)  # a tie goes to the lower expert
            tl.store(ids_ptr + r * K + i + 0 * e, pick + 0 * e, mask=e == 0)  # (vector stores: the interpreter)
            # gate = sigmoid(logit) in fp32, cast to the output dtype
            gate = 1.0 / (1.0 + tl.exp(-(best + tl.zeros([BLOCK], tl.float32))))
            tl.store(g_ptr + r * K + i + 0 * e, gate.to(g_ptr.dtype.element_ty), mask=e == 0)
            scores = tl.where(e == pick, float("-inf"), scores)

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, sp_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, KV, SLOTS, PER_SPLIT,
                          SPLITS, CHUNK, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                          G: tl.constexpr, G_PAD: tl.constexpr, DH: tl.constexpr, BLOCK_S: tl.constexpr,
                          CHUNKED: tl.constexpr, FP32_DOT: tl.constexpr):
        bk = tl.program_id(0)  # one (sequence, kv head) ...
        split = tl.program_id(1)  # ... and one SPLITS-th of the cache slots per program
        b, kvh = bk // KV, bk % KV
        g = tl.arange(0, G_PAD)  # the G query heads kvh*G .. kvh*G + G-1 that share kv head kvh
        d = tl.arange(0, DH)
        q = tl.load(q_ptr + b * stride_qb + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)
        m_i = tl.full((G_PAD,), -1e30, tl.float32)  # running max of the scores,
        l_i = tl.zeros((G_PAD,), tl.float32)  # running sum of exp(score - max),
        acc = tl.zeros((G_PAD, DH), tl.float32)  # running sum of exp(score - max) * v
        first = split * PER_SPLIT
        last = tl.minimum(first + PER_SPLIT, SLOTS)
        kv_base = b * stride_kb + kvh * stride_kh
        # the query's position p, read on the device (a vector: the interpreter has no scalar loads),
        # and the first position key k may have: attention.attention_mask says k // chunk == p // chunk
        # (with k <= p: k >= p - p % chunk), else k >= 0 (-1 marks an empty slot)
        p = tl.load(pos_ptr + 0 * tl.arange(0, BLOCK_S)).to(tl.int32)
        lowest = p - p % CHUNK if CHUNKED else 0 * p
        for s0 in range(first, last, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            key_pos = tl.load(sp_ptr + s, mask=s < last, other=-1).to(tl.int32)
            ok = (key_pos >= lowest) & (key_pos >= 0) & (key_pos <= p)
            if tl.max(ok.to(tl.int32), axis=0) > 0:  # blocks with no visible key cost one small load
                k = tl.load(k_ptr + kv_base + s[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0)
                if FP32_DOT:
                    scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))
                # softmax(q k^T / sqrt(dh) + mask) v, one block at a time (online softmax, Milakov &
                # Gimelshein 2018; flash-decoding splits the keys across programs)
                scores = tl.where(ok[None, :], scores * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp(m_i - m_new)
                probs = tl.exp(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(probs, axis=1)
                v = tl.load(v_ptr + kv_base + s[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0)
                if FP32_DOT:
                    acc = acc * alpha[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
                m_i = m_new
        row = (b * KV * G + kvh * G + g) * SPLITS + split  # partials [b * h, SPLITS(, DH)]
        tl.store(m_ptr + row, m_i, mask=g < G)
        tl.store(l_ptr + row, l_i, mask=g < G)
        tl.store(acc_ptr + row[:, None] * DH + d[None, :], acc, mask=(g < G)[:, None])

    @triton.jit
    def _decode_attention_combine(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS, DH: tl.constexpr, SPLITS_PAD: tl.constexpr):
        r = tl.program_id(0)  # one (sequence, query head) per program
        i = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, DH)
        m = tl.load(m_ptr + r * SPLITS + i, mask=i < SPLITS, other=-1e30)
        l = tl.load(l_ptr + r * SPLITS + i, mask=i < SPLITS, other=0.0)
        acc = tl.load(acc_ptr + (r * SPLITS + i)[:, None] * DH + d[None, :], mask=(i < SPLITS)[:, None], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))  # each split's sums rescaled to the overall max
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(o_ptr + r * DH + d, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _mask_rows(q_ptr, k_ptr, m_ptr, S, CHUNK, BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
        t = tl.program_id(0)
        s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        s_ok = s < S
        q = tl.load(q_ptr + t + 0 * s)  # (as a vector: the interpreter broadcasts no scalar loads)
        k = tl.load(k_ptr + s, mask=s_ok, other=-1)
        allowed = (k <= q) & (k >= 0)
        if CHUNKED:
            allowed = allowed & (k // CHUNK == q // CHUNK)
        tl.store(m_ptr + t * S + s, allowed.to(tl.int8), mask=s_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] as rows [r, d] with unit stride along d (a view where possible), as the kernels read it."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., d] -> the same shape; dtype x's, or torch's promotion of x and weight (as x * weight)."""
    d = x.shape[-1]
    rows = _rows(x)
    dtype = x.dtype if weight is None else torch.result_type(x, weight)
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_rows[(rows.shape[0],)](rows, weight if weight is not None else rows, out, rows, rows, d, eps,
                                     rows.stride(0), out.stride(0), 0, 0, HAS_WEIGHT=weight is not None,
                                     HAS_DELTA=False, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out.reshape(x.shape)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the norm after it: (h + delta, rms_norm(h + delta) * weight), as
    layers.add_rms_norm; h and delta [..., d] of one dtype and shape."""
    if h.shape != delta.shape or h.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)} {h.dtype} and delta {tuple(delta.shape)} {delta.dtype}")
    d = h.shape[-1]
    rows, drows = _rows(h), _rows(delta)
    total = torch.empty(rows.shape, dtype=h.dtype, device=h.device)
    out = torch.empty(rows.shape, dtype=torch.result_type(h, weight), device=h.device)
    block = triton.next_power_of_2(d)
    _rms_norm_rows[(rows.shape[0],)](rows, weight, out, drows, total, d, eps, rows.stride(0), out.stride(0),
                                     drows.stride(0), total.stride(0), HAS_WEIGHT=True, HAS_DELTA=True, BLOCK=block,
                                     num_warps=4 if block <= 2048 else 8)
    return total.reshape(h.shape), out.reshape(h.shape)


def rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [b, t, h, dh] rotated by freqs_cis [t, dh/2] (complex64), as layers.apply_rope: qk_prepare's
    kernel with RoPE only, over rows of x alone."""
    b, t, h, dh = x.shape
    rows = x.reshape(b, t, h * dh)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    cs = torch.view_as_real(freqs_cis.contiguous())  # [t, j, 2] fp32: cos, sin
    out = torch.empty(b, t, h, dh, dtype=x.dtype, device=x.device)
    # every row is a "q" row (no k rows); without TEMP the positions pointer is never read
    _qk_rows[(b * t * h,)](rows, rows, cs, cs, out, out, b * t * h, h, 1, t, dh // 2, 0.0, 0.0, 1,
                           rows.stride(0), rows.stride(1), rows.stride(0), rows.stride(1),
                           ROPE=True, NORM=False, TEMP=False, BLOCK=triton.next_power_of_2(dh // 2))
    return out


def qk_prepare(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor, heads: int,
               kv_heads: int, eps: float, rope: bool, norm: bool, temperature: tuple[int, float] | None):
    """The queries and keys of attention.Attention from their projections, one kernel for both:
    q [b, t, heads * dh] and k [b, t, kv_heads * dh] (views with unit stride allowed) -> q [b, t,
    heads, dh] and k [b, t, kv_heads, dh], after RoPE (if rope), the weightless QK norm (if norm)
    and, on q only, the NoPE temperature s(p) (temperature = (floor_scale, attn_scale)).
    floor((p + 1) / floor_scale) is taken in integers: the same as the readable fp32 division and
    floor for positions below 2^24 (16.7M; Scout's context is 10M)."""
    b, t, width = q.shape
    dh = width // heads
    if k.shape != (b, t, kv_heads * dh) or q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype != k.dtype:
        raise ValueError(f"qk_prepare: q {tuple(q.shape)} and k {tuple(k.shape)} with {heads}/{kv_heads} heads")
    q_out = torch.empty(b, t, heads, dh, dtype=q.dtype, device=q.device)
    k_out = torch.empty(b, t, kv_heads, dh, dtype=k.dtype, device=k.device)
    cs = torch.view_as_real(freqs_cis.contiguous())  # [t, j, 2] fp32: cos, sin
    floor_scale, attn_scale = temperature if temperature is not None else (1, 0.0)
    rows_q = b * t * heads
    _qk_rows[(rows_q + b * t * kv_heads,)](
        q, k, cs, positions, q_out, k_out, rows_q, heads, kv_heads, t, dh // 2, eps, attn_scale, floor_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), ROPE=rope, NORM=norm, TEMP=temperature is not None,
        BLOCK=triton.next_power_of_2(dh // 2))
    return q_out, k_out


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [t, s], as attention.attention_mask."""
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    t, s = q_pos.shape[0], k_pos.shape[0]
    out = torch.empty(t, s, dtype=torch.int8, device=q_pos.device)
    block = 1024
    _mask_rows[(t, triton.cdiv(s, block))](q_pos, k_pos, out, s, chunk or 1, BLOCK=block, CHUNKED=chunk is not None)
    return out.view(torch.bool)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., f] tensors (views with unit stride along f, e.g. the two halves of a
    fused gate/up output), as `F.silu(gate) * up` computes it."""
    f = gate.shape[-1]
    g, u = _rows(gate), _rows(up)
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul[(g.shape[0], triton.cdiv(f, block))](g, u, out, f, g.stride(0), u.stride(0), out.stride(0), BLOCK=block)
    return out.reshape(gate.shape)


def cache_write(k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                slot_pos: torch.Tensor) -> None:
    """One decode token into a static KV cache, in place: k, v [b, kv, 1, dh] go to slot
    position % slots of keys, values [b, kv, slots, dh], and slot_pos[slot] = position (a [1]
    device tensor), as attention.KVCache.update does with three index_copy_ calls."""
    b, h, _, dh = k.shape
    k, v = k.contiguous(), v.contiguous()
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("cache_write needs contiguous cache buffers")
    _cache_write[(b * h,)](k, v, position, keys, values, slot_pos, h, keys.shape[2], dh,
                           k.stride(0), k.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                           BLOCK=triton.next_power_of_2(dh))


def top_k_gates(logits: torch.Tensor, k: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice as moe.MoE.route makes it: logits [n, e] -> the k largest per row
    (top_ids [n, k], long, largest first) and their gates sigmoid(logit) [n, k] in `dtype`. Ties go
    to the lower expert index (torch.topk leaves the order of ties unspecified)."""
    rows = _rows(logits)
    n, e = rows.shape
    if not 1 <= k <= e:
        raise ValueError(f"top_k_gates: k={k} with {e} experts")
    ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
    gates = torch.empty(n, k, dtype=dtype, device=logits.device)
    _top_k_gates[(n,)](rows, ids, gates, e, rows.stride(0), K=k, BLOCK=triton.next_power_of_2(e), num_warps=1)
    return ids, gates


def decode_attention_ok(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether decode_attention takes this step: one query token, a power-of-two head dim."""
    dh = q.shape[-1]
    return q.shape[2] == 1 and dh >= 16 and dh & (dh - 1) == 0 and keys.is_contiguous() and q.stride(-1) == 1


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor,
                     position: torch.Tensor, chunk: int | None, scale: float) -> torch.Tensor:
    """One decode token's attention over a static KV cache, as attention.Attention computes it
    with attention_mask and SDPA: q [b, h, 1, dh], keys/values [b, kv, slots, dh] (the whole
    buffers), slot_pos [slots] (-1 = empty), position [1] on the device -> [b, h, 1, dh].
    Blocks of slots with no visible key are skipped (the cache is mostly empty at short context),
    and the slots are split across programs whose partial softmax sums are combined after."""
    b, h, _, dh = q.shape
    kv, slots = keys.shape[1], keys.shape[2]
    if not decode_attention_ok(q, keys) or not values.is_contiguous() or h % kv:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)} not supported")
    block_s = 64 if dh <= 128 else 32
    target = 2 * _sms(q.device)  # about two programs per multiprocessor
    splits = max(1, min(triton.cdiv(slots, block_s), triton.cdiv(target, b * kv)))
    per_split = triton.cdiv(triton.cdiv(slots, splits), block_s) * block_s
    splits = triton.cdiv(slots, per_split)
    m = torch.empty(b * h, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * h, splits, dh, dtype=torch.float32, device=q.device)
    g = h // kv
    _decode_attention[(b * kv, splits)](
        q, keys, values, slot_pos, position, m, l, acc, kv, slots, per_split, splits, chunk or 1, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), DH=dh, BLOCK_S=block_s, CHUNKED=chunk is not None,
        FP32_DOT=q.dtype == torch.float32 or not q.is_cuda)  # (the interpreter's bf16 dot is wrong)
    out = torch.empty(b, h, 1, dh, dtype=q.dtype, device=q.device)
    _decode_attention_combine[(b * h,)](m, l, acc, out, splits, DH=dh, SPLITS_PAD=triton.next_power_of_2(splits))
    return out


def _sms(device) -> int:
    """Multiprocessors of a CUDA device (4 under the interpreter: a few splits, quick to run)."""
    return multiprocessors(device) or 4
