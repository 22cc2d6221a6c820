"""Per-layer learning rates and init scales that transfer across width: standard parametrization
(SP) vs a µP-style ("transfer-ready") parametrization for Adam, on our Llama 4.

MetaP is Meta's name for "reliably setting per-layer learning rates and initialization scales"
so that hyperparameters tuned on a small model transfer across width, depth, batch size and
training tokens (Llama 4 blog, April 2025). Its formulas are NOT public. What this module
implements is the published idea closest to it: the Maximal Update Parametrization (µP) of
Tensor Programs V (Yang, Hu et al. 2022, arXiv 2203.03466, "TP5") for Adam, in the form of the
`mup` package (MuReadout, MuAdam) and of the Cerebras/EleutherAI practitioner's table (Dey et
al. 2024). It is an illustration of the idea, not Meta's recipe.

Every matrix of Llama4Text gets a ROLE (TP5's classification by which dimensions grow with
width; "width" = hidden_size d, with heads and expert widths growing in proportion):

  role     tensors                                                  why
  input    model.embed_tokens.weight [v, d]                          fan-in (vocab) fixed, fan-out grows
  hidden   q/k/v/o_proj, experts.gate_up_proj/down_proj,             fan-in grows (d, heads*dh or f)
           shared_expert.*, dense feed_forward.*, router [e, d]
  output   lm_head.weight [v, d]                                     fan-in grows, fan-out (vocab) fixed
  vector   RMSNorm weights (and biases, if any)                      one dimension at most

and, with the per-tensor fan-in multiplier m = fan_in / base_fan_in (the same m = d / d_base for
every hidden tensor here, because every hidden dimension scales with d), these rules
(sigma = cfg.initializer_range, eta = the base learning rate):

  role     SP: init std / Adam LR / forward          µP: init std / Adam LR / forward
  input    sigma / eta / -                            sigma / eta / -
  hidden   sigma / eta / -                            sigma / sqrt(m) / eta / m / -
  output   sigma / eta / logits x alpha_out           sigma / eta / logits x alpha_out / m
  vector   1 / eta / -                                1 / eta / -

(TP5 Table 3, µP for Adam: hidden init var 1/fan_in and LR 1/fan_in; output weights init var
1/fan_in^2 and LR 1/fan_in, written here in the equivalent multiplier form of the mup package's
MuReadout: weights of constant variance, logits multiplied by alpha_out / m, Adam LR eta.)
At the base width m = 1 and the µP model is the SP model exactly, weight for weight.

What is implemented: the four roles and their init/LR rules above; the 1/m output multiplier (a
`Readout` module that replaces lm_head, with `output_mult` = alpha_out / m) or optionally a
zero-initialised readout (mup's readout_zero_init); coupled AdamW weight decay as in MuAdam
(hidden groups get weight_decay * m, so lr * weight_decay is width-independent); per-role LR
and init multipliers (`lr_mult`, `init_mult`): the knobs a MetaP-style recipe tunes on a small
proxy and then reuses; a short training loop that honours per-group LRs; the coordinate check;
the LR sweep with a JSON cache.

What is left out, and why:
  * attention logits q.k / d_head instead of / sqrt(d_head): the rule is for a head dimension
    that grows with width. We grow width by adding heads at a fixed head_dim (as Llama 4 does:
    head_dim 128 in every size), so 1/sqrt(d_head) is a width-independent constant (and RoPE
    layers apply the weightless QK norm anyway). mup's 8/d_head would only rescale a constant.
  * the router is treated as hidden, as asked for MoE: by shape ([e, d]: fan-in grows, fan-out
    is the fixed expert count) TP5 would call it output-like, which differs only in the init
    (std sigma / m instead of sigma / sqrt(m)); with the hidden init the router's logits stay
    Theta(1) at init, so sigmoid gates and top-k are not decided by near-zero scores.
  * depth transfer (residual branches scaled by 1/sqrt(L): Depth-µP, arXiv 2310.02244; or 1/L:
    CompleteP, arXiv 2505.01618), batch-size and token-horizon transfer: MetaP claims these too;
    not implemented here.
  * an input (embedding) multiplier alpha_in, zero-initialised queries, and Adam epsilon
    scaling: optional in mup, not needed at these widths.
  * the vision tower: only Llama4Text is parametrized.

Axes: none of the code here uses einops patterns. Shapes in comments: v vocab, d model width,
e experts, f expert hidden width, b batch, t tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_int, check_real, check_type
from ..config import Llama4Config, TextConfig
from ..configs import tiny
from ..data import TokenCorpus, random_batches
from ..model import Llama4Text
from .loop import TrainConfig, evaluate, lr_at, next_token_loss

PARAMETRIZATIONS = ("sp", "mup")  # standard; µP-style (transfer-ready)
ROLES = ("input", "hidden", "output", "vector")
NAMES = {"sp": "standard (SP)", "mup": "µP (transfer-ready)"}


# ------------------------------------------------------------------------------ widths
def _text(cfg: Llama4Config | TextConfig) -> TextConfig:
    return cfg.text if isinstance(cfg, Llama4Config) else cfg


def scale_width(cfg: Llama4Config | TextConfig, width: int) -> TextConfig:
    """The text config with hidden_size = width and every other width-like dimension scaled by
    r = width / hidden_size: query and kv heads (head_dim fixed), expert width f, dense MLP width.
    Vocabulary, depth, expert count and top-k stay. Raises ValueError if a scaled dimension is
    not a positive integer (for example one kv head halved)."""
    t = _text(cfg)
    r = width / t.hidden_size

    def scaled(name: str) -> int:
        value = getattr(t, name) * r
        if value < 1 or abs(value - round(value)) > 1e-9:
            raise ValueError(f"width {width}: {name}={getattr(t, name)} x {r:g} = {value:g} is not a positive integer")
        return int(round(value))

    return dataclasses.replace(t, hidden_size=width, num_attention_heads=scaled("num_attention_heads"),
                               num_key_value_heads=scaled("num_key_value_heads"),
                               intermediate_size=scaled("intermediate_size"),
                               intermediate_size_mlp=scaled("intermediate_size_mlp"),
                               moe_layers=None, no_rope_layers=None)


def proxy_config(width: int = 64, layers: int = 2, experts: int = 4, head_dim: int = 16) -> TextConfig:
    """The course's small Llama 4 (configs.tiny: MoE in every layer with 4 routed experts top-1
    plus a shared expert, chunked RoPE layers with QK norm, NoPE layers with temperature tuning)
    at `layers` layers (every 2nd one NoPE) and width `width`: heads = width / head_dim, kv heads
    = heads / 2 (at least 1), expert width 2 * width."""
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}")
    heads = width // head_dim
    t = tiny().text
    return dataclasses.replace(t, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                               intermediate_size=2 * width, intermediate_size_mlp=4 * width,
                               num_local_experts=experts, no_rope_layer_interval=2,
                               moe_layers=None, no_rope_layers=None)


# ------------------------------------------------------------------------------ the parametrization
@dataclass
class Parametrization:
    kind: str = "mup"  # "sp" (standard) or "mup" (µP-style, transfer-ready)
    base_width: int = 32  # hidden_size d_base at which µP equals SP exactly (m = fan_in / base fan_in)
    output_mult: float = 1.0  # alpha_out: logits multiplier at the base width (µP divides it by m)
    readout_zero_init: bool = False  # µP only: lm_head starts at zero (mup's readout_zero_init)
    lr_mult: dict = field(default_factory=dict)  # role -> extra LR factor (MetaP-style knob; default 1)
    init_mult: dict = field(default_factory=dict)  # role -> extra init-std factor (default 1; norms stay at 1)

    def __post_init__(self):
        check_choice("kind", self.kind, PARAMETRIZATIONS)
        check_int("base_width", self.base_width, 1)
        check_real("output_mult", self.output_mult)
        for name in ("lr_mult", "init_mult"):
            check_type(name, getattr(self, name), dict, "e.g. {'output': 4.0}")
            unknown = set(getattr(self, name)) - set(ROLES)
            if unknown:
                raise ValueError(f"{name} has unknown roles {sorted(unknown)}; roles are {ROLES}")
            for role, value in getattr(self, name).items():
                check_real(f"{name}[{role!r}]", value, low=0)  # 0 is allowed: a frozen or zero-init role

    @property
    def name(self) -> str:
        return NAMES[self.kind]


def param_role(name: str, p: torch.Tensor) -> str:
    """'input', 'hidden', 'output' or 'vector' for a Llama4Text parameter name (see the module
    docstring). The router, routed experts and shared expert are hidden."""
    if name.endswith("embed_tokens.weight"):
        return "input"
    if name.endswith("lm_head.weight"):
        return "output"
    if p.dim() < 2:
        return "vector"
    return "hidden"


def fan_in(name: str, shape) -> int:
    """Input width of a weight: nn.Linear and nn.Embedding store [out, in] (embedding: [v, d],
    read as one-hot in = v); the stacked routed experts store [e, in, out] (x @ W)."""
    return shape[-2] if len(shape) == 3 else shape[-1]


def base_shapes(cfg: Llama4Config | TextConfig, base_width: int) -> dict[str, tuple]:
    """Parameter name -> shape in the same model at the base width (built on the meta device:
    no memory, no init)."""
    with torch.device("meta"):
        base = Llama4Text(scale_width(cfg, base_width))
    return {n: tuple(p.shape) for n, p in base.named_parameters()}


@dataclass
class TensorRule:
    """What one parameter gets."""

    name: str  # parameter name in Llama4Text
    role: str  # input / hidden / output / vector
    shape: tuple  # its shape
    width_mult: float  # m = fan_in / base fan_in (1 for input and vector roles)
    init_std: float  # std it is initialised with (0 = zeros; vector params are ones: std 0)
    lr_mult: float  # its Adam LR is lr_mult * eta
    wd_mult: float  # its AdamW weight decay is wd_mult * weight_decay (0 for vectors)


def tensor_rules(model: Llama4Text, spec: Parametrization) -> list[TensorRule]:
    """One TensorRule per parameter, in named_parameters order (the table of the module
    docstring, evaluated for this model's shapes)."""
    sigma = model.cfg.initializer_range
    shapes = base_shapes(model.cfg, spec.base_width)
    rules = []
    for name, p in model.named_parameters():
        role = param_role(name, p)
        if name not in shapes:
            raise ValueError(f"{name} has no counterpart at the base width; is this a Llama4Text?")
        m = fan_in(name, p.shape) / fan_in(name, shapes[name]) if role in ("hidden", "output") else 1.0
        init_x, lr_x = spec.init_mult.get(role, 1.0), spec.lr_mult.get(role, 1.0)
        std, lr, wd = sigma, 1.0, 1.0
        if role == "vector":
            std, wd = 0.0, 0.0  # norm gains start at 1, never decay
        elif spec.kind == "mup" and role == "hidden":
            # TP5 Table 3 (µP, Adam), hidden weights: Var(W) = sigma^2 / m, LR = eta / m
            std, lr, wd = sigma / math.sqrt(m), 1.0 / m, m  # MuAdam: weight_decay * m keeps lr * wd fixed
        elif spec.kind == "mup" and role == "output" and spec.readout_zero_init:
            std = 0.0
        rules.append(TensorRule(name, role, tuple(p.shape), m, std * init_x, lr * lr_x, wd))
    return rules


def rules_at_width(width: int, spec: Parametrization, layers: int = 2) -> list[TensorRule]:
    """tensor_rules of proxy_config(width, layers), from a model on the meta device (no weights
    are allocated, so any width is instant)."""
    with torch.device("meta"):
        model = Llama4Text(proxy_config(width, layers=layers))
    return tensor_rules(model, spec)


class Readout(nn.Linear):
    """lm_head with a forward multiplier (mup's MuReadout): logits = (output_mult * x) W^T.
    Under µP output_mult = alpha_out / m, so a width-m model's logits do not grow with m after
    Adam updates of size eta per entry. Same parameter name and shape as nn.Linear: checkpoints
    keep their keys (use fold_output_multiplier before saving)."""

    def __init__(self, weight: nn.Parameter, output_mult: float = 1.0):
        out_features, in_features = weight.shape  # [v, d]
        super().__init__(in_features, out_features, bias=False, device="meta")  # no init, no RNG draw
        self.weight = weight  # the given Parameter itself: optimizer groups and names are unchanged
        self.output_mult = output_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mup MuReadout.forward: Linear(output_mult * x / width_mult) (here output_mult already / m)
        return F.linear(x * self.output_mult, self.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", output_mult={self.output_mult:g}"


def output_multiplier(model: Llama4Text, spec: Parametrization) -> float:
    """alpha_out in SP, alpha_out / m in µP (m = d / d_base for lm_head)."""
    if spec.kind == "sp":
        return spec.output_mult
    return spec.output_mult * spec.base_width / model.cfg.hidden_size


@torch.no_grad()
def apply_parametrization(model: Llama4Text, spec: Parametrization) -> Llama4Text:
    """Turn a model initialised the standard way (Llama4Text.random: normal(0, sigma) matrices,
    norms at 1) into `spec`, in place: each matrix is multiplied by its rule's std / sigma (so
    the same random draws are reused, like mup's set_base_shapes(rescale_params=True)), and
    lm_head becomes a Readout with the output multiplier. Returns the model."""
    sigma = model.cfg.initializer_range
    params = dict(model.named_parameters())
    for rule in tensor_rules(model, spec):
        if rule.role != "vector":
            params[rule.name].mul_(rule.init_std / sigma)
    model.lm_head = Readout(model.lm_head.weight, output_multiplier(model, spec))
    model.parametrization = spec
    return model


def build_model(cfg: Llama4Config | TextConfig, spec: Parametrization, seed: int = 0) -> Llama4Text:
    """Llama4Text.random(cfg, seed) followed by apply_parametrization(spec)."""
    return apply_parametrization(Llama4Text.random(cfg, seed=seed), spec)


@torch.no_grad()
def fold_output_multiplier(model: Llama4Text) -> Llama4Text:
    """Fold the Readout multiplier into lm_head.weight and put a plain nn.Linear back, so the
    model is an ordinary Llama 4 again (same logits) and save_pretrained writes a checkpoint that
    any Llama 4 loader reads. µP is a reparametrization: after training it costs nothing."""
    head = model.lm_head
    if isinstance(head, Readout):
        plain = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(head.weight * head.output_mult)
        model.lm_head = plain
    return model


def param_groups(model: Llama4Text, spec: Parametrization, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: one per (role, LR multiplier, decay multiplier), each with
    "lr" = eta * lr_mult, "lr_mult", "weight_decay", "role" and the parameter "names".
    run() rescales every group's lr by the schedule, keeping the ratios."""
    params = dict(model.named_parameters())
    groups: dict[tuple, dict] = {}
    for rule in tensor_rules(model, spec):
        key = (rule.role, rule.lr_mult, rule.wd_mult)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "role": rule.role, "lr_mult": rule.lr_mult,
                           "lr": lr * rule.lr_mult, "weight_decay": weight_decay * rule.wd_mult}
        groups[key]["params"].append(params[rule.name])
        groups[key]["names"].append(rule.name)
    return list(groups.values())


# ------------------------------------------------------------------------------ training
@dataclass
class RunConfig:
    steps: int = 100  # Adam steps per run
    batch_size: int = 16  # windows per step (b)
    seq_len: int = 64  # tokens per window (t)
    warmup: int = 10  # linear warmup steps, then cosine decay (train.lr_at)
    min_lr_ratio: float = 0.1  # the cosine ends at eta * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay (0: the sweep isolates the learning rate)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 0.0  # global gradient-norm clip (0 = off; Adam is almost scale-free anyway)
    data_seed: int = 0  # seeds the batch sampler (the same batches for every width and LR)
    eval_batches: int = 8  # validation batches of b windows for the final loss
    diverged_loss: float = 100.0  # a training loss above this (or NaN / inf) stops the run: "diverged"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):  # eval_batches=0 gave val_loss 0.0
            check_int(name, getattr(self, name), 1)
        check_int("warmup", self.warmup, 0)
        check_int("data_seed", self.data_seed, 0)
        check_real("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_real("weight_decay", self.weight_decay, low=0)
        check_real("grad_clip", self.grad_clip, low=0)
        check_real("diverged_loss", self.diverged_loss, low=0, low_open=True)
        check_type("betas", self.betas, (tuple, list), "two numbers in [0, 1), e.g. (0.9, 0.95)")
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r}: expected two numbers in [0, 1), e.g. (0.9, 0.95)")
        for i, beta in enumerate(self.betas):
            check_real(f"betas[{i}]", beta, 0, 1, high_open=True)


def _token_ids(name: str, data, seq_len: int) -> torch.Tensor:
    """The token ids [n] of a TokenCorpus or an integer tensor [n], with room for one window."""
    check_type(name, data, (TokenCorpus, torch.Tensor), "e.g. data.load_corpus() gives (train, val) TokenCorpus")
    ids = data.ids if isinstance(data, TokenCorpus) else data
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected token ids [n] (an integer tensor), got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"{name} has {len(ids)} tokens: too few for one window of seq_len + 1 = {seq_len + 1}")
    return ids


def _items(name: str, values, check, unique: bool = False) -> list:
    """A non-empty list, each item passed through check(f"{name}[{i}]", item). unique: refuse
    repeats (widths and kinds are keys of the result: a repeat would overwrite a curve)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}={values!r}: expected a list or tuple")
    values = list(values)
    if not values:
        raise ValueError(f"{name}=(): expected at least one value")
    for i, v in enumerate(values):
        check(f"{name}[{i}]", v)
    if unique and len(set(values)) < len(values):
        raise ValueError(f"{name}={tuple(values)!r}: has repeated values")
    return values


def _log2_lr(name: str, value) -> None:
    check_real(name, value, -100, 100)  # 2 ** 1024 overflows a float


def _specs(kinds, base_width: int, extra: dict) -> dict[str, "Parametrization"]:
    """kind -> Parametrization, with the extra fields named as such when one is unknown."""
    check_type("multipliers", extra, dict, "e.g. {'init_mult': {'output': 16}}")
    fields = {f.name for f in dataclasses.fields(Parametrization)} - {"kind", "base_width"}
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise ValueError(f"multipliers has unknown fields {unknown}; fields are {sorted(fields)}")
    return {kind: Parametrization(kind, base_width=base_width, **extra) for kind in kinds}


def _check_widths(widths, spec: "Parametrization", layers: int) -> None:
    """Every proxy width can be built and scaled to the base width (on the meta device: instant),
    so a bad width stops the sweep before its first run, not after the others."""
    check_int("layers", layers, 1)
    for width in widths:
        try:
            rules_at_width(width, spec, layers)
        except ValueError as e:
            raise ValueError(f"widths={tuple(widths)}: {e}") from e


def _need_data(train_data, val_data, cfg: RunConfig, what: str) -> None:
    if train_data is None or val_data is None:
        missing = " and ".join(n for n, d in (("train_data", train_data), ("val_data", val_data)) if d is None)
        raise ValueError(f"{what} needs {missing}: without validation data every run would score None and "
                         "no learning rate could be ranked (train_data, val_data = data.load_corpus())")
    _token_ids("train_data", train_data, cfg.seq_len)
    _token_ids("val_data", val_data, cfg.seq_len)


def _schedule(step: int, cfg: RunConfig) -> float:
    """The course schedule (warmup + cosine) as a factor of the peak LR."""
    return lr_at(step, TrainConfig(steps=cfg.steps, lr=1.0, warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio))


def run(model: Llama4Text, spec: Parametrization, train_data, lr: float, cfg: RunConfig | None = None,
        val_data=None, on_step=None) -> dict:
    """Train `model` (built with `spec`) for cfg.steps AdamW steps at peak LR `lr`, every group
    at lr * its lr_mult * schedule(step). Returns {"loss": per-step training losses, "val_loss":
    final validation loss (None without val_data, inf if diverged), "diverged": bool}.
    on_step(step, model) is called before each step's forward (the coordinate check uses it)."""
    cfg = cfg or RunConfig()
    check_type("model", model, Llama4Text)
    check_type("spec", spec, Parametrization)
    check_type("cfg", cfg, RunConfig)
    check_real("lr", lr, low=0, low_open=True)
    ids = _token_ids("train_data", train_data, cfg.seq_len)
    if val_data is not None:
        _token_ids("val_data", val_data, cfg.seq_len)  # too short would fail only after the training
    groups = param_groups(model, spec, lr, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    batches = random_batches(ids, cfg.batch_size, cfg.seq_len, generator=cfg.data_seed)
    losses, diverged = [], False
    model.train()
    for step in range(cfg.steps):
        window = next(batches).to(model.device)
        factor = _schedule(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"] * factor
        if on_step is not None:
            on_step(step, model)
        loss = next_token_loss(model(window[:, :-1]), window[:, 1:])
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > cfg.diverged_loss:
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    val = None
    if val_data is not None:
        val = math.inf if diverged else evaluate(model, val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        if not math.isfinite(val):
            diverged, val = True, math.inf
    return {"loss": losses, "val_loss": val, "diverged": diverged}


# ------------------------------------------------------------------------------ coordinate check
def _l1(x: torch.Tensor) -> float:
    return float(x.detach().float().abs().mean())


def coord_check(widths=(32, 64, 128, 256), kinds=PARAMETRIZATIONS, train_data=None, lr: float = 1e-2,
                steps: int = 5, seeds=(0,), base_width: int = 32, layers: int = 2,
                cfg: RunConfig | None = None) -> dict:
    """mup's coordinate check (the `mup` package's README, "Coord Check", and its coord_check.py):
    train proxy models of each width for a few steps at a deliberately large constant LR and
    record, before each step (step 0 = at init), the mean |x| of every layer's activations on that
    step's batch: the token embeddings, each layer's attention output, router logits, MoE output
    and residual stream, and the logits.
    Under SP these grow with width after the first updates; under µP they stay flat.

    Returns {"widths", "kinds", "steps", "lr", "seeds", "activations": [names],
             "l1": {kind: {name: [[mean over seeds, per width] per step]}}} (JSON-ready)."""
    if cfg is not None:
        check_type("cfg", cfg, RunConfig)
    cfg = dataclasses.replace(cfg or RunConfig(batch_size=8, seq_len=64), steps=steps, warmup=0,
                              min_lr_ratio=1.0)  # constant LR
    # everything is checked before the first model trains
    widths = _items("widths", widths, lambda n, w: check_int(n, w, 1), unique=True)
    kinds = _items("kinds", kinds, lambda n, k: check_choice(n, k, PARAMETRIZATIONS), unique=True)
    seeds = _items("seeds", seeds, lambda n, s: check_int(n, s, 0))
    check_real("lr", lr, low=0, low_open=True)
    specs = _specs(kinds, base_width, {})
    _check_widths(widths, specs[kinds[0]], layers)
    if train_data is None:
        raise ValueError("coord_check needs train_data (train_data, _ = data.load_corpus())")
    _token_ids("train_data", train_data, cfg.seq_len)
    result = {"widths": widths, "kinds": kinds, "steps": steps, "lr": lr, "seeds": seeds, "base_width": base_width,
              "l1": {}}
    for kind in kinds:
        spec = specs[kind]
        table = defaultdict(lambda: [[0.0] * len(widths) for _ in range(steps)])
        for wi, width in enumerate(widths):
            for seed in seeds:
                model = build_model(proxy_config(width, layers=layers), spec, seed=seed)
                names, current = _activation_names(model), {"step": 0}
                hooks = _record_activations(model, table, current, wi, len(seeds))

                def on_step(step, _model, current=current):
                    current["step"] = step

                run(model, spec, train_data, lr, cfg, on_step=on_step)
                for h in hooks:
                    h.remove()
        result["activations"] = names
        result["l1"][kind] = {n: table[n] for n in names}
    return result


def _activation_names(model: Llama4Text) -> list[str]:
    names = ["embedding"]
    for i in range(model.cfg.num_hidden_layers):
        names += [f"attention {i}"] + ([f"router {i}", f"MoE {i}"] if model.cfg.is_moe(i) else [f"MLP {i}"])
        names += [f"residual {i}"]
    return names + ["logits"]


def _record_activations(model: Llama4Text, table, current: dict, wi: int, n_seeds: int) -> list:
    """Forward hooks adding l1(output) / n_seeds into table[name][step][wi]."""
    def hook(name):
        def fn(_module, _inputs, output):
            table[name][current["step"]][wi] += _l1(output) / n_seeds
        return fn

    hooks = [model.model.embed_tokens.register_forward_hook(hook("embedding")),
             model.lm_head.register_forward_hook(hook("logits"))]
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(hook(f"attention {i}")))
        ffn = layer.feed_forward
        if model.cfg.is_moe(i):
            hooks.append(ffn.router.register_forward_hook(hook(f"router {i}")))
            hooks.append(ffn.register_forward_hook(hook(f"MoE {i}")))
        else:
            hooks.append(ffn.register_forward_hook(hook(f"MLP {i}")))
        hooks.append(layer.register_forward_hook(hook(f"residual {i}")))
    return hooks


def growth(coord: dict, kind: str, step: int = -1, activations=None) -> dict[str, float]:
    """Per activation: l1 at the widest width / l1 at the narrowest, at `step` (default the last
    recorded). About 1 = flat (µP's promise); >> 1 = blows up with width."""
    table = coord["l1"][kind]
    names = activations or coord["activations"]
    return {n: table[n][step][-1] / table[n][step][0] for n in names}


# ------------------------------------------------------------------------------ LR sweep
def lr_sweep(widths=(32, 64, 128, 256), log2_lrs=tuple(range(-13, -3)), kinds=PARAMETRIZATIONS,
             seeds=(0,), train_data=None, val_data=None, cfg: RunConfig | None = None, base_width: int = 32,
             layers: int = 2, multipliers: dict | None = None, progress: bool = True) -> dict:
    """Train a proxy model for every (parametrization, width, LR = 2^log2_lr, seed) and record the
    final validation loss (inf = diverged) and a thinned training curve. `multipliers`: extra
    Parametrization fields shared by every run, e.g. {"init_mult": {"output": 16}} (the per-layer
    knobs tuned at the base width). train_data and val_data are required (the ranking is by
    validation loss); every setting is checked before the first run. At the base width SP and µP
    are the same model, so those runs are trained once and copied. Slow (tens of minutes on 2 CPU cores): the notebook loads the
    cached result (save_sweep / load_sweep).

    Returns a JSON-ready dict: {"widths", "log2_lrs", "kinds", "seeds", "base_width", "layers",
    "multipliers", "config", "val_loss": {kind: {str(width): [[per seed] per LR]}},
    "curves": {kind: {str(width): [[training loss every 5 steps, first seed] per LR]}}, "seconds"}."""
    import time

    cfg, multipliers = cfg or RunConfig(), multipliers or {}
    # every setting is checked before the first run: a bad last width or kind used to fail hours in
    check_type("cfg", cfg, RunConfig)
    widths = _items("widths", widths, lambda n, w: check_int(n, w, 1), unique=True)
    log2_lrs = _items("log2_lrs", log2_lrs, _log2_lr)
    kinds = _items("kinds", kinds, lambda n, k: check_choice(n, k, PARAMETRIZATIONS), unique=True)
    seeds = _items("seeds", seeds, lambda n, s: check_int(n, s, 0))
    specs = _specs(kinds, base_width, multipliers)
    _check_widths(widths, specs[kinds[0]], layers)
    _need_data(train_data, val_data, cfg, "lr_sweep")
    multipliers = dict(multipliers)
    start = time.perf_counter()
    out = {"widths": list(widths), "log2_lrs": list(log2_lrs), "kinds": list(kinds), "seeds": list(seeds),
           "base_width": base_width, "layers": layers, "multipliers": multipliers,
           "config": dataclasses.asdict(cfg), "val_loss": {k: {} for k in kinds}, "curves": {k: {} for k in kinds}}
    total, done = len(kinds) * len(widths) * len(log2_lrs) * len(seeds), 0
    for kind in kinds:
        spec = specs[kind]
        for width in widths:
            if width == base_width and kind != kinds[0]:  # m = 1: identical model and optimizer
                out["val_loss"][kind][str(width)] = out["val_loss"][kinds[0]][str(width)]
                out["curves"][kind][str(width)] = out["curves"][kinds[0]][str(width)]
                done += len(log2_lrs) * len(seeds)
                continue
            vals, curves = [], []
            for log2_lr in log2_lrs:
                per_seed = []
                for seed in seeds:
                    model = build_model(proxy_config(width, layers=layers), spec, seed=seed)
                    r = run(model, spec, train_data, 2.0 ** log2_lr, cfg, val_data=val_data)
                    per_seed.append(r["val_loss"])
                    if seed == seeds[0]:
                        curves.append(r["loss"][::5])
                    done += 1
                    if progress:
                        print(f"[{done}/{total}] {kind} d={width} lr=2^{log2_lr} seed {seed}: "
                              f"val {r['val_loss']:.3f}{' (diverged)' if r['diverged'] else ''} "
                              f"({time.perf_counter() - start:.0f} s)", flush=True)
                vals.append(per_seed)
            out["val_loss"][kind][str(width)] = vals
            out["curves"][kind][str(width)] = curves
    out["seconds"] = time.perf_counter() - start
    return out


def merge_seeds(*sweeps: dict) -> dict:
    """One sweep from several runs of lr_sweep that differ only in their seeds (for example run
    in parallel processes): validation losses are concatenated per LR, curves kept from the first."""
    merged = json.loads(json.dumps(_jsonable(sweeps[0])))
    for other in sweeps[1:]:
        if (other["widths"], other["log2_lrs"], other["kinds"]) != (merged["widths"], merged["log2_lrs"], merged["kinds"]):
            raise ValueError("sweeps differ in widths, learning rates or parametrizations")
        merged["seeds"] += other["seeds"]
        merged["seconds"] = merged.get("seconds", 0) + other.get("seconds", 0)
        for kind in merged["kinds"]:
            for w in map(str, merged["widths"]):
                rows = _jsonable(other["val_loss"][kind][w])
                merged["val_loss"][kind][w] = [a + b for a, b in zip(merged["val_loss"][kind][w], rows)]
    return merged


def multiplier_search(role: str = "output", mults=(1, 4, 16, 64), log2_lrs=tuple(range(-10, -3)),
                      width: int = 32, what: str = "init_mult", seed: int = 0, train_data=None, val_data=None,
                      cfg: RunConfig | None = None, layers: int = 2, progress: bool = True) -> dict:
    """The MetaP-style step on the small proxy: at the base width, sweep one per-role multiplier
    (`what` = "init_mult" or "lr_mult" of `role`) together with the LR. At the base width SP and
    µP coincide, so the result serves both. train_data and val_data are required. Returns a JSON-ready dict {"role", "what", "mults",
    "log2_lrs", "width", "val_loss": [[per LR] per multiplier], "seconds"}."""
    import time

    if what not in ("init_mult", "lr_mult") or role not in ROLES:
        raise ValueError(f"what={what!r} must be 'init_mult' or 'lr_mult' and role={role!r} one of {ROLES}")
    cfg = cfg or RunConfig()
    # every setting is checked before the first run
    check_type("cfg", cfg, RunConfig)
    mults = _items("mults", mults, lambda n, m: check_real(n, m, low=0))
    log2_lrs = _items("log2_lrs", log2_lrs, _log2_lr)
    check_int("width", width, 1)
    check_int("seed", seed, 0)
    specs = [Parametrization("mup", base_width=width, **{what: {role: mult}}) for mult in mults]
    _check_widths([width], specs[0], layers)
    _need_data(train_data, val_data, cfg, "multiplier_search")
    start, table = time.perf_counter(), []
    for mult, spec in zip(mults, specs):
        row = []
        for log2_lr in log2_lrs:
            r = run(build_model(proxy_config(width, layers=layers), spec, seed=seed), spec, train_data,
                    2.0 ** log2_lr, cfg, val_data=val_data)
            row.append(r["val_loss"])
            if progress:
                print(f"{what}[{role}] = {mult}, lr 2^{log2_lr}: val {r['val_loss']:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        table.append(row)
    return {"role": role, "what": what, "mults": list(mults), "log2_lrs": list(log2_lrs), "width": width,
            "seed": seed, "config": dataclasses.asdict(cfg), "val_loss": table,
            "seconds": time.perf_counter() - start}


def best_multiplier(search: dict) -> tuple[float, int]:
    """(multiplier, log2 LR) with the lowest validation loss in a multiplier_search result.
    Raises ValueError if no run has a finite loss (all diverged, or no validation data)."""
    best = min(((v if v is not None else math.inf, i, j) for i, row in enumerate(search["val_loss"])
                for j, v in enumerate(row)), default=(math.inf, 0, 0))
    if not math.isfinite(best[0]):  # the first entry would be returned as "best"
        raise ValueError("no run of the search has a finite validation loss (every run diverged or had no "
                         "val_data): there is no best multiplier to pick")
    return search["mults"][best[1]], search["log2_lrs"][best[2]]


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no inf / NaN: a diverged run is stored as null
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def save_sweep(result: dict, path) -> None:
    """Write a sweep or coordinate-check result as JSON (inf / NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=1) + "\n")


def load_sweep(path) -> dict:
    """Read a result written by save_sweep (null losses stay None = diverged)."""
    return json.loads(Path(path).read_text())


def mean_loss(sweep: dict, kind: str, width: int) -> list[float]:
    """Validation loss per LR for one curve, averaged over seeds; inf if any seed diverged."""
    rows = sweep["val_loss"][kind][str(width)]
    return [math.inf if any(v is None or not math.isfinite(v) for v in row) else sum(row) / len(row) for row in rows]


def best_log2_lr(sweep: dict, kind: str, width: int) -> int | float:
    """The log2 LR with the lowest mean validation loss for this parametrization and width.
    Raises ValueError if every LR diverged (or has no loss): none of them is best."""
    losses = mean_loss(sweep, kind, width)
    if not any(math.isfinite(v) for v in losses):
        raise ValueError(f"{kind} at width {width}: no learning rate has a finite validation loss (all diverged "
                         "or were run without val_data): there is no best one")
    return sweep["log2_lrs"][min(range(len(losses)), key=losses.__getitem__)]


def optimum_drift(sweep: dict, kind: str) -> float:
    """How far the best LR moves from the narrowest to the widest width, in octaves (log2 units;
    negative = wider wants a smaller LR)."""
    w = sweep["widths"]
    return best_log2_lr(sweep, kind, w[-1]) - best_log2_lr(sweep, kind, w[0])


def loss_at_base_optimum(sweep: dict, kind: str) -> dict[int, float]:
    """Width -> its validation loss when trained at the LR that was best for the narrowest
    (base) width: what zero-shot transfer of the tuned LR gives."""
    w = sweep["widths"]
    i = sweep["log2_lrs"].index(best_log2_lr(sweep, kind, w[0]))
    return {width: mean_loss(sweep, kind, width)[i] for width in w}


# ------------------------------------------------------------------------------ the notebook's cache
SEARCH_FILE, SWEEP_FILE = "multiplier_search.json", "lr_sweep.json"  # under notebooks/data/06_metap/


def precompute(data_dir, seeds=(0, 1), widths=(32, 64, 128, 256), log2_lrs=tuple(range(-13, -3)),
               cfg: RunConfig | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Everything notebook 06 loads from its cache, recomputed: (1) multiplier_search for the
    readout init scale at the base width, (2) lr_sweep of SP and µP over `widths` with the best
    multiplier found, written to data_dir/SEARCH_FILE and data_dir/SWEEP_FILE. One to two hours
    on 2 CPU cores. The committed cache: the search (seed 0), then the sweep's two seeds in two
    single-threaded processes (about 65 minutes each on a shared machine), joined with
    merge_seeds; each run is a function of (width, LR, seed) only, so that equals seeds=(0, 1)
    up to floating-point summation order."""
    from ..data import load_corpus

    train_data, val_data = load_corpus(seed=0)
    cfg = cfg or RunConfig()
    search = multiplier_search(train_data=train_data, val_data=val_data, cfg=cfg, progress=progress)
    save_sweep(search, Path(data_dir) / SEARCH_FILE)
    mult, _ = best_multiplier(search)
    sweep = lr_sweep(widths, log2_lrs, seeds=seeds, train_data=train_data, val_data=val_data, cfg=cfg,
                     multipliers={"init_mult": {search["role"]: mult}}, progress=progress)
    save_sweep(sweep, Path(data_dir) / SWEEP_FILE)
    return search, sweep
