"""Load balancing for the MoE router: auxiliary losses, aux-loss-free bias updates, metrics, dropping.

Meta has not published how Llama 4 balances its experts during training: the model card and the
released code say nothing about a balancing loss or a bias. Hugging Face's Llama4TextConfig has
a `router_aux_loss_coef` field, but transformers' Llama 4 never uses it (no auxiliary loss is
computed for Llama 4). So this module offers the published alternatives, for experiments:

  switch_aux_loss     Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6)
  router_z_loss       ST-MoE router z-loss (Zoph et al. 2022, eq. 5)
  update_selection_bias  DeepSeek-V3 auxiliary-loss-free balancing (arXiv 2412.19437, §2.1.2)
  drop_tokens         expert capacity and token dropping (Switch / GShard capacity factor)
  load_stats          imbalance of a load vector (max/mean, CV, entropy; from minillama4.trace)

Every loss takes ONE MoE layer's router outputs; `balancing_losses` averages them over the MoE
layers of one forward pass (the mean, not the sum, so a coefficient means the same at any depth).
Losses are computed in fp32.

Axes: n tokens (batch and time flattened, batch-major), e experts, k top-k slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, reduce

from .checks import check_int, check_real, check_type
from .moe import MoE
from .trace import load_stats

__all__ = ["expert_load", "switch_aux_loss", "router_z_loss", "balancing_losses", "bias_update",
           "update_selection_bias", "expert_capacity", "drop_tokens", "DropResult",
           "dropped_fraction", "load_stats", "imbalance"]


def _check_top_ids(top_ids) -> None:
    check_type("top_ids", top_ids, torch.Tensor, "[n, k] expert ids, e.g. from model(ids, router_outputs=...)")
    if top_ids.dim() != 2 or top_ids.dtype.is_floating_point or top_ids.dtype == torch.bool:
        raise ValueError(f"top_ids {tuple(top_ids.shape)} {top_ids.dtype}: expected [n, k] integer expert ids")


def expert_load(top_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """top_ids [n, k] -> [e] number of token copies sent to each expert (sums to n*k)."""
    _check_top_ids(top_ids)
    check_int("n_experts", n_experts, 1)
    flat = rearrange(top_ids, "n k -> (n k)")
    try:
        load = torch.bincount(flat, minlength=n_experts)
    except RuntimeError:  # a negative id (bincount's own message does not say which); anything else is re-raised
        if int(flat.min()) >= 0:
            raise
        load = None
    # an id >= e made the load longer than e: checked on the result, so valid ids cost no extra host read
    if load is None or load.shape[0] > n_experts:
        low, high = int(flat.min()), int(flat.max())
        raise ValueError(f"top_ids holds expert ids in [{low}, {high}]: n_experts={n_experts} needs them "
                         f"in [0, {n_experts})")
    return load


# ------------------------------------------------------------------------------ auxiliary losses
def switch_aux_loss(logits: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss of one MoE layer; 1.0 when perfectly balanced.

    logits [n, e] raw router logits, top_ids [n, k] the experts the tokens were sent to.
    f_i is the fraction of the n*k token copies dispatched to expert i (for top-1 exactly Switch's
    f_i; for top-k it still sums to 1, so a uniform router gives 1 for any k, whereas Hugging
    Face's Mixtral version sums over the k slots and gives k). P_i is the mean SOFTMAX probability
    of expert i over the router logits, as in Switch. Llama 4 gates with a sigmoid, not a softmax;
    the softmax here exists only to make this loss, it never changes the gates. Only P carries a
    gradient (f counts discrete choices), which pushes probability away from busy experts.
    Multiply by a coefficient alpha (Switch used 1e-2) before adding it to the loss.
    """
    check_type("logits", logits, torch.Tensor, "[n, e] router logits")
    _check_top_ids(top_ids)
    if logits.dim() != 2 or top_ids.shape[0] != logits.shape[0]:  # f and P must count the same n tokens
        raise ValueError(f"logits {tuple(logits.shape)} and top_ids {tuple(top_ids.shape)}: expected logits [n, e] "
                         "and top_ids [n, k] of the same n tokens")
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    # Switch eq. 5: f_i = (1/T) sum_x 1{x dispatched to i}   (here over the n*k copies)
    f = expert_load(top_ids, e).float() / top_ids.numel()
    # Switch eq. 6: P_i = (1/T) sum_x p_i(x)
    p = reduce(probs, "n e -> e", "mean")
    # Switch eq. 4: loss = N * sum_i f_i * P_i   (alpha is applied by the caller)
    return e * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss of one MoE layer: penalises large router logits, which keeps the
    router numerically stable (its exp() stays small in bf16). logits [n, e] -> scalar.
    With sigmoid gates (Llama 4) large logits saturate the gate; the loss is the same formula."""
    # ST-MoE eq. 5: L_z = (1/B) sum_i (log sum_j exp(x_j^(i)))^2
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def balancing_losses(router_outputs: list) -> dict[str, torch.Tensor]:
    """The list filled by model(ids, router_outputs=list) -> {"switch_aux": ..., "z_loss": ...},
    each the MEAN over the MoE layers of the per-layer loss above, with gradients."""
    if not router_outputs:
        zero = torch.zeros(())
        return {"switch_aux": zero, "z_loss": zero}
    switch = torch.stack([switch_aux_loss(logits, ids) for _, logits, ids, _ in router_outputs])
    z = torch.stack([router_z_loss(logits) for _, logits, _, _ in router_outputs])
    return {"switch_aux": switch.mean(), "z_loss": z.mean()}


# ------------------------------------------------------------------------------ aux-loss-free
def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """One DeepSeek-V3 step for one MoE layer: bias [e], load [e] (tokens per expert in this
    training step) -> new bias [e]. Overloaded experts go down by `rate`, underloaded ones up;
    an expert exactly at the mean load stays (sign(0) = 0)."""
    check_real("rate", rate, low=0)  # NaN made every bias NaN; a negative rate pushes towards imbalance
    check_type("bias", bias, torch.Tensor, "[e] selection bias")
    check_type("load", load, torch.Tensor, "[e] tokens per expert, e.g. expert_load(top_ids, e)")
    if bias.dim() != 1 or load.shape != bias.shape:  # a [e, 1] load broadcast to an [e, e] bias; a [1] one did nothing
        raise ValueError(f"bias {tuple(bias.shape)} and load {tuple(load.shape)}: expected one load per expert, "
                         "both of shape (e,)")
    load = load.to(bias.device, torch.float32)
    # DeepSeek-V3 §2.1.2: b_i <- b_i + gamma * sign(mean load - load_i)   (gamma = rate)
    return bias + rate * torch.sign(load.mean() - load)


@torch.no_grad()
def update_selection_bias(model, loads: dict[int, torch.Tensor], rate: float) -> None:
    """Apply `bias_update` to every MoE layer of `model`: loads maps layer index -> [e] loads
    (e.g. `expert_load` of that layer's top_ids in the last step). A layer whose selection_bias
    is None starts from zeros. The bias is added to the router logits only to CHOOSE the experts
    (moe.MoE.route); the gates still come from the raw logits, as in DeepSeek-V3, whose gates
    are sigmoids too, like Llama 4's. The bias has no gradient: it is a controller, not a weight.
    Every load is checked before any bias changes."""
    check_real("rate", rate, low=0)
    moes = {m.layer: m for m in model.modules() if isinstance(m, MoE)}
    check_type("loads", loads, dict, "{layer index: [e] loads}")
    for layer, load in loads.items():
        if layer not in moes:  # used to be ignored silently
            raise ValueError(f"loads has layer {layer!r}, which is not an MoE layer of this model "
                             f"(its MoE layers: {sorted(moes)})")
        if not isinstance(load, torch.Tensor) or tuple(load.shape) != (moes[layer].n_experts,):
            shape = tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
            raise ValueError(f"loads[{layer}] {shape}: expected one load per expert, shape ({moes[layer].n_experts},)")
    for m in moes.values():
        if m.layer in loads:
            bias = m.selection_bias
            if bias is None:
                bias = torch.zeros(m.n_experts, device=m.router.weight.device)
            m.selection_bias = bias_update(bias.float(), loads[m.layer], rate)


# ------------------------------------------------------------------------------ capacity, dropping
def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Token copies one expert may take: capacity = ceil(factor * n * k / e)."""
    # Switch §2.2, eq. 3: capacity = (tokens per batch / number of experts) * capacity factor,
    # here counting the n*k token copies of top-k routing and rounding up
    check_int("n_tokens", n_tokens, 0)
    check_int("top_k", top_k, 1)
    check_int("n_experts", n_experts, 1)
    check_real("capacity_factor", capacity_factor, 0, low_open=True)  # 0 drops everything; NaN/inf cannot round
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


@dataclass
class DropResult:
    kept: torch.Tensor  # [n, k] True where the token copy fits in its expert's capacity
    dropped: torch.Tensor  # [n, k] the complement of kept
    capacity: int  # token copies each expert may take
    drop_fraction: float  # dropped copies / (n * k)


def drop_tokens(top_ids: torch.Tensor, n_experts: int, capacity_factor: float) -> DropResult:
    """Which token copies an expert with a fixed capacity would drop. Each expert takes copies in
    order until it is full; the order is slot-major as in GShard (every token's first choice
    before any second choice), then token order, so with top-1 it is plain token order. Llama 4
    (and minillama4's MoE) never drops: this shows what a capacity-limited system would do.
    A dropped copy contributes nothing from that expert (the residual and shared expert remain)."""
    _check_top_ids(top_ids)
    n, k = top_ids.shape
    check_int("n_experts", n_experts, 1)
    if top_ids.numel() and not 0 <= int(top_ids.min()) <= int(top_ids.max()) < n_experts:
        raise ValueError(f"top_ids holds expert ids in [{int(top_ids.min())}, {int(top_ids.max())}]: "
                         f"n_experts={n_experts} needs them in [0, {n_experts})")
    capacity = expert_capacity(n, k, n_experts, capacity_factor)
    flat = rearrange(top_ids, "n k -> (k n)")  # slot-major priority order
    one_hot = torch.nn.functional.one_hot(flat, n_experts)  # [(k n), e]
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each copy in its expert's queue
    kept = rearrange(position < capacity, "(k n) -> n k", k=k)
    return DropResult(kept=kept, dropped=~kept, capacity=capacity,
                      drop_fraction=float((~kept).sum()) / max(top_ids.numel(), 1))


def dropped_fraction(load: torch.Tensor, capacity_factor: float, top_k: int = 1) -> float:
    """Fraction of token copies a capacity factor would drop, from a load vector [e] alone
    (sum over experts of max(0, load_i - capacity) / total); equals drop_tokens(...).drop_fraction
    whatever the order. Handy on the per-step loads a training History records: one layer's
    row at a time, e.g. [dropped_fraction(row, 1.25) for row in history.load[-1]]."""
    check_type("load", load, torch.Tensor, "[e] token copies per expert")
    if load.dim() != 1:  # a [layers, e] load would count its layers as experts
        raise ValueError(f"load has shape {tuple(load.shape)}: expected one layer's [e] loads; for a [layers, e] "
                         "load (a History step), take one row per layer")
    check_real("capacity_factor", capacity_factor, 0, low_open=True)
    check_int("top_k", top_k, 1)
    total = int(load.sum())
    capacity = expert_capacity(total // top_k, top_k, len(load), capacity_factor)
    return float((load - capacity).clamp(min=0).sum()) / max(total, 1)


# ------------------------------------------------------------------------------ metrics
def imbalance(loads: torch.Tensor) -> list[dict]:
    """loads [layers, e] (or [e]) -> one `load_stats` dict per row: tokens, max_over_mean
    (1 = perfect), cv (0 = perfect), entropy and entropy_frac (1 = perfect)."""
    check_type("loads", loads, torch.Tensor, "[layers, e] or [e] token copies per expert")
    if loads.dim() not in (1, 2):
        raise ValueError(f"loads has shape {tuple(loads.shape)}: expected [layers, e] or one layer's [e] loads; "
                         "for a History's [steps, layers, e] loads, take one step at a time")
    # load_stats reads every row to the host anyway; a negative count gave a negative entropy
    if loads.numel() and float(loads.min()) < 0:
        raise ValueError(f"loads holds a negative load ({float(loads.min()):g}): expected token counts >= 0")
    loads = loads if loads.dim() == 2 else rearrange(loads, "e -> 1 e")
    return [load_stats(row) for row in loads]
