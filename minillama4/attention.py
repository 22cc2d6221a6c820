"""Grouped-query attention with Llama 4's two layer kinds, and the KV cache.

  RoPE layers: interleaved RoPE on q and k, then (Scout) the weightless QK RMS norm, and
               chunked causal attention: a token sees only earlier tokens of its own chunk.
  NoPE layers: no positional encoding, full causal attention, and temperature tuning:
               queries are scaled up with their absolute position so attention stays sharp
               over very long contexts.

Axes (einops names used in this file):
  b batch, t query tokens, s key/value tokens (cache included), h query heads, k kv heads,
  g query heads per kv head (h = k * g), dh head dim, d model dim

Simplifications: no attention padding mask (batches hold equal-length prompts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from .checks import check_bool, check_int
from .config import TextConfig
from .layers import _fused, apply_rope, fused_ok, project, rms_norm


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [t, s], True where query position q may attend to key position k:
    causal (k <= q) and, for chunked layers, in the same chunk (q // chunk == k // chunk).
    A key position of -1 marks an empty cache slot (static decode) and is never attended.
    (On CUDA one fused kernel computes the same, fused.py.)"""
    if fused_ok(q_pos, kernel="attention_mask"):
        from .fused import attention_mask as fused_mask

        return fused_mask(q_pos, k_pos, chunk)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
    if chunk is not None:
        allowed &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
    return allowed


def nope_temperature(positions: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Query scale per absolute 0-based position p (fp32), exactly 1 for p < floor_scale - 1:
    s(p) = 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1)      (Llama 4; arXiv 2501.19399)"""
    return 1.0 + attn_scale * torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale))


def cache_layout(cfg: TextConfig) -> tuple:
    """What a cache's buffers depend on: layers, kv heads, head dim, and which layers are chunked."""
    chunked = tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_chunked(i))
    return (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_chunk_size, chunked)


def _check_memory(cfg: TextConfig, batch: int, max_len: int, slots: list, dtype, device) -> None:
    """Refuse, before allocating, a cache that does not fit in the device's free memory."""
    from .plan import GIB, MemoryPlanError, available_bytes

    if torch.device(device).type not in ("cpu", "cuda"):  # no free-memory figure to compare with
        return
    per_slot = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize + 8  # k, v + its position
    need, free = sum(slots) * per_slot, available_bytes(device)
    if torch.device(device).type == "cuda":  # blocks torch's allocator holds but no tensor uses are free too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need > free:
        raise MemoryPlanError(f"a KV cache of {max_len:,} positions x batch {batch} needs {need / GIB:,.1f} GiB "
                              f"({dtype}) on {device} but only {free / GIB:,.1f} GiB is free; ask for fewer "
                              "positions (prompt + max_new_tokens) or a smaller batch")


class KVCache:
    """Keys and values for every layer, preallocated. `length` is the number of positions
    already written (the next token's position); the context may grow to `max_len`.

    NoPE layers (full attention) keep every position. Chunked RoPE layers only ever look back
    within their own chunk, so with ring=True they keep a ring buffer of `chunk` slots: position
    p lives in slot p % chunk, and each slot remembers its absolute position so the chunk mask
    can be applied. For Scout at 1M tokens that keeps 36 of 48 layers at 8,192 slots.
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype, device, ring: bool = True):
        batch, max_len = check_int("batch", batch, 1), check_int("max_len", max_len, 1)
        check_bool("ring", ring)
        slots = [min(cfg.attention_chunk_size, max_len) if ring and cfg.is_chunked(layer) else max_len
                 for layer in range(cfg.num_hidden_layers)]
        _check_memory(cfg, batch, max_len, slots, dtype, device)
        self.max_len, self.batch, self.length = max_len, batch, 0
        self.layout, self.dtype = cache_layout(cfg), dtype
        # static=True (set by decode.DecodeStep): update() writes in place and returns the whole
        # buffers, so every step has the same shapes and no host sync (CUDA-graph capturable)
        self.static = False
        self.keys, self.values, self.slot_pos = [], [], []
        for n in slots:
            shape = (batch, cfg.num_key_value_heads, n, cfg.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
            self.slot_pos.append(torch.full((n,), -1, dtype=torch.long, device=device))  # -1 = empty
        self.device = self.keys[0].device  # "cuda" -> "cuda:0", as the model reports it

    def check_room(self, new_tokens: int, batch: int) -> None:
        if batch != self.batch:
            raise ValueError(f"batch of {batch} does not match the KV cache's batch of {self.batch}")
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"context of {self.length + new_tokens} tokens is longer than the KV cache "
                             f"({self.max_len} positions); allocate a larger cache")

    def check_model(self, cfg: TextConfig, dtype, device) -> None:
        """Refuse a cache made for another model: other layers or head shapes, dtype or device."""
        if self.layout != cache_layout(cfg):
            raise ValueError("the KV cache was made for another model (layers, kv heads, head_dim, chunking: "
                             f"{self.layout} vs this model's {cache_layout(cfg)}); use model.new_cache(batch, max_len)")
        if self.dtype != dtype or self.device != device:
            raise ValueError(f"the KV cache holds {self.dtype} on {self.device} but the model computes in {dtype} "
                             f"on {device}; use model.new_cache(batch, max_len) after moving or casting the model")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v ([b, k, t, dh]) for `positions` [t]; return the keys, values and absolute
        positions this layer can attend to now (in no particular order, with masked-out slots
        among them: the attention mask is built from the positions returned)."""
        keys, values, slot_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        slots = keys.shape[2]
        if self.static:  # one decode token at a device position: slot = p % slots (= p in a full cache)
            if k.shape[2] != 1:
                raise ValueError(f"a static KV cache update takes one token per step, got {k.shape[2]}")
            if fused_ok(k, kernel="cache_write"):  # the three writes below in one kernel (fused.py)
                from .fused import cache_write

                cache_write(k, v, positions, keys, values, slot_pos)
                return keys, values, slot_pos
            slot = positions % slots
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            slot_pos.index_copy_(0, slot, positions)
            return keys, values, slot_pos  # empty slots hold -1 and are masked out
        # the forward passes positions = length, length + 1, ...: bounds come from `length` (a Python
        # int), never from the device tensor (no host sync per layer)
        if slots == self.max_len:  # full cache: position p in slot p
            end = self.length + k.shape[2]
            keys[:, :, self.length:end], values[:, :, self.length:end] = k, v
            slot_pos[self.length:end] = positions
            return keys[:, :, :end], values[:, :, :end], slot_pos[:end]
        if k.shape[2] == 1:  # ring, one token (decode): into its slot first, then the filled slots.
            # The slot's old occupant, position p - slots, lies in an earlier chunk: never needed now.
            slot = self.length % slots
            keys[:, :, slot:slot + 1], values[:, :, slot:slot + 1] = k, v
            slot_pos[slot:slot + 1] = positions
            held = min(self.length + 1, slots)
            return keys[:, :, :held], values[:, :, :held], slot_pos[:held]
        # ring, several tokens: what is cached, plus the new tokens (the mask drops old chunks). Slots
        # fill in order (position p in slot p % slots), so the cached ones are the first min(length, slots).
        held = min(self.length, slots)
        k_all = torch.cat([keys[:, :, :held], k], dim=2)
        v_all = torch.cat([values[:, :, :held], v], dim=2)
        pos_all = torch.cat([slot_pos[:held], positions])
        last = positions[-slots:]  # only the newest `slots` tokens can still be needed later
        keys[:, :, last % slots], values[:, :, last % slots] = k[:, :, -slots:], v[:, :, -slots:]
        slot_pos[last % slots] = last
        return k_all, v_all, pos_all


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.n_heads, self.n_kv, self.dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope  # never on NoPE layers
        self.chunk = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.temperature = cfg.attn_temperature_tuning and not self.use_rope  # only on NoPE layers
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.dh, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.dh, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.dh, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.dh, cfg.hidden_size, bias=bias)

    def queries(self, x: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, t, d] at absolute positions [t] -> q [b, t, h, dh]: RoPE, QK norm, temperature.
        projected: q_proj(x) if already computed."""
        q = rearrange(self.q_proj(x) if projected is None else projected, "b t (h dh) -> b t h dh", dh=self.dh)
        if self.use_rope:
            q = apply_rope(q, freqs_cis)
        if self.use_qk_norm:  # after RoPE, per head over dh, no weight
            q = rms_norm(q, self.cfg.rms_norm_eps)
        if self.temperature:
            s = nope_temperature(positions, self.cfg.floor_scale, self.cfg.attn_scale)
            q = (q * rearrange(s, "t -> 1 t 1 1")).to(q.dtype)
        return q

    def keys(self, x: torch.Tensor, freqs_cis: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, t, d] -> k [b, t, k, dh]: RoPE and QK norm (no temperature on keys).
        projected: k_proj(x) if already computed."""
        k = rearrange(self.k_proj(x) if projected is None else projected, "b t (k dh) -> b t k dh", dh=self.dh)
        if self.use_rope:
            k = apply_rope(k, freqs_cis)
        if self.use_qk_norm:
            k = rms_norm(k, self.cfg.rms_norm_eps)
        return k

    def weights(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The attention weights themselves, for inspection (forward never forms them: SDPA fuses
        them): q [b, t, h, dh], k [b, s, k, dh] -> [b, h, t, s], fp32, this layer's mask."""
        q = rearrange(q.float(), "b t (k g) dh -> b k g t dh", k=self.n_kv)  # query heads i*g.. share kv head i
        # softmax(q k^T / sqrt(dh) + mask)      (Vaswani et al. 2017, eq. 1)
        scores = einsum(q, k.float(), "b k g t dh, b s k dh -> b k g t s") * self.dh**-0.5
        scores = scores.masked_fill(~attention_mask(q_pos, k_pos, self.chunk), float("-inf"))
        return rearrange(scores.softmax(-1), "b k g t s -> b (k g) t s")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, freqs_cis: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [b, t, d] at absolute positions [t] -> [b, t, d]."""
        q_x, k_x, v_x = project(x, self.q_proj, self.k_proj, self.v_proj)  # (int4 on CUDA: maybe one launch)
        if fused_ok(q_x, kernel="qk_prepare") and (self.use_rope or self.use_qk_norm or self.temperature):
            # on CUDA: queries() and keys() below, for q and k together, in one kernel (fused.py)
            q, k = _fused().qk_prepare(
                q_x, k_x, positions, freqs_cis, self.n_heads, self.n_kv, self.cfg.rms_norm_eps, self.use_rope,
                self.use_qk_norm, (self.cfg.floor_scale, self.cfg.attn_scale) if self.temperature else None)
        else:
            q, k = self.queries(x, positions, freqs_cis, q_x), self.keys(x, freqs_cis, k_x)
        v = rearrange(v_x, "b t (k dh) -> b k t dh", dh=self.dh)
        q = rearrange(q, "b t h dh -> b h t dh")
        k = rearrange(k, "b t k dh -> b k t dh")
        k_pos = positions
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions)
            if cache.static and fused_ok(q, kernel="decode_attention") and _fused().decode_attention_ok(q, k):
                # static decode on CUDA: the mask and the two lines below in one kernel (fused.py)
                o = _fused().decode_attention(q, k, v, k_pos, positions, self.chunk, self.dh**-0.5)
                return self.o_proj(rearrange(o, "b h t dh -> b t (h dh)"))
        mask = attention_mask(positions, k_pos, self.chunk)
        # GQA: kv head i serves the g = h // k consecutive query heads i*g .. i*g + g - 1, as if
        # k and v were repeated "b k s dh -> b (k g) s dh"; enable_gqa does that without a copy.
        # softmax(q k^T / sqrt(dh) + mask) v      (Vaswani et al. 2017, eq. 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.dh**-0.5,
                                           enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(rearrange(o, "b h t dh -> b t (h dh)"))
