"""Llama 4's mixture-of-experts feed-forward: router, stacked routed experts, shared expert.

For each token x (Llama 4, as in Meta's and Hugging Face's code):
  logits = router(x)                          one score per expert, no softmax
  top-k experts by raw logit; gate s = sigmoid(logit), no renormalisation
  out = shared_expert(x) + sum over chosen e of expert_e(s_e * x)
The gate multiplies the expert's INPUT, not its output (SwiGLU is not homogeneous, so the two
differ). Hugging Face runs every expert on every token with zero gates; we only run the chosen
ones, which is the same math.

Two dispatch paths give the same result (tests/test_moe.py):
  "reference": a loop over the experts that received tokens (read this one first)
  "fast":      sort token copies by expert, pad into one [experts, slots, d] batch, two bmm calls

Axes (einops names used in this file):
  n tokens (batch and time flattened), d model dim, e experts, f expert hidden dim,
  k top-k slot, a active experts, c slots per active expert (padded)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextConfig
from .layers import SwiGLU

DISPATCH_MODES = ("fast", "reference")


class Experts(nn.Module):
    """The routed experts, stacked as in the checkpoint: input-major (x @ W) with gate and up fused.
    gate_up_proj [e, d, 2f] (gate = first f columns, up = last f), down_proj [e, f, d]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, d, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, d, 2 * f))
        self.down_proj = nn.Parameter(torch.empty(e, f, d))

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x [n, d]: SwiGLU with the stacked weights."""
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * F.silu(gate)) @ self.down_proj[e]

    def batched(self, x: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
        """x [a, c, d] holds tokens for experts `experts` [a] (None = all, in order) -> [a, c, d]."""
        w_in, w_out = self.gate_up_proj, self.down_proj
        if experts is not None:
            w_in, w_out = w_in[experts], w_out[experts]
        gate, up = torch.bmm(x, w_in).chunk(2, dim=-1)
        return torch.bmm(up * F.silu(gate), w_out)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.n_experts = layer, cfg.num_experts_per_tok, cfg.num_local_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.dispatch = "fast"  # or "reference"
        self.trace = None  # a RouterTrace while one is active; costs one `is None` check when off

    def route(self, x: torch.Tensor):
        """x [n, d] -> logits [n, e], chosen experts [n, k], gates [n, k]."""
        logits = self.router(x)
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)  # top-k on raw logits
        gates = torch.sigmoid(top_logits.float()).to(x.dtype)  # sigmoid, not softmax; no renorm
        return logits, top_ids, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = rearrange(x, "b t d -> (b t) d")
        logits, top_ids, gates = self.route(x)
        if self.trace is not None:
            self.trace.record(self.layer, logits, top_ids, gates)
        routed = (self._reference if self.dispatch == "reference" else self._fast)(x, top_ids, gates)
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

    def _fast(self, x, top_ids, gates):
        """Sort the n*k token copies by expert, pad each active expert's group to c slots,
        run all active experts in two batched matmuls, and add the results back per token."""
        n, k = top_ids.shape
        flat_ids = rearrange(top_ids, "n k -> (n k)")
        order = torch.argsort(flat_ids, stable=True)
        sorted_ids = flat_ids[order]
        tokens = order // k  # which token each sorted copy came from
        counts = torch.bincount(flat_ids, minlength=self.n_experts)
        active = torch.nonzero(counts).flatten()  # experts with at least one token [a]
        group = torch.cumsum(counts > 0, 0)[sorted_ids] - 1  # index into `active` per copy
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n * k, device=x.device) - starts[sorted_ids]  # place within its group
        expert_in = x[tokens] * rearrange(gates, "n k -> (n k) 1")[order]
        padded = x.new_zeros(len(active), int(counts.max()), x.shape[1])
        padded[group, slot] = expert_in
        experts = None if len(active) == self.n_experts else active
        expert_out = self.experts.batched(padded, experts)[group, slot]
        return torch.zeros_like(x).index_add_(0, tokens, expert_out)
