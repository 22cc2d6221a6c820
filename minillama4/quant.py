"""int4 weight-only quantization: symmetric, group-wise (group 128 along the input dim), bf16 scales.

Meta's recipe for Scout on one GPU ("int4_mixed"): the feed-forward weights (routed experts,
shared expert, dense MLPs), which are ~94% of Scout's parameters, are stored in int4; attention,
router, embeddings, norms and lm_head stay bf16.

For a weight W [n, k] (n outputs, k inputs) and each group of 128 consecutive inputs:
    scale = max |W_group| / 8                       (symmetric absmax; Meta's int4_row_quantize)
    q     = clamp(round(W / scale), -8, 7)          stored as q + 8 in [0, 15], two per byte
    W'    = q * scale                               (dequantized)
Packed layout (one logical format on every device): uint8 [n, k/2], even k in the high nibble,
odd k in the low nibble; scales bf16 [k/group, n]. This is what torch's int4 matmul kernels take
(`_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU) after a per-device
conversion, with zero points 0 and their dequant formula w = (q - 8) * scale + zero.

Paths: `Int4Linear` uses the CPU int4 kernel for bf16 inputs on CPU; on CUDA for decode-sized
batches the faster (timed once per shape) of torch's tinygemm and the Triton W4A16 kernel; else it
dequantizes (the readable reference, also used for prefill).
`Int4Experts` dequantizes one expert at a time (reference path and few tokens); for prefill
every expert into one bf16 scratch buffer reused by all layers, then a grouped matmul
(`dequantized_all`; up to `max_scratch_experts` = 16 experts: Maverick's 128 go one at a time);
for static decode, the experts chosen by a device index tensor, no host sync: a Triton W4A16
kernel on CUDA (`chosen`, w4a16.py), else a gathered dequantized copy (`gathered`).

Axes: n output features, k input features, g groups along k, i an input within its group (k = g * i),
half packed bytes along k (k / 2), two the nibbles of a byte, e experts, m rows (gathered experts).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import check_int

GROUP = 128
QUANT_BLOCK = 1 << 22  # weights quantized at a time (quantize_int4): 16 MB of float32 temporaries


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., n, k] -> (packed uint8 [..., n, k/2], scales bf16 [..., k/group, n]).
    A block of about QUANT_BLOCK weights at a time: the float32 temporaries then stay a few tens
    of MB, where the whole tensor at once needed ~12 bytes per weight (measured; Scout's stacked
    experts, a 2.7 GB bf16 tensor, would need ~16 GB of them on the loading device)."""
    _check_weight(w, group)
    *lead, n, k = w.shape
    packed = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, k // group, n, dtype=torch.bfloat16, device=w.device)
    rows = max(1, QUANT_BLOCK // k)
    for i in itertools.product(*map(range, lead)):  # each matrix of the stack (none for a plain [n, k])
        for r in range(0, n, rows):
            packed[i][r:r + rows], scales[i][:, r:r + rows] = _quantize_rows(w[i][r:r + rows], group)
    # a NaN or inf weight makes its group's absmax scale, so its whole group, NaN: one check of the
    # scales (1/group of the weights), once per tensor, before anything is handed out
    bad = int((~torch.isfinite(scales)).sum())
    if bad:
        raise ValueError(f"int4 quantization: the weight {tuple(w.shape)} has NaN or inf values (in {bad} of its "
                         f"{scales.numel()} groups of {group}); each would turn its whole group into NaN")
    return packed, scales


def _check_weight(w, group) -> None:
    """What quantize_int4 takes: a float tensor [..., n, k], k a multiple of group (and even)."""
    if not isinstance(w, torch.Tensor) or w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"int4 quantization takes a real-valued weight tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    _check_group(group)
    if w.dim() < 2 or w.shape[-1] == 0:
        raise ValueError(f"int4 quantization needs a weight [out, in] (or a stack [..., out, in]) with in > 0, "
                         f"got shape {tuple(w.shape)}")
    k = w.shape[-1]
    if k % group or k % 2:
        raise ValueError(f"int4 quantization needs the input dim ({k}) to be a multiple of group={group} (and even)")


def _check_group(group) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group={group!r}: expected a positive int (Llama 4 uses {GROUP})")


def _check_in_dims(group: int, **dims) -> None:
    """Module sizes, before any buffer is made: group 0 divided by zero and a negative size failed
    in torch.zeros; an input dim must split into whole groups and whole bytes (two weights a byte)."""
    _check_group(group)
    for name, value in dims.items():
        check_int(name, value, 1)
        if value % group or value % 2:
            raise ValueError(f"{name}={value}: int4 needs the input dim to be a multiple of group={group} (and even)")


def _quantize_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] -> (packed uint8 [n, k/2], scales bf16 [k/group, n])."""
    wg = rearrange(w.to(torch.float32, copy=True), "n (g i) -> n g i", i=group)  # a copy: changed in place below
    # scale = absmax / 8, one per (output row, group), rounded to bf16 first so that quantizing and
    # dequantizing use the same scale; q = round(w / scale) in [-8, 7], stored as q + 8
    scale = (wg.abs().amax(-1, keepdim=True) / 8).clamp(min=1e-12).to(torch.bfloat16).float()
    q = rearrange(wg.div_(scale).round_().clamp_(-8, 7).add_(8).to(torch.uint8), "n g i -> n (g i)")
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed, rearrange(scale[..., 0], "n g -> g n").to(torch.bfloat16)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n, k/2] -> int values q + 8 in [0, 15], [..., n, k] (int32)."""
    hi, lo = (packed >> 4).to(torch.int32), (packed & 0xF).to(torch.int32)
    return rearrange(torch.stack([hi, lo], dim=-1), "... n half two -> ... n (half two)")


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(packed [..., n, k/2], scales [..., g, n]) -> W' [..., n, k] = (q - 8) * scale."""
    q = unpack_int4(packed).to(torch.float32) - 8
    group = q.shape[-1] // scales.shape[-2]
    per_weight = rearrange(scales.float(), "... g n -> ... n g 1")
    w = rearrange(q, "... n (g i) -> ... n g i", i=group) * per_weight
    return rearrange(w, "... n g i -> ... n (g i)").to(dtype)


def dequantize_on_device(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32,
                         out: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """dequantize_int4 (of [e, n, k/2] stacks, or of one [n, k/2] matrix): on CUDA one Triton
    kernel (w4a16.dequantize, the same values), elsewhere the readable version above. transpose:
    return [..., k, n], the x @ W layout; out: a buffer of that shape to write into."""
    single = packed.dim() == 2
    if packed.is_cuda:
        from . import w4a16

        if w4a16.available(packed):
            if single:
                packed, scales, out = packed[None], scales[None], None if out is None else out[None]
            w = w4a16.dequantize(packed, scales, dtype, out, transpose)
            return w[0] if single else w
    w = dequantize_int4(packed, scales, dtype)
    w = w.transpose(-2, -1) if transpose else w
    return w if out is None else out.copy_(w)


def _scales_and_zeros(scales: torch.Tensor) -> torch.Tensor:
    """Scales [g, n] -> the kernels' [g, n, 2] (scale, zero=0)."""
    return torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(torch.bfloat16).contiguous()


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with int4 weights. Buffers `packed` [out, in/2] and `scales` [in/group, out]."""

    def __init__(self, in_features: int, out_features: int, group: int = GROUP, device=None):
        super().__init__()
        _check_in_dims(group, in_features=in_features)
        check_int("out_features", out_features, 1)
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(in_features // group, out_features, dtype=torch.bfloat16, device=device))
        # (the kernel's packed layout, its scales and zeros), built on first use; dropped when the
        # weights are replaced (load_dense, load_state_dict, moves). After editing packed or scales
        # in place, set it to None.
        self._kernel_weight = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = GROUP) -> "Int4Linear":
        if linear.bias is not None:
            raise ValueError("Int4Linear supports bias-free linears only (all Llama 4 linears are)")
        q = cls(linear.in_features, linear.out_features, group, device=linear.weight.device)
        if not linear.weight.is_meta:  # on the meta device: an empty int4 module, filled by a loader
            q.load_dense(linear.weight.detach())
        return q

    def load_dense(self, weight: torch.Tensor) -> None:
        """Quantize a dense [out, in] weight into this module (used by streaming loads)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} does not fit Int4Linear({self.in_features} -> {self.out_features})")
        packed, scales = quantize_int4(weight, self.group)  # on the weight's device
        self.packed, self.scales, self._kernel_weight = packed, scales, None

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_on_device(self.packed, self.scales, dtype)

    def _kernel(self, x: torch.Tensor):
        """The int4 matmul kernel for this device, or None (then: dequantize + matmul)."""
        if x.dtype != torch.bfloat16 or self.group not in (32, 64, 128, 256):
            return None
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0:
            weight, scales = self._kernel_copy(lambda: (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.packed), 2),
                _scales_and_zeros(self.scales)))
            return lambda: torch._weight_int4pack_mm_for_cpu(rows, weight, self.group, scales)
        if x.device.type == "cuda" and rows.shape[0] <= 16:  # decode-sized: a GEMV kernel
            kernels = self._cuda_kernels(rows)
            name = _choose_linear_kernel(rows, self, kernels)
            if name != "tinygemm":
                self._kernel_weight = None  # tinygemm's copy of the weights is not needed
            return kernels[name]
        return None

    def _kernel_copy(self, build) -> tuple:
        """The kernel's own copy of the weights, built on first use (a plain check: this runs on
        every decode step)."""
        if self._kernel_weight is None:
            self._kernel_weight = build()
        return self._kernel_weight

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict copies into packed and scales in place: a kept kernel copy went on
        # computing with the old weights (found by fuzzing int4 loads)
        self._kernel_weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_weight = None  # .to(device) moves packed and scales, not this copy
        return super()._apply(fn, *args, **kwargs)

    def _cuda_kernels(self, rows: torch.Tensor) -> dict:
        """The decode kernels this shape can use on CUDA: torch's tinygemm (its own weight layout,
        built on first use) and the Triton W4A16 kernel of w4a16.py (quant.py's layout as is)."""
        from . import w4a16

        kernels = {}
        if self.in_features % 1024 == 0:  # tinygemm's tiling: fast for decode, slow for large batches
            def tinygemm():
                weight, scales = self._kernel_copy(lambda: (torch._convert_weight_to_int4pack(self.packed, 8),
                                                            _scales_and_zeros(self.scales)))
                return torch._weight_int4pack_mm(rows, weight, self.group, scales)
            kernels["tinygemm"] = tinygemm
        if w4a16.available(rows):  # a linear is expert 0 of a one-expert stack
            kernels["w4a16"] = lambda: w4a16.expert_matmul(rows, w4a16.zero_ids(rows.shape[0], rows.device),
                                                           self.packed[None], self.scales[None])
        kernels["dequantize"] = lambda: F.linear(rows, self.dequantized(rows.dtype))
        return kernels

    @staticmethod
    def run_together(x: torch.Tensor, linears) -> tuple | None:
        """x through several Int4Linears that share it (q, k, v; gate, up) as one kernel launch
        (w4a16.linears_matmul), or None: call them one by one. On CUDA, for decode-sized bf16
        inputs, the launch is timed once per set of shapes against the separate calls (each with its
        own chosen kernel) and kept only if faster; under Triton's interpreter it always runs."""
        from . import w4a16

        rows = x.reshape(-1, x.shape[-1])
        ins = {(lin.in_features, lin.group) for lin in linears}
        if (not all(isinstance(lin, Int4Linear) for lin in linears) or len(ins) != 1 or not 2 <= len(linears) <= 3
                or rows.shape[0] > 16 or not w4a16.available(rows) or (rows.is_cuda and x.dtype != torch.bfloat16)
                or not any(all(lin.out_features % t[0] == 0 for lin in linears) for t in w4a16.WORD_TILES)):
            return None
        parts = [(lin.packed, lin.scales) for lin in linears]
        together = lambda: w4a16.linears_matmul(rows, parts)  # noqa: E731
        if rows.is_cuda:
            key = (rows.shape[0], tuple(lin.out_features for lin in linears), rows.shape[1], rows.device)
            if key not in _TOGETHER:
                if torch.cuda.is_current_stream_capturing():
                    return None
                from .w4a16 import time_ms

                apart = time_ms(lambda: [lin(rows) for lin in linears])  # (each times its own kernels first)
                _TOGETHER[key] = time_ms(together) < apart
                if _TOGETHER[key]:
                    for lin in linears:
                        lin._kernel_weight = None  # tinygemm's copies are not needed
            if not _TOGETHER[key]:
                return None
        y = together()
        outs = y.split([lin.out_features for lin in linears], dim=-1)
        return tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(x)
        if kernel is not None:
            return kernel().reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group}"


_LINEAR_KERNEL: dict = {}  # (rows, out, in, device) -> the fastest decode kernel's name, measured
_TOGETHER: dict = {}  # (rows, outs, in, device) -> whether one launch beat separate calls, measured


def _choose_linear_kernel(rows: torch.Tensor, linear: Int4Linear, kernels: dict) -> str:
    """On CUDA, time each decode kernel once per shape (w4a16.time_ms) and keep the fastest;
    while a CUDA graph is being recorded use tinygemm (decode.DecodeStep runs a step before it
    records, so by then every shape has been timed)."""
    key = (rows.shape[0], linear.out_features, linear.in_features, rows.device)
    if key not in _LINEAR_KERNEL:
        fallback = "tinygemm" if "tinygemm" in kernels else "dequantize"
        if len(kernels) == 1 or torch.cuda.is_current_stream_capturing():
            return fallback
        from .w4a16 import time_ms

        times = {name: time_ms(fn) for name, fn in kernels.items() if name != "dequantize"}
        _LINEAR_KERNEL[key] = min(times, key=times.get)
    return _LINEAR_KERNEL[key]


class Int4Experts(nn.Module):
    """The stacked routed experts in int4. The checkpoint's gate_up_proj [e, d, 2f] and
    down_proj [e, f, d] (x @ W layout) are stored transposed like linears: [e, 2f, d] and [e, d, f]."""

    quantized = True
    # prefill dequantizes all experts of a layer into one scratch buffer when there are at most this
    # many (Scout's 16: 3.75 GiB in bf16); with more (Maverick's 128: 30 GiB) it loops, one at a time
    max_scratch_experts = 16

    def __init__(self, n_experts: int, dim: int, hidden: int, group: int = GROUP, device=None):
        super().__init__()
        check_int("n_experts", n_experts, 1)
        _check_in_dims(group, dim=dim, hidden=hidden)  # gate_up takes dim inputs, down takes hidden
        self.n_experts, self.dim, self.hidden, self.group = n_experts, dim, hidden, group
        u8, bf = torch.uint8, torch.bfloat16
        self.register_buffer("gate_up_packed", torch.zeros(n_experts, 2 * hidden, dim // 2, dtype=u8, device=device))
        self.register_buffer("gate_up_scales", torch.zeros(n_experts, dim // group, 2 * hidden, dtype=bf, device=device))
        self.register_buffer("down_packed", torch.zeros(n_experts, dim, hidden // 2, dtype=u8, device=device))
        self.register_buffer("down_scales", torch.zeros(n_experts, hidden // group, dim, dtype=bf, device=device))

    @classmethod
    def from_experts(cls, experts, group: int = GROUP) -> "Int4Experts":
        e, d, two_f = experts.gate_up_proj.shape
        q = cls(e, d, two_f // 2, group, device=experts.gate_up_proj.device)
        if not experts.gate_up_proj.is_meta:
            q.load_dense("gate_up_proj", experts.gate_up_proj.detach())
            q.load_dense("down_proj", experts.down_proj.detach())
        return q

    def load_dense(self, name: str, weight: torch.Tensor) -> None:
        """Quantize a checkpoint tensor (gate_up_proj [e, d, 2f] or down_proj [e, f, d])."""
        expected = {"gate_up_proj": (self.n_experts, self.dim, 2 * self.hidden),
                    "down_proj": (self.n_experts, self.hidden, self.dim)}[name]
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name} {tuple(weight.shape)} does not fit Int4Experts (expected {expected})")
        prefix = "gate_up" if name == "gate_up_proj" else "down"
        # x @ W with W [e, in, out] is a linear with weight W^T [e, out, in]
        packed, scales = quantize_int4(rearrange(weight, "e k n -> e n k"), self.group)  # on the weight's device
        setattr(self, f"{prefix}_packed", packed)
        setattr(self, f"{prefix}_scales", scales)

    def dequantized_all(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantized, in the x @ W layout of moe.Experts ([e, d, 2f] and [e, f, d]),
        written into a scratch buffer shared by all Int4Experts of this shape, device and dtype:
        prefill needs one layer's experts at a time, never all layers' (Scout: 3.75 GiB in bf16)."""
        w_in = _scratch("gate_up", (self.n_experts, self.dim, 2 * self.hidden), dtype, self.gate_up_packed.device)
        w_out = _scratch("down", (self.n_experts, self.hidden, self.dim), dtype, self.down_packed.device)
        if self.gate_up_packed.is_cuda:  # one kernel per stack, written in place (w4a16.dequantize)
            dequantize_on_device(self.gate_up_packed, self.gate_up_scales, dtype, out=w_in, transpose=True)
            dequantize_on_device(self.down_packed, self.down_scales, dtype, out=w_out, transpose=True)
            return w_in, w_out
        for e in range(self.n_experts):  # one expert at a time: the fp32 temporaries stay small
            w_in[e].copy_(dequantize_int4(self.gate_up_packed[e], self.gate_up_scales[e], dtype).T)
            w_out[e].copy_(dequantize_int4(self.down_packed[e], self.down_scales[e], dtype).T)
        return w_in, w_out

    def gathered(self, ids: torch.Tensor, dtype=torch.float32):
        """Experts `ids` [m] (a device tensor) dequantized, in the x @ W layout of moe.Experts:
        [m, d, 2f] and [m, f, d]. Gathers the packed int4 bytes, then dequantizes the copies."""
        w_in = dequantize_int4(self.gate_up_packed[ids], self.gate_up_scales[ids], dtype)  # [m, 2f, d]
        w_out = dequantize_int4(self.down_packed[ids], self.down_scales[ids], dtype)  # [m, d, f]
        return rearrange(w_in, "m n k -> m k n"), rearrange(w_out, "m n k -> m k n")

    def kernel_available(self, x: torch.Tensor) -> bool:
        """Whether the Triton W4A16 kernel (w4a16.py) can run on x's device."""
        from . import w4a16  # imported on first use: Triton is optional and slow to import

        return w4a16.available(x)

    def chosen(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row m of x [m, d] through expert ids[m] (a device tensor) with the W4A16 kernel: each
        row's expert is read from device memory and dequantized in registers. -> [m, d]."""
        from . import w4a16

        from .layers import silu_mul

        gate, up = w4a16.expert_matmul(x, ids, self.gate_up_packed, self.gate_up_scales).chunk(2, dim=-1)
        return w4a16.expert_matmul(silu_mul(gate, up), ids, self.down_packed, self.down_scales)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x [n, d] (dequantizes that expert's two matrices)."""
        w_in = dequantize_on_device(self.gate_up_packed[e], self.gate_up_scales[e], x.dtype)
        w_out = dequantize_on_device(self.down_packed[e], self.down_scales[e], x.dtype)
        gate, up = F.linear(x, w_in).chunk(2, dim=-1)
        return F.linear(up * F.silu(gate), w_out)


_SCRATCH: dict = {}


def _scratch(name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """A reused buffer per (name, shape, dtype, device): every MoE layer of a model (and every
    model with the same shapes) dequantizes into the same memory, one layer after another."""
    key = (name, shape, dtype, torch.device(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return _SCRATCH[key]


def free_scratch() -> None:
    """Release the prefill dequantization buffers (they are rebuilt on the next prefill)."""
    _SCRATCH.clear()


def quantize_model(model: nn.Module, which: str = "ffn", group: int = GROUP) -> nn.Module:
    """Replace, in place, the feed-forward weights ("ffn": routed experts, shared experts, dense
    MLPs; Meta's int4_mixed) or every decoder linear ("all": attention too) with int4 modules.
    Router, embeddings, norms, lm_head and the vision tower stay as they are. On a model built on
    the meta device this only swaps in empty int4 modules (for streaming loads).
    Every module is checked before the first is replaced: a refused model is left as it was."""
    if which not in ("ffn", "all"):
        raise ValueError(f"which={which!r}: expected 'ffn' or 'all'")
    _check_group(group)
    targets = _quant_targets(model, which)
    for parent, name, path in targets:
        _check_quantizable(getattr(parent, name), path, group)
    for parent, name, _ in targets:
        module = getattr(parent, name)
        setattr(parent, name, Int4Linear.from_linear(module, group) if isinstance(module, nn.Linear)
                else Int4Experts.from_experts(module, group))
    return model


def _quant_targets(model: nn.Module, which: str) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every module quantize_model replaces."""
    from .layers import SwiGLU

    text = getattr(model, "language_model", model)
    decoder = getattr(text, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(decoder, "layers"):
        raise TypeError(f"quantize_model takes a Llama4Text or Llama4 model, got {type(model).__name__}")
    prefix = "language_model.model" if text is not model else "model"
    targets = []
    for i, layer in enumerate(decoder.layers):
        at, ffn = f"{prefix}.layers.{i}", layer.feed_forward
        if which == "all":
            targets += [(layer.self_attn, name, f"{at}.self_attn.{name}")
                        for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp, mlp_at = ((ffn, f"{at}.feed_forward") if isinstance(ffn, SwiGLU)
                       else (ffn.shared_expert, f"{at}.feed_forward.shared_expert"))
        targets += [(mlp, name, f"{mlp_at}.{name}") for name in ("gate_proj", "up_proj", "down_proj")]
        if hasattr(ffn, "experts"):
            targets.append((ffn, "experts", f"{at}.feed_forward.experts"))
    return targets


def _check_quantizable(module: nn.Module, path: str, group: int) -> None:
    """Refuse, naming the module, what Int4Linear.from_linear / Int4Experts.from_experts would refuse
    halfway through a model (or quantize into NaN groups)."""
    from .checkpoint import _is_finite

    if isinstance(module, (Int4Linear, Int4Experts)):
        raise ValueError(f"{path} is already int4 ({type(module).__name__}): this model is already quantized; "
                         "quantize_model takes a model with dense weights")
    if isinstance(module, nn.Linear):
        weights, ins = {"weight": module.weight}, [module.in_features]
        if module.bias is not None:
            raise ValueError(f"{path}: Int4Linear supports bias-free linears only (all Llama 4 linears are)")
    else:  # moe.Experts: gate_up_proj [e, d, 2f], down_proj [e, f, d] (x @ W layout: inputs are dim 1)
        weights = {"gate_up_proj": module.gate_up_proj, "down_proj": module.down_proj}
        ins = [w.shape[1] for w in weights.values()]
    if any(k % group or k % 2 for k in ins):
        raise ValueError(f"{path}: int4 needs input dims {ins} to be multiples of group={group} (configs.tiny() is "
                         "too narrow for int4; configs.small() and the published shapes fit)")
    for name, w in weights.items():
        if not w.is_meta and not _is_finite(w.detach()):
            raise ValueError(f"{path}.{name} has NaN or inf values: int4 would turn each of their groups of "
                             f"{group} into NaN; fix or reload the weights first")


def randomize_int4(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Fill an int4 module with random weights of about `std` directly in int4 (no dense detour):
    q uniform in [0, 15], so q - 8 has std sqrt((16^2 - 1) / 12) - about 4.61."""
    for name, buf in module.named_buffers(recurse=False):
        if name.endswith("packed"):
            buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, device=buf.device, generator=generator))
        elif name.endswith("scales"):
            buf.fill_(std / ((16**2 - 1) / 12) ** 0.5)
    if isinstance(module, Int4Linear):
        module._kernel_weight = None
