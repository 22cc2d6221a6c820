"""Online RL with a verifiable reward: GRPO with adaptive prompt filtering and a hardness curriculum.

Meta (Llama 4 blog): after lightweight SFT, online RL on "medium-to-hard" prompts, chosen by
pass@k analysis with the policy model, with "a curriculum of increasing prompt hardness", and
"dynamically filter out prompts with zero advantage during training". Here:

    history = train_rl(policy, RLConfig(steps=80, group_size=8, kl_coef=0.0), eval_problems=held_out)

One step (Shao et al. 2024, DeepSeekMath §4.1, GRPO):
  1. the curriculum draws P prompts from the active difficulty levels;
  2. the policy samples a group of G responses per prompt (temperature 1); the verifier gives
     each response a reward r in {0, 1};
  3. group-relative advantage of response i of a group (no value network):
         A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)
     A group whose rewards are all equal (all right or all wrong) has A = 0 for every response:
     it carries no learning signal. Adaptive filtering drops these groups before the update
     (Llama 4's "zero-advantage" filter; DAPO's "dynamic sampling", Yu et al. 2025);
  4. mu gradient steps on the clipped surrogate, with the per-token ratio
     rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t):
         J = mean_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta D_KL,t ]
     with the k3 estimator of the KL to a frozen reference (Schulman 2020),
         D_KL,t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1   (>= 0, unbiased);
     loss = -J. With mu = 1, rho = 1 at the only update and clipping never acts; mu = 2 makes it
     act on the second pass.

The curriculum (our reading of the blog, not Meta's code): before RL, a pass@k probe with the
policy per level retires the levels it already solves (pass rate >= easy_above) and starts at
the easiest level it does not; during RL a running (EMA) pass rate per level, from the policy's
own samples, retires levels that become easy and unlocks the next harder level once the hardest
active one passes `advance_at`. Every `reprobe_every` steps a fresh probe of all levels brings
back levels the policy has become worse at ("continually filter and retain only medium-to-hard
prompts" - the blog's continuous online RL).

Simplifications against Meta's scale: one small model on one CPU, synchronous (Meta's
framework was fully asynchronous), a rule-based 0/1 reward, tens of steps, no system-prompt
variety, no mixing of capabilities, a per-level (not per-prompt) pass@k probe.

Axes: p prompts (groups), g samples per group, b sequences (= kept groups x g), t tokens.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from einops import rearrange

from ..checks import check_bool, check_finite_loss, check_int, check_real, check_type
from ..tokenizer import ByteTokenizer
from .loop import param_groups
from .posttrain_task import (LEVELS, MAX_DIGITS, Problem, check_eval_problems, check_group_size, check_items,
                             check_levels, check_model, check_optimizer_fields, check_tokenizer, complete,
                             completion_batch, keeping_mode, problem_at_level, record_eval, stage_config,
                             token_logprobs)


# ------------------------------------------------------------------------------ the pieces
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [p, g] -> advantages [p, g]: the reward minus its group's mean, divided by the
    group's standard deviation (Bessel-corrected, as torch.std and TRL) + eps when `scale`
    (GRPO), or not divided (Dr. GRPO, Liu et al. 2025). Rewards must be finite: NaN or inf
    rewards are refused (this reads them to the host: train_rl's rewards are on the CPU)."""
    check_type("rewards", rewards, torch.Tensor, "[p, g] one reward per sampled response")
    if rewards.dim() != 2:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}: expected [p, g], one row of g rewards per prompt")
    check_bool("scale", scale)
    check_real("eps", eps, 0)
    finite = torch.isfinite(rewards)
    if not finite.all():  # a NaN made its group's std NaN, and torch.where turned every advantage into 0
        p, g = (~finite).nonzero()[0].tolist()
        raise ValueError(f"rewards[{p}, {g}]={float(rewards[p, g])}: rewards must be finite")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    if not scale:
        return rewards - mean
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    # A_i = (r_i - mean(r)) / (std(r) + eps)   (Shao et al. 2024, §4.1.2, outcome supervision);
    # a group with std 0 has r_i = mean(r): its advantages are 0 (also with eps = 0)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def zero_advantage_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[p] True where every reward of the group is the same (so every advantage is 0)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, max_value: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020):
    exp(ref - logp) - (ref - logp) - 1, always >= 0. A rare sampled token that the reference
    likes far more than the policy makes exp(ref - logp) huge, so the estimate is capped at
    max_value (as verl's "low_var_kl" does)."""
    check_real("max_value", max_value, 0, low_open=True)  # a negative cap made every estimate negative
    delta = ref_logp - logp
    return torch.clamp(torch.exp(delta) - delta - 1, max=max_value)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, kl_coef: float = 0.0):
    """The GRPO loss (-J, see the module docstring) and statistics.
    logp, old_logp, ref_logp [b, t]: log-probabilities of the sampled tokens under the policy
    (with gradients), the sampling policy and the reference; advantages [b]; mask [b, t] on the
    response tokens. Returns (loss, {"kl", "clip_frac", "ratio"}) with token-mean statistics."""
    check_real("clip_eps", clip_eps, 0, 1, low_open=True)  # as RLConfig.clip_eps: a negative eps inverted the clip
    check_real("kl_coef", kl_coef, 0)
    tensors = {"logp": logp, "old_logp": old_logp, "mask": mask}
    if ref_logp is not None:
        tensors["ref_logp"] = ref_logp
    for name, value in {**tensors, "advantages": advantages}.items():
        check_type(name, value, torch.Tensor)
    shapes = {name: tuple(value.shape) for name, value in tensors.items()}
    if logp.dim() != 2 or len(set(shapes.values())) > 1 or tuple(advantages.shape) != tuple(logp.shape[:1]):
        raise ValueError(f"{shapes} and advantages {tuple(advantages.shape)}: expected [b, t] log-probabilities "
                         "and mask of the same shape, and [b] advantages")
    mask = mask.float()
    adv = rearrange(advantages.float(), "b -> b 1")
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    # min(rho A, clip(rho, 1 - eps, 1 + eps) A)   (PPO, Schulman et al. 2017, eq. 7)
    surrogate = torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = surrogate - kl_coef * kl
    # 1/|o_i| sum_t (...), then the mean over the responses of all groups
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss = -per_sequence.mean()
    n = mask.sum().clamp(min=1.0)
    stats = {"kl": float((kl.detach() * mask).sum() / n),
             "clip_frac": float(((clipped < unclipped).float() * mask).sum() / n),
             "ratio": float((ratio.detach() * mask).sum() / n)}
    return loss, stats


# ------------------------------------------------------------------------------ the curriculum
@dataclass
class Curriculum:
    """Which difficulty levels RL draws prompts from. Levels are "retired" when the policy passes
    them at >= easy_above (too easy: they would mostly give zero-advantage groups) and the next
    harder level is unlocked when the hardest active level passes advance_at."""

    levels: tuple[int, ...] = LEVELS  # all levels, easiest first
    easy_above: float = 0.9  # a level whose pass rate reaches this is retired
    advance_at: float = 0.5  # unlock the next level when the hardest active level passes this
    ema: float = 0.7  # running pass rate = ema * old + (1 - ema) * this step's mean reward
    max_level: int = 0  # hardest unlocked level (start() sets it)
    retired: set = field(default_factory=set)  # levels no longer sampled
    pass_rate: dict = field(default_factory=dict)  # level -> running pass rate

    def __post_init__(self):
        self.levels = check_levels("Curriculum.levels", self.levels, increasing=True)  # _advance walks them in order
        check_real("Curriculum.easy_above", self.easy_above, 0, 1, low_open=True)
        check_real("Curriculum.advance_at", self.advance_at, 0, 1)
        check_real("Curriculum.ema", self.ema, 0, 1)

    def active(self) -> list[int]:
        """Unlocked, not retired levels (never empty: the hardest unlocked one at least)."""
        act = [lv for lv in self.levels if lv <= self.max_level and lv not in self.retired]
        return act or [self.max_level]

    def start(self, probe: dict[int, float]) -> None:
        """Initial pass rates (level -> pass@1 by the policy): retire the easy levels and unlock
        up to the easiest level that is not easy."""
        _check_pass_rates("probe", probe)
        self.pass_rate = dict(probe)
        self.retired = {lv for lv, p in probe.items() if p >= self.easy_above}
        hard = [lv for lv in self.levels if lv not in self.retired]
        self.max_level = hard[0] if hard else self.levels[-1]
        self._advance()

    def reprobe(self, probe: dict[int, float]) -> None:
        """A fresh pass@k probe during RL (continual filtering): pass rates are reset to it and
        every level is retired or brought back by it; unlocked levels stay unlocked."""
        _check_pass_rates("probe", probe)
        self.pass_rate.update(probe)
        self.retired = {lv for lv, p in probe.items() if p >= self.easy_above and lv != self.levels[-1]}
        self._advance()

    def update(self, level_rewards: dict[int, float]) -> None:
        """After a step: update running pass rates, retire easy levels, unlock harder ones.
        Every rate is checked before any changes."""
        _check_pass_rates("level_rewards", level_rewards)
        for lv, r in level_rewards.items():
            old = self.pass_rate.get(lv, r)
            self.pass_rate[lv] = self.ema * old + (1 - self.ema) * r
            if self.pass_rate[lv] >= self.easy_above and lv != self.levels[-1]:
                self.retired.add(lv)
        self._advance()

    def _advance(self) -> None:
        while (self.max_level < self.levels[-1]
               and (self.max_level in self.retired or self.pass_rate.get(self.max_level, 0.0) >= self.advance_at)):
            self.max_level = self.levels[self.levels.index(self.max_level) + 1]

    def sample(self, rng: random.Random, n: int, max_digits: int = MAX_DIGITS):
        """n problems, levels drawn uniformly from the active ones."""
        act = self.active()
        return [problem_at_level(rng, rng.choice(act), max_digits) for _ in range(n)]


def _check_pass_rates(name: str, rates) -> None:
    """level -> pass rate in [0, 1] (a mean 0/1 reward); a rate above 1 retired levels it should not."""
    check_type(name, rates, dict, "{level: pass rate in [0, 1]}")
    for lv, rate in rates.items():
        check_real(f"{name}[{lv!r}]", rate, 0, 1)


@torch.no_grad()
def probe_pass_rates(model, levels=LEVELS, problems_per_level: int = 16, samples: int = 4,
                     temperature: float = 1.0, seed: int = 0, tokenizer: ByteTokenizer | None = None) -> dict:
    """The policy's pass@1 per level, from `samples` samples of `problems_per_level` fresh
    problems each (the pass@k analysis of the blog, with k = 1)."""
    levels = check_levels("levels", levels)
    check_int("problems_per_level", problems_per_level, 1)
    check_int("seed", seed, 0)
    rng = random.Random(seed)
    problems = [problem_at_level(rng, lv) for lv in levels for _ in range(problems_per_level)]
    comps = complete(model, problems, samples, temperature, seed, tokenizer=tokenizer)
    rates = defaultdict(list)
    for p, row in zip(problems, comps):
        rates[p.level].extend(c.reward for c in row)
    return {lv: sum(v) / len(v) for lv, v in sorted(rates.items())}


# ------------------------------------------------------------------------------ training
@dataclass
class RLConfig:
    steps: int = 60  # RL steps (one sampling round each)
    prompts_per_step: int = 64  # P prompts (groups) sampled per step
    group_size: int = 8  # G responses per prompt
    temperature: float = 1.0  # sampling temperature of the rollouts
    lr: float = 1e-4  # AdamW learning rate (constant after warmup); higher drifts fast on a noisy gradient
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW moment decay rates
    grad_clip: float = 1.0  # global gradient-norm clip
    clip_eps: float = 0.2  # PPO/GRPO ratio clip epsilon
    mu: int = 2  # gradient steps per sampled batch (GRPO's mu); clipping acts only when > 1
    kl_coef: float = 0.05  # beta of the k3 KL penalty to the frozen reference (0 = none; KL is still measured)
    scale_advantages: bool = True  # divide by the group std (GRPO); False = Dr. GRPO
    filter_zero_advantage: bool = True  # drop groups whose rewards are all equal before the update
    levels: tuple[int, ...] = LEVELS  # difficulty levels RL may draw prompts from
    curriculum: bool = True  # probe + hardness curriculum; False = prompts from all `levels`
    easy_above: float = 0.9  # curriculum: retire a level at this pass rate
    advance_at: float = 0.5  # curriculum: unlock the next level at this pass rate
    probe_problems: int = 16  # curriculum: problems per level in each pass@k probe
    reprobe_every: int = 20  # curriculum: steps between fresh probes of every level (0 = only before RL)
    seed: int = 0  # seeds prompts and sampling
    eval_every: int = 0  # steps between greedy evaluations on eval_problems (0 = start and end only)

    def __post_init__(self):
        _check_config(self)


def _check_config(cfg: RLConfig) -> None:
    check_int("RLConfig.steps", cfg.steps, 1)
    check_int("RLConfig.prompts_per_step", cfg.prompts_per_step, 1)
    check_group_size("RLConfig.group_size", cfg.group_size)
    if cfg.temperature == 0:
        raise ValueError("RLConfig.temperature=0: greedy rollouts make every sample of a group the same, so every "
                         "group has zero advantage and nothing is learnt; sample at a temperature > 0 (e.g. 1.0)")
    check_real("RLConfig.temperature", cfg.temperature, 0, low_open=True)
    check_real("RLConfig.clip_eps", cfg.clip_eps, 0, 1, low_open=True)
    check_int("RLConfig.mu", cfg.mu, 0)
    if cfg.mu == 0:
        raise ValueError("RLConfig.mu=0: must be >= 1 gradient steps per sampled batch (0 samples and never learns)")
    check_real("RLConfig.kl_coef", cfg.kl_coef, 0)  # 0 = no penalty (a cached run of notebook 07)
    for name in ("scale_advantages", "filter_zero_advantage", "curriculum"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"RLConfig.{name}={getattr(cfg, name)!r}: must be True or False")
    check_levels("RLConfig.levels", cfg.levels, increasing=True)
    check_real("RLConfig.easy_above", cfg.easy_above, 0, 1, low_open=True)
    check_real("RLConfig.advance_at", cfg.advance_at, 0, 1)
    check_int("RLConfig.probe_problems", cfg.probe_problems, 1)
    check_int("RLConfig.reprobe_every", cfg.reprobe_every, 0)
    check_optimizer_fields(cfg)


@dataclass
class RLHistory:
    step: list[int] = field(default_factory=list)  # RL step (one batch of groups sampled), from 0
    reward: list[float] = field(default_factory=list)  # mean reward of all sampled responses
    frac_filtered: list[float] = field(default_factory=list)  # fraction of groups with zero advantage
    kl: list[float] = field(default_factory=list)  # mean per-token k3 KL to the reference (kept responses)
    loss: list[float] = field(default_factory=list)  # GRPO loss of the last gradient step
    clip_frac: list[float] = field(default_factory=list)  # fraction of tokens where the clip acted
    response_len: list[float] = field(default_factory=list)  # mean response length in tokens
    verbose: list[float] = field(default_factory=list)  # fraction of sampled responses that are verbose
    max_level: list[int] = field(default_factory=list)  # hardest unlocked level
    active_levels: list[list[int]] = field(default_factory=list)  # levels prompts were drawn from
    level_reward: list[dict] = field(default_factory=list)  # level -> mean reward this step
    probe: dict = field(default_factory=dict)  # the initial pass@1 probe, level -> rate
    reprobes: list[tuple[int, dict]] = field(default_factory=list)  # (after step, probe) during RL
    eval_step: list[int] = field(default_factory=list)  # -1 = before RL
    eval_accuracy: list[float] = field(default_factory=list)  # greedy exact-answer rate on eval_problems
    eval_pass_rate: list[dict] = field(default_factory=list)  # level -> greedy pass rate
    eval_verbose: list[float] = field(default_factory=list)  # fraction of verbose answers
    seconds: float = 0.0  # wall-clock time of the whole run

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def train_rl(policy, cfg: RLConfig | None = None, eval_problems=None, reference=None,
             tokenizer: ByteTokenizer | None = None) -> RLHistory:
    """GRPO on the addition task, in place. `reference` (frozen) defaults to a copy of the
    policy as it starts; the KL to it is always measured and penalised with cfg.kl_coef."""
    check_model("policy", policy)
    cfg = stage_config(cfg, RLConfig, "GRPO", "RLConfig(steps=40, group_size=8)")
    eval_problems = check_eval_problems("eval_problems", eval_problems)
    if reference is not None:
        check_model("reference", reference)
    check_tokenizer(tokenizer)
    with keeping_mode(policy):
        return _train_rl(policy, cfg, eval_problems, reference, tokenizer or ByteTokenizer())


def _train_rl(policy, cfg: RLConfig, eval_problems, reference, tok: ByteTokenizer) -> RLHistory:
    rng = random.Random(cfg.seed)
    reference = reference if reference is not None else copy.deepcopy(policy)  # used under no_grad only
    optimizer = torch.optim.AdamW(param_groups(policy, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    history = RLHistory()
    start = time.perf_counter()

    def evaluate(step):
        record_eval(history, policy, eval_problems, step, tok)

    if eval_problems is not None:
        evaluate(-1)
    cur = Curriculum(levels=tuple(cfg.levels), easy_above=cfg.easy_above, advance_at=cfg.advance_at)
    if cfg.curriculum:
        history.probe = probe_pass_rates(policy, cfg.levels, problems_per_level=cfg.probe_problems,
                                         seed=cfg.seed + 7, tokenizer=tok)
        cur.start(history.probe)
    else:
        cur.max_level = cur.levels[-1]
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        active = cur.active()
        problems = cur.sample(rng, cfg.prompts_per_step)
        comps = complete(policy, problems, cfg.group_size, cfg.temperature, seed=cfg.seed * 100_003 + step,
                         tokenizer=tok)
        rewards = torch.tensor([[c.reward for c in row] for row in comps])  # [p, g]
        advantages = group_advantages(rewards, cfg.scale_advantages)
        zero = zero_advantage_groups(rewards)
        keep = ~zero if cfg.filter_zero_advantage else torch.ones_like(zero)

        level_rewards = defaultdict(list)
        for p, r in zip(problems, rewards):
            level_rewards[p.level].append(float(r.mean()))
        level_rewards = {lv: sum(v) / len(v) for lv, v in sorted(level_rewards.items())}
        flat = [c for row in comps for c in row]

        loss_value, stats = float("nan"), {"kl": float("nan"), "clip_frac": float("nan")}
        if keep.any():
            policy.train()
            kept = [c for row, k in zip(comps, keep.tolist()) if k for c in row]
            ids, mask = completion_batch(kept, tok.pad_id)
            ids, mask = ids.to(policy.device), mask[:, 1:].to(policy.device)
            adv = rearrange(advantages[keep], "p g -> (p g)").to(policy.device)
            with torch.no_grad():
                old_logp = token_logprobs(policy, ids)
                ref_logp = token_logprobs(reference, ids)
            for _ in range(cfg.mu):
                logp = token_logprobs(policy, ids)
                loss, stats = grpo_loss(logp, old_logp, adv, mask, ref_logp, cfg.clip_eps, cfg.kl_coef)
                loss_value = loss.item()  # read for the history anyway: checked before the update
                check_finite_loss(loss_value, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                optimizer.step()
        cur.update(level_rewards)
        if cfg.curriculum and cfg.reprobe_every and (step + 1) % cfg.reprobe_every == 0 and step + 1 < cfg.steps:
            probe = probe_pass_rates(policy, cfg.levels, problems_per_level=cfg.probe_problems,
                                     seed=cfg.seed + 7 + step, tokenizer=tok)
            history.reprobes.append((step, probe))
            cur.reprobe(probe)

        history.step.append(step)
        history.reward.append(float(rewards.mean()))
        history.frac_filtered.append(float(zero.float().mean()))
        history.kl.append(stats["kl"])
        history.loss.append(loss_value)
        history.clip_frac.append(stats["clip_frac"])
        history.response_len.append(sum(len(c.response_ids) for c in flat) / len(flat))
        history.verbose.append(sum(c.verbose for c in flat) / len(flat))
        history.max_level.append(max(active))
        history.active_levels.append(active)
        history.level_reward.append(level_rewards)
        if eval_problems is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evaluate(step)
    if eval_problems is not None:
        evaluate(cfg.steps - 1)
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def mean_reward(model, problems, n_samples: int = 8, temperature: float = 1.0, seed: int = 0,
                tokenizer: ByteTokenizer | None = None) -> float:
    """Mean verifiable reward of sampled responses to `problems` (the RL objective's estimate)."""
    problems = check_items("problems", problems, Problem)  # no problems: no mean
    comps = complete(model, problems, n_samples, temperature, seed, tokenizer=tokenizer)
    flat = [c for row in comps for c in row]
    return sum(c.reward for c in flat) / max(len(flat), 1)
