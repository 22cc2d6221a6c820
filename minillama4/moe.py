"""Llama 4's mixture-of-experts feed-forward: router, stacked routed experts, shared expert.

For each token x (Llama 4, as in Meta's and Hugging Face's code):
  logits = router(x)                          one score per expert, no softmax
  top-k experts by raw logit; gate s = sigmoid(logit), no renormalisation
  out = shared_expert(x) + sum over chosen e of expert_e(s_e * x)
The gate multiplies the expert's INPUT, not its output (SwiGLU is not homogeneous, so the two
differ). Hugging Face runs every expert on every token with zero gates; we only run the chosen
ones, which is the same math.

Three dispatch paths give the same result (tests/test_moe.py):
  "reference": a loop over the experts that received tokens (read this one first)
  "fast":      sort the token copies by expert once, then a grouped matmul over the contiguous
               per-expert slices (torch._grouped_mm), or a loop over the slices without it
  "gather":    for decode: gather each token copy's expert weights by index and run a batched
               matmul. Copies k experts per token (wasteful beyond a few tokens) but never asks
               the host which experts were chosen, so a decode step can be a CUDA graph. On CUDA
               it skips the copy: a Triton kernel reads each row's expert in place (w4a16.py),
               int4 or not. "fast" takes the same kernel for int4 experts at decode on CUDA.
(A padded batched-matmul variant was slower on CPU: it copied the active experts' weights on
every call and padded every expert to the busiest one; see docs/benchmarks.md.)

Axes (einops names used in this file):
  b batch, t tokens, n tokens (b and t flattened), d model dim, e experts, f expert hidden dim,
  k top-k slot
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from .config import TextConfig
from .layers import SwiGLU, _fused, fused_ok, silu_mul

DISPATCH_MODES = ("fast", "reference", "gather")


class Experts(nn.Module):
    """The routed experts, stacked as in the checkpoint: input-major (x @ W) with gate and up fused.
    gate_up_proj [e, d, 2f] (gate = first f columns, up = last f), down_proj [e, f, d]."""

    def __init__(self, cfg: TextConfig, layer: int = 0):
        super().__init__()
        e, d, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, d, 2 * f))
        self.down_proj = nn.Parameter(torch.empty(e, f, d))
        self.std = cfg.initializer_range
        self.reset_parameters(seed=(torch.initial_seed() + layer) % 2**63)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """normal(0, initializer_range), as the model's init_weights, so that a model built with
        Llama4Text(cfg) works before any init (torch.empty memory may hold NaN). The constructor
        passes a seed (torch.initial_seed() + layer) for a generator of its own: the global one is
        left as it was, so Llama4Text.random(seed) draws what it always drew. Called without one
        (generic re-init code), it draws from the global generator, as nn.Linear's does. Nothing
        to do on the "meta" device."""
        if self.gate_up_proj.is_meta:
            return
        g = None if seed is None else torch.Generator(device=self.gate_up_proj.device).manual_seed(seed)
        self.gate_up_proj.normal_(0.0, self.std, generator=g)
        self.down_proj.normal_(0.0, self.std, generator=g)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x [n, d]: SwiGLU with the stacked weights."""
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * F.silu(gate)) @ self.down_proj[e]

    def gathered(self, ids: torch.Tensor, dtype=None):
        """The weights of experts `ids` [m] (a device tensor; copies): [m, d, 2f] and [m, f, d]."""
        return self.gate_up_proj[ids], self.down_proj[ids]

    def kernel_available(self, x: torch.Tensor) -> bool:
        """Whether the Triton rows-times-their-own-expert kernel (w4a16.py) runs on x's device."""
        from . import w4a16  # imported on first use: Triton is optional and slow to import

        return w4a16.available(x)

    def chosen(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row m of x [m, d] through expert ids[m] (a device tensor), the weights read in place
        by the kernel (no gathered copies). -> [m, d]."""
        from . import w4a16

        gate, up = w4a16.expert_matmul_dense(x, ids, self.gate_up_proj).chunk(2, dim=-1)
        return w4a16.expert_matmul_dense(silu_mul(gate, up), ids, self.down_proj)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.n_experts = layer, cfg.num_experts_per_tok, cfg.num_local_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg, layer)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.dispatch = "fast"  # or "reference"
        self.trace = None  # a RouterTrace while one is active; costs one `is None` check when off
        # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias [e] added to the logits
        # for choosing experts only, never for the gates. None = Llama 4 as published. A plain
        # attribute, not a buffer: checkpoints stay exactly Hugging Face's.
        self.selection_bias: torch.Tensor | None = None

    def route(self, x: torch.Tensor):
        """x [n, d] -> logits [n, e], chosen experts [n, k], gates [n, k]."""
        logits = self.router(x)
        if self.selection_bias is None and fused_ok(logits, kernel="top_k_gates"):  # the same in one kernel (fused.py)
            return (logits, *_fused().top_k_gates(logits, self.top_k, x.dtype))
        if self.selection_bias is None:
            top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)  # top-k on raw logits
        else:
            top_ids = torch.topk(logits + self.selection_bias, self.top_k, dim=-1).indices
            top_logits = logits.gather(-1, top_ids)
        gates = torch.sigmoid(top_logits.float()).to(x.dtype)  # sigmoid, not softmax; no renorm
        return logits, top_ids, gates

    def forward(self, x: torch.Tensor, router_outputs: list | None = None) -> torch.Tensor:
        """x [b, t, d] -> [b, t, d]. If `router_outputs` is a list, (layer, logits, top_ids, gates)
        is appended with gradients attached, for balancing losses during training."""
        b = x.shape[0]
        x = rearrange(x, "b t d -> (b t) d")
        logits, top_ids, gates = self.route(x)
        if self.trace is not None:
            self.trace.record(self.layer, logits, top_ids, gates)
        if router_outputs is not None:
            router_outputs.append((self.layer, logits, top_ids, gates))
        routed = {"fast": self._fast, "reference": self._reference, "gather": self._gather}[self.dispatch](x, top_ids, gates)
        out = self.shared_expert(x) + routed  # the shared expert sees every token, unscaled
        return rearrange(out, "(b t) d -> b t d", b=b)

    def _reference(self, x, top_ids, gates):
        """Loop over experts that received tokens; each gets its tokens scaled by their gate."""
        out = torch.zeros_like(x)
        for e in top_ids.unique().tolist():
            rows, slot = torch.where(top_ids == e)
            expert_in = x[rows] * gates[rows, slot, None]  # u_e = s_e * x: the gate scales the input
            out.index_add_(0, rows, self.experts.one(e, expert_in))
        return out

    def _gather(self, x, top_ids, gates):
        """Each of the n*k token copies gets its own copy of its expert's weights (gathered on the
        device by index), then one batched matmul per weight; the k outputs of a token are summed."""
        k = top_ids.shape[1]
        if self.experts.kernel_available(x):
            # on CUDA a Triton kernel reads each copy's expert itself, no weight copies (w4a16.py)
            expert_in = rearrange(x[:, None, :] * gates[..., None], "n k d -> (n k) d")  # u_e = s_e * x
            expert_out = self.experts.chosen(expert_in, rearrange(top_ids, "n k -> (n k)"))
            return expert_out if k == 1 else reduce(expert_out, "(n k) d -> n d", "sum", k=k)  # (k = 1: Scout)
        w_in, w_out = self.experts.gathered(rearrange(top_ids, "n k -> (n k)"), x.dtype)  # [m, d, 2f], [m, f, d]
        expert_in = rearrange(x[:, None, :] * gates[..., None], "n k d -> (n k) 1 d")  # u_e = s_e * x
        gate, up = torch.bmm(expert_in, w_in.to(x.dtype)).chunk(2, dim=-1)
        expert_out = torch.bmm(up * F.silu(gate), w_out.to(x.dtype))  # [(n k), 1, d]
        return reduce(expert_out, "(n k) 1 d -> n d", "sum", k=k)

    def _fast(self, x, top_ids, gates):
        """Sort the n*k token copies by expert once, then run each expert on its contiguous
        slice: one grouped matmul per weight where torch has one for this device and dtype
        (no host sync, no padding, no weight copies), else a loop over the slices."""
        k = top_ids.shape[1]
        quantized = getattr(self.experts, "quantized", False)
        if quantized and x.shape[0] * k < self.n_experts and self.experts.kernel_available(x):
            return self._gather(x, top_ids, gates)  # int4 decode on CUDA: the W4A16 kernel, no host sync
        flat_ids = rearrange(top_ids, "n k -> (n k)")
        order = torch.argsort(flat_ids, stable=True)
        tokens = order // k  # which token each sorted copy came from
        expert_in = x[tokens] * rearrange(gates, "n k -> (n k) 1")[order]  # u_e = s_e * x
        counts = torch.bincount(flat_ids, minlength=self.n_experts)
        # On CPU a handful of token copies (decode) is faster as a loop: measured in docs/benchmarks.md.
        # int4 experts (quant.py) loop for few tokens, one expert dequantized at a time; for more
        # tokens (prefill) all experts are dequantized into one scratch buffer shared by the layers.
        few = len(flat_ids) < self.n_experts and (quantized or x.device.type == "cpu")
        if quantized and self.n_experts > self.experts.max_scratch_experts:
            few = True  # too many experts to dequantize a whole layer at once: loop
        weights = () if quantized else (self.experts.gate_up_proj, self.experts.down_proj)  # (scratch: aligned)
        if not few and grouped_mm_supported(expert_in, *weights):
            w_in, w_out = self.experts.dequantized_all(expert_in.dtype) if quantized else weights
            ends = torch.cumsum(counts, 0).to(torch.int32)  # slice e is rows ends[e-1]:ends[e]
            gate, up = torch._grouped_mm(expert_in, w_in, offs=ends).chunk(2, dim=-1)
            expert_out = torch._grouped_mm(up * F.silu(gate), w_out, offs=ends)
        else:
            counts = counts.tolist()
            expert_out = torch.cat([self.experts.one(e, chunk) for e, chunk in
                                    enumerate(expert_in.split(counts)) if counts[e]])
        return torch.zeros_like(x).index_add_(0, tokens, expert_out)


_GROUPED_MM_PROBE: dict = {}


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm exists in recent torch, on CPU (fp32, bf16) and on recent GPUs (bf16);
    rows must be 16-byte aligned: x's, each weight's, and each weight's input rows (the second
    matmul's input is the [n, f] activation, so intermediate_size counts too). Probed once per
    device type and dtype with a tiny call."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((w.stride(-2) * w.element_size() % 16 or w.shape[-1] * w.element_size() % 16
            or w.shape[-2] * w.element_size() % 16 or not w.is_contiguous()) for w in weights) \
            or x.shape[-1] * x.element_size() % 16:
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_PROBE:
        try:
            a, b = torch.ones(2, 8, dtype=x.dtype, device=x.device), torch.ones(2, 8, 8, dtype=x.dtype, device=x.device)
            torch._grouped_mm(a, b, offs=torch.tensor([1, 2], dtype=torch.int32, device=x.device))
            _GROUPED_MM_PROBE[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_PROBE[key] = False
    return _GROUPED_MM_PROBE[key]
