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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from ..balance import balancing_losses, expert_load, update_selection_bias
from ..checks import check_finite_loss, check_int, check_real, check_type
from ..data import TokenCorpus, arithmetic_problem, random_batches, sequential_batches
from ..moe import MoE
from ..tokenizer import ByteTokenizer, HFTokenizer


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

    def __post_init__(self):  # a bad field fails here, where the config is built, not steps into a run
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):  # eval_batches=0 gave a val_loss of 0.0
            check_int(name, getattr(self, name), 1)
        for name in ("seed", "log_every", "eval_every"):
            check_int(name, getattr(self, name), 0)
        _check_schedule(self)
        # coefficients: NaN would train on with NaN weights, a negative one rewards what it should penalise
        for name in ("weight_decay", "switch_aux", "z_loss", "bias_update_rate"):
            check_real(name, getattr(self, name), low=0)
        try:  # NaN, None or a negative value used to turn clipping off silently (or fail at the first step)
            check_real("grad_clip", self.grad_clip, low=0)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (0 turns clipping off)") from None
        check_type("betas", self.betas, (tuple, list), "two numbers in [0, 1), e.g. (0.9, 0.95)")
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r}: expected two numbers in [0, 1), e.g. (0.9, 0.95)")
        for i, beta in enumerate(self.betas):
            check_real(f"betas[{i}]", beta, 0, 1, high_open=True)
        check_type("progress", self.progress, bool)


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
        """[steps, layers] busiest expert's load / mean load (1 = perfectly balanced); [0, layers]
        before the first step."""
        loads = self.loads().float()
        if loads.shape[0] == 0:  # amax over an empty expert axis raised IndexError
            return torch.zeros(0, len(self.moe_layers))
        return loads.amax(-1) / loads.mean(-1)

    def series(self) -> dict[str, list]:
        """The scalar per-step series as plain lists, for plotting."""
        return {k: getattr(self, k) for k in ("step", "loss", "total_loss", "lr", "grad_norm", "switch_aux", "z_loss")}


def _check_schedule(cfg) -> None:
    """The fields lr_at reads, on a TrainConfig or any config with the same names (shapes.py)."""
    check_real("lr", cfg.lr, 0, low_open=True)
    check_int("warmup", cfg.warmup, 0)
    check_real("min_lr_ratio", cfg.min_lr_ratio, 0, 1)  # < 0: negative LRs; > 1: the "decay" climbs above the peak


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (from 0): linear warmup, then cosine decay to lr * min_lr_ratio.
    cfg: a TrainConfig or any config with steps, lr, warmup and min_lr_ratio (checked at each call:
    a few comparisons, no tensor work)."""
    check_int("step", step, 0)
    _check_schedule(cfg)
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


def _is_int_dtype(x: torch.Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _check_batch(name: str, batch) -> torch.Tensor:
    """One [b, t+1] batch of token ids (shape and dtype only: no host sync)."""
    check_type(name, batch, torch.Tensor, "each batch is a [b, t+1] tensor of token ids")
    if batch.dim() != 2 or batch.shape[0] < 1 or batch.shape[1] < 2:
        raise ValueError(f"{name} has shape {tuple(batch.shape)}: expected [b, t+1] token ids with b >= 1, t + 1 >= 2")
    if not _is_int_dtype(batch):
        raise TypeError(f"{name} has dtype {batch.dtype}: expected integer token ids")
    return batch


def _check_stream(name: str, ids: torch.Tensor, seq_len: int) -> None:
    """A 1-D id stream long enough for one window of seq_len + 1 tokens."""
    if not _is_int_dtype(ids):
        raise TypeError(f"{name} has dtype {ids.dtype}: expected integer token ids")
    if len(ids) < seq_len + 1:
        raise ValueError(f"{name} holds {len(ids)} tokens, too few for one window of seq_len + 1 = {seq_len + 1}; "
                         "pass more tokens or a smaller seq_len")


_DATA_KINDS = "a TokenCorpus, token ids [n], one batch [b, t+1] or an iterable of [b, t+1] batches"


def _checked(batches):
    """An iterable's batches, each checked as it is drawn (its length is unknown up front)."""
    for i, batch in enumerate(batches):
        yield _check_batch(f"data batch {i}", batch)


def _batch_source(data, cfg: TrainConfig, vocab_size: int | None = None):
    """A token stream (TokenCorpus or ids [n]) -> seeded random windows; one batch [b, t+1] ->
    that batch every step; else an iterable of [b, t+1] batches. Checked before the first step."""
    if isinstance(data, TokenCorpus):
        data = data.ids
    if isinstance(data, torch.Tensor) and data.dim() == 1:
        _check_stream("data", data, cfg.seq_len)
        _check_id_range("data", data, vocab_size)
        return random_batches(data, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    if isinstance(data, torch.Tensor):
        return itertools.repeat(_check_batch("data", data))
    if isinstance(data, (list, tuple)):  # a reusable sequence: check every batch now
        if not data:
            raise ValueError(f"data is an empty {type(data).__name__}: expected {_DATA_KINDS}")
        return iter([_check_batch(f"data[{i}]", batch) for i, batch in enumerate(data)])
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(f"data must be {_DATA_KINDS}, got {type(data).__name__}")
    return _checked(data)


def _check_id_range(name: str, ids: torch.Tensor, vocab_size: int | None) -> None:
    """Token ids within the model's vocabulary, checked up front (one host read): the model's
    forward refuses them too, but only once training reaches them."""
    if vocab_size is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} holds token ids in [{lo}, {hi}]: the model's vocabulary is [0, {vocab_size})")


def _check_eval_data(name: str, data, seq_len: int, vocab_size: int | None = None, reread: bool = False) -> None:
    """What `evaluate` reads: a TokenCorpus / ids [n] long enough for one window, or batches;
    their ids within vocab_size (when given); with reread, no one-pass iterator."""
    if isinstance(data, TokenCorpus):
        data = data.ids
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(data.shape)}: expected token ids [n] (for one batch "
                             "[b, t+1], pass a list: [batch])")
        _check_stream(name, data, seq_len)
        _check_id_range(name, data, vocab_size)
    elif isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{name} is an empty {type(data).__name__}: there is no loss to measure")
        for i, batch in enumerate(data):
            _check_id_range(f"{name}[{i}]", _check_batch(f"{name}[{i}]", batch), vocab_size)
    elif not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be a TokenCorpus, token ids [n] or an iterable of [b, t+1] batches, "
                        f"got {type(data).__name__}")
    elif reread and isinstance(data, Iterator):  # the first evaluation would use it up, the next find nothing
        raise TypeError(f"{name} is a one-pass iterator ({type(data).__name__}): evaluation reads it several "
                        "times; pass a list of [b, t+1] batches or token ids [n]")


def _moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _train_config(cfg, overrides: dict) -> TrainConfig:
    """cfg with the keyword overrides applied (TrainConfig.__post_init__ checks every field)."""
    if cfg is not None:
        check_type("cfg", cfg, TrainConfig,
                   "pass TrainConfig(...) or fields as keywords, e.g. train(model, data, steps=50)")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"train() got unknown TrainConfig field(s) {unknown}; the fields are {fields}")
    return dataclasses.replace(cfg or TrainConfig(), **overrides)


def _check_model(model, cfg: TrainConfig) -> list[MoE]:
    """The model's MoE layers; balancing options on a model without any are refused (nothing to balance)."""
    check_type("model", model, torch.nn.Module, "build one with Llama4Text.random(config)")
    moes = _moe_layers(model)
    if not moes:
        for name in ("switch_aux", "z_loss", "bias_update_rate"):
            if getattr(cfg, name):
                raise ValueError(f"{name}={getattr(cfg, name)!r}: the model has no MoE layer to balance; "
                                 "leave it at 0 for a dense model")
    return moes


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
    The config, model and data are checked before the first step. Training stops with a
    FloatingPointError at the first NaN/inf loss, before that step's update; any exception raised
    during training (Ctrl-C included) carries the steps done so far as `error.history`.
    """
    cfg = _train_config(cfg, overrides)
    moes = _check_model(model, cfg)
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    batches = _batch_source(data, cfg, vocab_size)
    if val_data is not None:
        _check_eval_data("val_data", val_data, cfg.seq_len, vocab_size, reread=True)
    history = History(moe_layers=[m.layer for m in moes])
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    start, was_training = time.perf_counter(), model.training
    model.train()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train")
    try:
        for step in bar:
            try:
                window = next(batches).to(model.device)
            except StopIteration:
                break
            _train_step(model, window, step, cfg, optimizer, moes, history)
            last = step == cfg.steps - 1
            if val_data is not None and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                history.val_step.append(step)
                history.val_loss.append(evaluate(model, val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
            if cfg.log_every and (last or (step + 1) % cfg.log_every == 0):
                _log(bar, step, cfg, history, bool(moes))
        if val_data is not None and history.step and history.val_step[-1:] != history.step[-1:]:  # data ran out
            history.val_step.append(history.step[-1])
            history.val_loss.append(evaluate(model, val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
    except BaseException as error:
        error.history = history  # the steps recorded so far (the model holds their weights)
        raise
    finally:
        bar.close()
        model.train(was_training)
        history.seconds = time.perf_counter() - start
    return history


def _train_step(model, window, step: int, cfg: TrainConfig, optimizer, moes: list[MoE], history: History) -> None:
    """One optimizer step on window [b, t+1], recorded in `history`."""
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
    # read for the history anyway; checked before backward so a NaN never reaches the weights
    loss_value, total_value = loss.item(), total.item()
    check_finite_loss(loss_value, step)
    check_finite_loss(total_value, step, "total loss (cross-entropy + balancing terms)")

    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()

    loads = {layer: expert_load(ids.detach(), model.cfg.num_local_experts) for layer, _, ids, _ in router_outputs}
    if cfg.bias_update_rate:
        update_selection_bias(model, loads, cfg.bias_update_rate)
        history.bias.append(torch.stack([m.selection_bias.detach().float().cpu() for m in moes]))

    history.step.append(step)
    history.loss.append(loss_value)
    history.total_loss.append(total_value)
    history.lr.append(lr)
    history.grad_norm.append(float(grad_norm))
    history.switch_aux.append(aux["switch_aux"].item())
    history.z_loss.append(aux["z_loss"].item())
    history.load.append(torch.stack([loads[m.layer].cpu() for m in moes]) if moes else torch.zeros(0, 0))


def _log(bar, step: int, cfg: TrainConfig, history: History, has_moe: bool) -> None:
    info = {"loss": f"{history.loss[-1]:.3f}", "lr": f"{history.lr[-1]:.1e}"}
    if history.val_loss:
        info["val"] = f"{history.val_loss[-1]:.3f}"
    if has_moe:
        load = history.load[-1].float()
        info["max/mean load"] = f"{float((load.amax(-1) / load.mean(-1)).mean()):.2f}"  # layer mean
    if cfg.progress:
        bar.set_postfix(info)
    else:
        print(f"step {step + 1}/{cfg.steps} " + " ".join(f"{k} {v}" for k, v in info.items()))


@torch.no_grad()
def evaluate(model, data, batch_size: int = 16, seq_len: int = 128, max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows of a TokenCorpus
    or ids [n], in stream order (all of them unless max_batches), or over an iterable of
    [b, t+1] batches. Deterministic: no sampling. Routing uses the current selection biases.
    Data without a single window is refused (its mean loss would read as a perfect 0.0)."""
    check_type("model", model, torch.nn.Module, "build one with Llama4Text.random(config)")
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        check_int("max_batches", max_batches, 1)
    _check_eval_data("data", data, seq_len)
    if isinstance(data, TokenCorpus):
        data = data.ids
    if isinstance(data, torch.Tensor):
        data = sequential_batches(data, batch_size, seq_len, max_batches=max_batches)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, window in enumerate(data):
            window = _check_batch(f"data batch {i}", window).to(model.device)
            logits = model(window[:, :-1])
            total += float(next_token_loss(logits, window[:, 1:])) * window[:, 1:].numel()
            count += window[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:  # an iterable that yielded nothing
        raise ValueError("data yielded no batch: there is no loss to measure")
    return total / count


@torch.no_grad()
def arithmetic_predictions(model, n: int = 100, seed: int = 12345, max_digits: int = 3, ops: str = "+",
                           tokenizer: ByteTokenizer | None = None) -> list[tuple[str, str, str]]:
    """Greedy answers to n seeded problems: [(prompt, expected, predicted), ...], e.g.
    ("12+345=", "357", "357"). Each prompt follows <|end_of_text|> as a math document does in
    the training stream; generation stops at a newline. Prompts of equal length are batched
    (the model has no padding mask). Small problems may also occur in the training data."""
    import random

    from ..data import _check_arithmetic

    check_type("model", model, torch.nn.Module, "pass a model such as Llama4Text")
    check_int("n", n, 1)  # n=0 answered 0.0, read as 0% correct
    _check_arithmetic(max_digits, ops)  # also when no problem would be drawn
    if tokenizer is not None:  # encode, decode and eos_id: the byte tokenizer or a checkpoint's
        check_type("tokenizer", tokenizer, (ByteTokenizer, HFTokenizer))
        if tokenizer.eos_id is None:
            raise ValueError("tokenizer has no <|end_of_text|> id, which starts each problem's prompt")
    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed)
    problems = [arithmetic_problem(rng, max_digits, ops) for _ in range(n)]
    newline = tok.encode("\n")[0]
    prompts = [[tok.eos_id] + tok.encode(prompt) for prompt, _ in problems]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):  # by tokens, not characters: a BPE tokenizer groups digits
        by_length.setdefault(len(ids), []).append(i)
    predicted = [""] * n
    for length in sorted(by_length):
        rows = by_length[length]
        ids = torch.tensor([prompts[i] for i in rows])
        out = model.generate(ids, max_new_tokens=2 * max_digits + 1, stop_tokens=[newline])
        for i, new in zip(rows, out[:, ids.shape[1]:].tolist()):
            predicted[i] = tok.decode(new).split("\n")[0]
    return [(p, a, got) for (p, a), got in zip(problems, predicted)]


def arithmetic_accuracy(model, n: int = 100, seed: int = 12345, max_digits: int = 3, ops: str = "+",
                        tokenizer: ByteTokenizer | None = None) -> float:
    """Fraction of `arithmetic_predictions` answered exactly right."""
    rows = arithmetic_predictions(model, n, seed, max_digits, ops, tokenizer)
    return sum(expected == got for _, expected, got in rows) / max(len(rows), 1)
