"""RouterTrace: watch the router decide, token by token and layer by layer.

    with RouterTrace(model) as trace:
        model(ids)
    trace.expert_ids(layer)   # [n, k] experts chosen for each of the n traced tokens
    trace.load(layer)         # tokens per expert
    trace.summary()           # per layer: max/mean load, coefficient of variation, entropy

Every forward call made inside the `with` block is recorded (a generate() call records the
prompt, then one token per step). Tokens are flattened batch-major, in call order. A call that
raises before every MoE layer has recorded is left out, so tokens and router records stay aligned.
When no trace is active the model pays one `is None` check per MoE layer (see `minillama4 bench`).

Axes: n traced tokens, e experts, k top-k slot.
"""

from __future__ import annotations

import math

import torch


class RouterTrace:
    def __init__(self, model):
        from .model import Llama4Text

        self.model = getattr(model, "language_model", model)  # Llama4 (multimodal) or Llama4Text
        if not isinstance(self.model, Llama4Text):
            raise TypeError(f"RouterTrace takes a Llama4Text or Llama4 model, got {type(model).__name__}")
        self.moe_layers = [m.layer for m in _moe_modules(model)]
        self.n_experts = model.cfg.num_local_experts
        self._logits = {i: [] for i in self.moe_layers}
        self._ids = {i: [] for i in self.moe_layers}
        self._gates = {i: [] for i in self.moe_layers}
        self._tokens, self._positions, self._is_image = [], [], []

    # ------------------------------------------------------------- recording (called by the model)
    def __enter__(self) -> "RouterTrace":
        moes = _moe_modules(self.model)
        busy = [m.layer for m in moes if m.trace is not None]
        if self.model.trace is not None or busy:  # checked before attaching anything: all or nothing
            raise RuntimeError(f"a RouterTrace is already active on this model (MoE layers {busy} hold one); "
                               "leave its `with` block first")
        for m in moes:
            m.trace = self
        self.model.trace = self
        return self

    def __exit__(self, *exc):
        for m in _moe_modules(self.model):
            if m.trace is self:
                m.trace = None
        if self.model.trace is self:
            self.model.trace = None
        return False

    def _steps(self) -> int:
        """Forward calls whose every MoE layer recorded (a call that raised partway is not one)."""
        return min([len(self._tokens), *(len(parts) for parts in self._ids.values())])

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor, is_image: torch.Tensor):
        """One forward call starts: input_ids [b, t], absolute positions [t], image mask [b, t]."""
        done = self._steps()  # drop what a call that raised partway left behind
        for parts in (self._tokens, self._positions, self._is_image,
                      *self._logits.values(), *self._ids.values(), *self._gates.values()):
            del parts[done:]
        b = input_ids.shape[0]
        self._tokens.append(input_ids.detach().reshape(-1).cpu())
        self._positions.append(positions.detach().repeat(b).cpu())
        self._is_image.append(is_image.detach().reshape(-1).cpu())

    def record(self, layer: int, logits: torch.Tensor, top_ids: torch.Tensor, gates: torch.Tensor):
        self._logits[layer].append(logits.detach().float().cpu())
        self._ids[layer].append(top_ids.detach().cpu())
        self._gates[layer].append(gates.detach().float().cpu())

    # ------------------------------------------------------------- reading
    def _cat(self, parts: list, empty_shape=(0,), dtype=torch.float) -> torch.Tensor:
        parts = parts[:self._steps()]  # complete calls only
        return torch.cat(parts) if parts else torch.zeros(empty_shape, dtype=dtype)

    def _layer(self, layer, records: dict) -> list:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer!r} is not an MoE layer; MoE layers are {self.moe_layers}")
        return records[layer]

    def token_ids(self) -> torch.Tensor:
        return self._cat(self._tokens, dtype=torch.long)

    def positions(self) -> torch.Tensor:
        return self._cat(self._positions, dtype=torch.long)

    def is_image(self) -> torch.Tensor:
        """[n] True for image-patch tokens (<|patch|> positions filled with image features)."""
        return self._cat(self._is_image, dtype=torch.bool)

    def logits(self, layer: int) -> torch.Tensor:
        """[n, e] raw router logits (fp32)."""
        return self._cat(self._layer(layer, self._logits), (0, self.n_experts))

    def expert_ids(self, layer: int) -> torch.Tensor:
        """[n, k] chosen experts, best first."""
        return self._cat(self._layer(layer, self._ids), (0, 1), torch.long)

    def gates(self, layer: int) -> torch.Tensor:
        """[n, k] sigmoid gate of each chosen expert."""
        return self._cat(self._layer(layer, self._gates), (0, 1))

    def load(self, layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[e] number of token copies sent to each expert (optionally only tokens where mask, a
        bool tensor [n] such as is_image())."""
        ids = self.expert_ids(layer)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != (len(ids),):
                raise ValueError(f"mask must be a bool tensor of shape [{len(ids)}] (one entry per traced token, "
                                 f"like is_image()), got {mask.dtype} of shape {tuple(mask.shape)}")
            ids = ids[mask.cpu()]
        return torch.bincount(ids.flatten(), minlength=self.n_experts)

    def load_matrix(self) -> torch.Tensor:
        """[moe layers, e] loads, rows in the order of `self.moe_layers`."""
        return torch.stack([self.load(i) for i in self.moe_layers]) if self.moe_layers else torch.zeros(0)

    def stats(self, layer: int) -> dict:
        return load_stats(self.load(layer))

    def summary(self) -> list[dict]:
        return [{"layer": i, **self.stats(i)} for i in self.moe_layers]

    def table(self, tokenizer=None, layers: list[int] | None = None) -> list[dict]:
        """One row per traced token: its string and the expert(s) each MoE layer chose."""
        layers = self.moe_layers if layers is None else layers
        ids = self.token_ids().tolist()
        names = tokenizer.token_strings(ids) if tokenizer is not None else [str(i) for i in ids]
        chosen = {i: self.expert_ids(i).tolist() for i in layers}
        image = self.is_image().tolist()
        return [{"position": p, "token": names[r], "image": image[r],
                 **{f"L{i}": chosen[i][r] if len(chosen[i][r]) > 1 else chosen[i][r][0] for i in layers}}
                for r, p in enumerate(self.positions().tolist())]


def load_stats(load: torch.Tensor) -> dict:
    """Imbalance of one layer's expert load: max/mean (1 = perfect), coefficient of variation
    (std/mean, 0 = perfect) and the entropy of the load distribution (log e = perfect)."""
    if not isinstance(load, torch.Tensor):
        raise TypeError(f"load must be a Tensor, got {type(load).__name__}")
    if load.dim() != 1:  # a [layers, e] load read as one layer gave entropy_frac 3
        raise ValueError(f"load must be one layer's token copies per expert [e], got {tuple(load.shape)}; "
                         "for [layers, e] use balance.imbalance")
    load = load.float()
    if load.numel() and float(load.min()) < 0:  # a negative count gave a negative entropy
        raise ValueError(f"load holds a negative count ({float(load.min()):g}): expected token copies >= 0")
    total = float(load.sum())
    if total == 0:
        return {"tokens": 0, "max_over_mean": float("nan"), "cv": float("nan"),
                "entropy": float("nan"), "entropy_frac": float("nan")}
    p = load / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "tokens": int(total),
        "max_over_mean": float(load.max() / load.mean()),
        "cv": float(load.std(unbiased=False) / load.mean()),
        "entropy": entropy,
        "entropy_frac": entropy / math.log(len(load)) if len(load) > 1 else 1.0,
    }


def _moe_modules(model):
    from .moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]
