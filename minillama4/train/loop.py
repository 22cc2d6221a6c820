"""A small, readable training loop for the course models, with optional MoE load balancing.

    from minillama4.data import load_corpus
    from minillama4.train import TrainConfig, train, evaluate
    train_data, val_data = load_corpus(seed=0)
    model = Llama4Text.random(configs.small(), seed=0)
    history = train(model, train_data, TrainConfig(steps=300), val_data=val_data)
    history.loss[-1], history.loads()          # [steps, moe layers, e] tokens per expert per step

One step: a batch of windows [b, t+1] -> next-token cross-entropy on window[:, :-1] -> plus the
enabled balancing losses (minillama4.balance, from the router outputs of this forward) ->
backward -> clip the global gradient norm -> AdamW with a warmup + cosine learning rate ->
optionally the DeepSeek-V3 aux-loss-free update of every MoE layer's selection bias.
The Switch and z losses are always MEASURED (and recorded); a coefficient of 0 keeps them out of
the loss. Simplifications: fp32, one device, no gradient accumulation, no dropout, no data
parallelism; batches are random windows of one token stream.

Axes: b batch, t tokens, v vocab, e experts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from ..balance import balancing_losses, expert_load, update_selection_bias
from ..data import TokenCorpus, arithmetic_problem, random_batches, sequential_batches
from ..moe import MoE
from ..tokenizer import ByteTokenizer


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    warmup: int = 30  # steps of linear warmup up to lr
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio on the last step
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices only (never norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW decay rates of the first and second moments
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    batch_size: int = 16  # windows per step (b)
    seq_len: int = 128  # tokens per window (t); each window holds t + 1 tokens
    seed: int = 0  # seeds the batch sampler; the model's init has its own seed
    log_every: int = 10  # steps between progress-bar updates (printed lines if progress=False; 0 = none)
    eval_every: int = 0  # steps between validation losses when val_data is given (0 = only at the end)
    eval_batches: int = 8  # batches of the validation stream per validation loss
    switch_aux: float = 0.0  # coefficient of the Switch load-balancing loss (0 = off; Switch used 1e-2)
    z_loss: float = 0.0  # coefficient of the router z-loss (0 = off; ST-MoE used 1e-3)
    bias_update_rate: float = 0.0  # DeepSeek-V3 bias step gamma (0 = off; it used 1e-3 for its first 14.3T tokens, then 0)
    progress: bool = True  # show a tqdm progress bar


@dataclass
class History:
    """Everything recorded during `train`, one entry per step unless said otherwise."""

    moe_layers: list[int]  # layer index of each row of a load matrix
    step: list[int] = field(default_factory=list)  # step number, from 0
    loss: list[float] = field(default_factory=list)  # next-token cross-entropy of the batch (nats/token)
    total_loss: list[float] = field(default_factory=list)  # what was minimised: loss + coefficients * aux
    lr: list[float] = field(default_factory=list)  # learning rate used by the step
    grad_norm: list[float] = field(default_factory=list)  # global gradient norm before clipping
    switch_aux: list[float] = field(default_factory=list)  # Switch loss, mean over MoE layers (1 = balanced)
    z_loss: list[float] = field(default_factory=list)  # router z-loss, mean over MoE layers
    load: list[torch.Tensor] = field(default_factory=list)  # [layers, e] token copies per expert
    bias: list[torch.Tensor] = field(default_factory=list)  # [layers, e] selection bias after the step (if updated)
    val_step: list[int] = field(default_factory=list)  # steps after which the validation loss was taken
    val_loss: list[float] = field(default_factory=list)  # validation cross-entropy at those steps
    seconds: float = 0.0  # wall time of the whole run

    def loads(self) -> torch.Tensor:
        """[steps, layers, e] token copies per expert, per step and MoE layer."""
        return torch.stack(self.load) if self.load else torch.zeros(0, len(self.moe_layers), 0)

    def max_over_mean(self) -> torch.Tensor:
        """[steps, layers] busiest expert's load / mean load (1 = perfectly balanced)."""
        loads = self.loads().float()
        return loads.amax(-1) / loads.mean(-1)

    def series(self) -> dict[str, list]:
        """The scalar per-step series as plain lists, for plotting."""
        return {k: getattr(self, k) for k in ("step", "loss", "total_loss", "lr", "grad_norm", "switch_aux", "z_loss")}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (from 0): linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup:
        # linear warmup (Goyal et al. 2017, §2.2 "gradual warmup")
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup - 1))
    lr_min = cfg.lr * cfg.min_lr_ratio
    # cosine annealing without restarts (Loshchilov & Hutter 2017, SGDR eq. 5):
    # lr = lr_min + (lr_max - lr_min) * (1 + cos(pi * progress)) / 2
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (embeddings, projections, stacked experts, router) decay; vectors
    (RMSNorm weights, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [b, t, v] against the next tokens targets [b, t]."""
    return F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"))


def _batch_source(data, cfg: TrainConfig):
    """A token stream (TokenCorpus or ids [n]) -> seeded random windows; one batch [b, t+1] ->
    that batch every step; else an iterable of [b, t+1] batches."""
    if isinstance(data, TokenCorpus):
        data = data.ids
    if isinstance(data, torch.Tensor) and data.dim() == 1:
        return random_batches(data, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return itertools.repeat(data)
    return iter(data)


def _moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def train(model, data, cfg: TrainConfig | None = None, val_data=None, **overrides) -> History:
    """Train `model` in place and return its History.

    data: a TokenCorpus or a 1-D tensor of token ids (random windows of cfg.seq_len + 1 tokens,
    seeded by cfg.seed), one [b, t+1] tensor (the same batch every step: a memorisation check),
    or any iterable of [b, t+1] id batches (training stops early if it ends).
    val_data: optional TokenCorpus / ids for the validation loss every cfg.eval_every steps and at
    the end. overrides: TrainConfig fields, e.g. train(model, data, steps=50, switch_aux=1e-2).
    Balancing: cfg.switch_aux and cfg.z_loss add minillama4.balance losses (mean over MoE layers);
    cfg.bias_update_rate > 0 updates every MoE layer's selection_bias after each step (a layer
    without one starts at zeros); with 0 an existing bias is left as it is.
    """
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
    moes = _moe_layers(model)
    history = History(moe_layers=[m.layer for m in moes])
    n_experts = model.cfg.num_local_experts
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    batches = _batch_source(data, cfg)
    start, was_training = time.perf_counter(), model.training
    model.train()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train")
    for step in bar:
        try:
            window = next(batches).to(model.device)
        except StopIteration:
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        router_outputs = []
        logits = model(window[:, :-1], router_outputs=router_outputs)
        loss = next_token_loss(logits, window[:, 1:])
        aux = balancing_losses(router_outputs)
        total = loss
        if cfg.switch_aux:
            total = total + cfg.switch_aux * aux["switch_aux"]
        if cfg.z_loss:
            total = total + cfg.z_loss * aux["z_loss"]

        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()

        loads = {layer: expert_load(ids.detach(), n_experts) for layer, _, ids, _ in router_outputs}
        if cfg.bias_update_rate:
            update_selection_bias(model, loads, cfg.bias_update_rate)
            history.bias.append(torch.stack([m.selection_bias.detach().float().cpu() for m in moes]))

        history.step.append(step)
        history.loss.append(loss.item())
        history.total_loss.append(total.item())
        history.lr.append(lr)
        history.grad_norm.append(float(grad_norm))
        history.switch_aux.append(aux["switch_aux"].item())
        history.z_loss.append(aux["z_loss"].item())
        history.load.append(torch.stack([loads[m.layer].cpu() for m in moes]) if moes else torch.zeros(0, 0))

        last = step == cfg.steps - 1
        if val_data is not None and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            history.val_step.append(step)
            history.val_loss.append(evaluate(model, val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
        if cfg.log_every and (last or (step + 1) % cfg.log_every == 0):
            info = {"loss": f"{history.loss[-1]:.3f}", "lr": f"{lr:.1e}"}
            if history.val_loss:
                info["val"] = f"{history.val_loss[-1]:.3f}"
            if moes:
                load = history.load[-1].float()
                info["max/mean load"] = f"{float((load.amax(-1) / load.mean(-1)).mean()):.2f}"  # layer mean
            if cfg.progress:
                bar.set_postfix(info)
            else:
                print(f"step {step + 1}/{cfg.steps} " + " ".join(f"{k} {v}" for k, v in info.items()))
    bar.close()
    if val_data is not None and history.step and history.val_step[-1:] != history.step[-1:]:  # data ran out
        history.val_step.append(history.step[-1])
        history.val_loss.append(evaluate(model, val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
    model.train(was_training)
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model, data, batch_size: int = 16, seq_len: int = 128, max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows of a TokenCorpus
    or ids [n], in stream order (all of them unless max_batches), or over an iterable of
    [b, t+1] batches. Deterministic: no sampling. Routing uses the current selection biases."""
    if isinstance(data, TokenCorpus):
        data = data.ids
    if isinstance(data, torch.Tensor) and data.dim() == 1:
        data = sequential_batches(data, batch_size, seq_len, max_batches=max_batches)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for window in data:
        window = window.to(model.device)
        logits = model(window[:, :-1])
        total += float(next_token_loss(logits, window[:, 1:])) * window[:, 1:].numel()
        count += window[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def arithmetic_predictions(model, n: int = 100, seed: int = 12345, max_digits: int = 3, ops: str = "+",
                           tokenizer: ByteTokenizer | None = None) -> list[tuple[str, str, str]]:
    """Greedy answers to n seeded problems: [(prompt, expected, predicted), ...], e.g.
    ("12+345=", "357", "357"). Each prompt follows <|end_of_text|> as a math document does in
    the training stream; generation stops at a newline. Prompts of equal length are batched
    (the model has no padding mask). Small problems may also occur in the training data."""
    import random

    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed)
    problems = [arithmetic_problem(rng, max_digits, ops) for _ in range(n)]
    newline = tok.encode("\n")[0]
    by_length: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(problems):
        by_length.setdefault(len(prompt), []).append(i)
    predicted = [""] * n
    for length in sorted(by_length):
        rows = by_length[length]
        ids = torch.tensor([[tok.eos_id] + tok.encode(problems[i][0]) for i in rows])
        out = model.generate(ids, max_new_tokens=2 * max_digits + 1, stop_tokens=[newline])
        for i, new in zip(rows, out[:, ids.shape[1]:].tolist()):
            predicted[i] = tok.decode(new).split("\n")[0]
    return [(p, a, got) for (p, a), got in zip(problems, predicted)]


def arithmetic_accuracy(model, n: int = 100, seed: int = 12345, max_digits: int = 3, ops: str = "+",
                        tokenizer: ByteTokenizer | None = None) -> float:
    """Fraction of `arithmetic_predictions` answered exactly right."""
    rows = arithmetic_predictions(model, n, seed, max_digits, ops, tokenizer)
    return sum(expected == got for _, expected, got in rows) / max(len(rows), 1)
