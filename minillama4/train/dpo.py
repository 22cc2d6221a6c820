"""Lightweight DPO on the RL model's own samples: correct and concise beats wrong or verbose.

Meta (Llama 4 blog): a final "lightweight DPO to handle corner cases related to model response
quality". Our corner case: the verifier of RL accepts "552\\n487+65=552" (the sum restated) as
well as "552", so RL has (almost) no reason to drop the restatement the SFT data taught; DPO does.

    pairs = build_pairs(rl_model, problems, n_samples=8)      # from the model's own samples
    history = train_dpo(policy, pairs, DPOConfig(beta=0.1), eval_pairs=held_out_pairs)

The loss (Rafailov et al. 2023, eq. 7), for a prompt x, preferred y_w, rejected y_l, trainable
policy pi_theta and frozen reference pi_ref (here: the RL model before DPO):
    L = -log sigma( beta log(pi_theta(y_w|x) / pi_ref(y_w|x)) - beta log(pi_theta(y_l|x) / pi_ref(y_l|x)) )
log pi(y|x) sums the log-probabilities of the response tokens (and the <|eot|>). The implicit
reward is r(x, y) = beta log(pi_theta(y|x) / pi_ref(y|x)); the reward margin is r(y_w) - r(y_l),
and the reward accuracy the fraction of pairs with a positive margin, ties counting one half
(TRL's rewards/margins and rewards/accuracies, except that TRL counts ties as wrong: before any
step every margin is exactly 0, so ours starts at 0.5, chance, and TRL's at 0). The gradient
(the paper's §4, "What does the DPO update do?") is
    -beta sigma(r(y_l) - r(y_w)) [grad log pi(y_w|x) - grad log pi(y_l|x)]
so pairs the implicit reward still ranks wrongly weigh most. beta -> 0: L -> log 2 and the
gradient vanishes; large beta: L is ~0 for correctly ranked pairs and ~ -beta * h for wrongly
ranked ones (h: the difference of the two log-ratios).

We also report the policy's own preference accuracy, the fraction of pairs with
log pi_theta(y_w|x) > log pi_theta(y_l|x). It is not what DPO optimises: a shorter response has
fewer log-probabilities to sum, so a concise y_w often starts out preferred already, and DPO can
lower log pi(y_w) too, as long as log pi(y_l) falls faster ("likelihood displacement", Razin et
al. 2024).

Simplifications: pairs from one round of sampling (no iterative / on-policy DPO), one kind of
preference (a rule, not human raters), reference log-probs computed once (TRL's
precompute_ref_log_probs), AdamW with a constant learning rate after warmup.

Axes: b pairs, t tokens.
"""

from __future__ import annotations

import copy
import math
import numbers
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_finite_loss, check_int, check_real, check_type
from ..tokenizer import ByteTokenizer
from .loop import param_groups
from .posttrain_task import (Problem, check_items, check_model, check_optimizer_fields, check_tokenizer, complete,
                             encode_chat, keeping_mode, pad_batch, stage_config, token_logprobs)


PAIR_KINDS = ("wrong", "verbose")  # why a rejected response lost; preference_metrics reports the margin of each


@dataclass(frozen=True)
class PreferencePair:
    problem: Problem  # the prompt both responses answer
    chosen: str  # a correct, concise response (the bare number)
    rejected: str  # a wrong response, or a correct but verbose one
    kind: str  # "wrong" or "verbose": why the rejected response lost

    def __post_init__(self):
        check_choice("PreferencePair.kind", self.kind, PAIR_KINDS)  # another kind was left out of margin_by_kind


def build_pairs(model, problems, n_samples: int = 8, temperature: float = 1.0, seed: int = 0,
                tokenizer: ByteTokenizer | None = None) -> list[PreferencePair]:
    """Preference pairs from the model's own samples (n_samples per problem): the chosen
    response is a correct concise sample; each problem gives up to one "wrong" pair (against its
    most frequent finished wrong sample) and one "verbose" pair (against a correct verbose
    sample). Problems without a correct concise sample give none."""
    check_int("n_samples", n_samples, 1)
    check_real("temperature", temperature, 0)
    if n_samples < 2 or temperature == 0:  # a pair needs two different samples of one problem
        raise ValueError(f"n_samples={n_samples}, temperature={temperature}: pairs need n_samples >= 2 and "
                         "temperature > 0 (one sample, or identical greedy ones, never give a chosen and a rejected)")
    # a list, read twice below: a generator was used up by complete() and the loop then gave no pairs
    problems = check_items("problems", problems, Problem)
    comps = complete(model, problems, n_samples, temperature, seed, tokenizer=tokenizer)
    pairs = []
    for p, row in zip(problems, comps):
        good = [c.text for c in row if c.correct and not c.verbose]
        if not good:
            continue
        wrong = [c.text for c in row if c.finished and not c.correct]
        verbose = [c.text for c in row if c.correct and c.verbose]
        if wrong:
            pairs.append(PreferencePair(p, good[0], max(wrong, key=wrong.count), "wrong"))
        if verbose:
            pairs.append(PreferencePair(p, good[0], verbose[0], "verbose"))
    return pairs


def pair_batch(pairs, tokenizer: ByteTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2b, t] and response mask [2b, t]: the b chosen sequences, then the b rejected ones."""
    tok = tokenizer or ByteTokenizer()
    encoded = [encode_chat(tok, pr.problem, pr.chosen) for pr in pairs]
    encoded += [encode_chat(tok, pr.problem, pr.rejected) for pr in pairs]
    return pad_batch([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_id)


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) [b]: the sum of the response tokens' log-probabilities (mask [b, t] on them)."""
    return (token_logprobs(model, ids) * mask[:, 1:]).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """DPO loss (mean over pairs) and the implicit rewards of the chosen and rejected responses,
    from sequence log-probabilities [b] under the policy and the reference."""
    check_beta("beta", beta)
    logps = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
             "ref_rejected": ref_rejected}
    for name, value in logps.items():
        check_type(name, value, torch.Tensor, "[b] sequence log-probabilities, e.g. from sequence_logps")
    shapes = {name: tuple(value.shape) for name, value in logps.items()}
    if policy_chosen.dim() != 1 or len(set(shapes.values())) > 1:  # [b] against [b, 1] broadcast to [b, b]
        raise ValueError(f"log-probabilities of shapes {shapes}: expected four [b] tensors of the same shape, "
                         "one value per pair")
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # r(x, y_w) = beta log(pi / pi_ref)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # r(x, y_l)
    # L = -log sigma(r(x, y_w) - r(x, y_l))   (Rafailov et al. 2023, eq. 7)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def reward_accuracy(margin: torch.Tensor) -> float:
    """Fraction of pairs whose implicit reward margin is positive, ties counting one half."""
    check_type("margin", margin, torch.Tensor, "[b] reward margins r(y_w) - r(y_l)")
    if margin.numel() == 0:
        raise ValueError("margin is empty: the reward accuracy of no pairs is undefined")
    nan = torch.isnan(margin)  # reads the margins, as the accuracy below does anyway
    if nan.any():  # NaN > 0 and NaN == 0 are both False: a NaN pair counted as wrongly ranked
        raise ValueError(f"margin holds NaN at index {nan.flatten().nonzero().flatten().tolist()[:5]}: "
                         "a NaN margin is neither positive nor a tie")
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def check_beta(name: str, beta) -> float:
    """beta > 0: beta < 0 learns the opposite preference (while its reward accuracy reads high), and
    beta = 0 gives a zero gradient."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta <= 0:
        raise ValueError(f"{name}={beta!r}: must be a finite number > 0 (beta < 0 learns the opposite preference, "
                         "and beta = 0 never changes the model)")
    check_real(name, beta, 0, low_open=True)
    return beta


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint (paper default 0.1)
    steps: int = 60  # optimizer steps
    batch_size: int = 32  # pairs per step
    lr: float = 2e-5  # AdamW learning rate (constant after warmup; the paper used 1e-6 with RMSprop on 0.8B-6B models)
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW moment decay rates
    grad_clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # seeds the order of the pairs
    eval_every: int = 10  # steps between evaluations on eval_pairs (and at the end)

    def __post_init__(self):
        _check_config(self)


def _check_config(cfg: DPOConfig) -> None:
    check_beta("DPOConfig.beta", cfg.beta)
    check_int("DPOConfig.steps", cfg.steps, 1)
    check_int("DPOConfig.batch_size", cfg.batch_size, 1)
    check_optimizer_fields(cfg)


def check_pairs(name: str, pairs) -> list:
    """A non-empty list of PreferencePairs (SFT examples have no rejected response)."""
    return check_items(name, pairs, PreferencePair, "make them with build_pairs")


@dataclass
class DPOHistory:
    step: list[int] = field(default_factory=list)  # optimizer step, from 0
    loss: list[float] = field(default_factory=list)  # DPO loss of the batch
    margin: list[float] = field(default_factory=list)  # mean r(y_w) - r(y_l) of the batch
    accuracy: list[float] = field(default_factory=list)  # fraction of the batch with margin > 0 (ties: 1/2)
    chosen_reward: list[float] = field(default_factory=list)  # mean r(y_w) of the batch
    rejected_reward: list[float] = field(default_factory=list)  # mean r(y_l) of the batch
    eval_step: list[int] = field(default_factory=list)  # -1 = before DPO
    eval_loss: list[float] = field(default_factory=list)  # mean DPO loss on eval_pairs
    eval_margin: list[float] = field(default_factory=list)  # mean r(y_w) - r(y_l) on eval_pairs
    eval_accuracy: list[float] = field(default_factory=list)  # reward accuracy on eval_pairs (ties: 1/2)
    eval_preference: list[float] = field(default_factory=list)  # fraction with log pi(y_w) > log pi(y_l)
    eval_margin_by_kind: list[dict] = field(default_factory=list)  # "wrong"/"verbose" -> mean margin
    seconds: float = 0.0  # wall-clock time of the whole run

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@torch.no_grad()
def _logps(model, pairs, tok, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ids, mask = pair_batch(chunk, tok)
        lp = sequence_logps(model, ids.to(model.device), mask.to(model.device)).float().cpu()
        chosen.append(lp[: len(chunk)])
        rejected.append(lp[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def preference_metrics(policy, reference, pairs, beta: float, tokenizer: ByteTokenizer | None = None) -> dict:
    """loss, margin, reward accuracy, policy preference accuracy, and the margin by pair kind."""
    check_model("policy", policy)
    check_model("reference", reference)
    pairs = check_pairs("pairs", pairs)
    check_beta("beta", beta)
    check_tokenizer(tokenizer)
    tok = tokenizer or ByteTokenizer()
    was_training = policy.training
    policy.eval()
    pc, pr = _logps(policy, pairs, tok)
    rc, rr = _logps(reference, pairs, tok)
    policy.train(was_training)
    loss, cw, cl = dpo_loss(pc, pr, rc, rr, beta)
    margin = cw - cl
    kinds = {}
    for kind in PAIR_KINDS:
        sel = torch.tensor([p.kind == kind for p in pairs])
        if sel.any():
            kinds[kind] = float(margin[sel].mean())
    return {"loss": float(loss), "margin": float(margin.mean()), "accuracy": reward_accuracy(margin),
            "preference": float((pc > pr).float().mean()), "margin_by_kind": kinds}


def train_dpo(policy, pairs, cfg: DPOConfig | None = None, reference=None, eval_pairs=None,
              tokenizer: ByteTokenizer | None = None) -> DPOHistory:
    """DPO of `policy` in place on `pairs`; `reference` (frozen) defaults to a copy of the policy
    as it starts. Reference log-probabilities are computed once, before training."""
    check_model("policy", policy)
    pairs = check_pairs("pairs", pairs)
    cfg = stage_config(cfg, DPOConfig, "DPO", "DPOConfig(beta=0.1, steps=40)")
    if reference is not None:
        check_model("reference", reference)
    if eval_pairs is not None:  # None: no evaluation
        eval_pairs = check_pairs("eval_pairs", eval_pairs)
    check_tokenizer(tokenizer)
    with keeping_mode(policy):
        return _train_dpo(policy, pairs, cfg, reference, eval_pairs, tokenizer or ByteTokenizer())


def _train_dpo(policy, pairs, cfg: DPOConfig, reference, eval_pairs, tok: ByteTokenizer) -> DPOHistory:
    reference = reference if reference is not None else copy.deepcopy(policy)  # used under no_grad only
    ref_chosen, ref_rejected = _logps(reference, pairs, tok)
    optimizer = torch.optim.AdamW(param_groups(policy, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    history = DPOHistory()
    start = time.perf_counter()
    rng = random.Random(cfg.seed)

    def evaluate(step):
        m = preference_metrics(policy, reference, eval_pairs, cfg.beta, tok)
        history.eval_step.append(step)
        history.eval_loss.append(m["loss"])
        history.eval_margin.append(m["margin"])
        history.eval_accuracy.append(m["accuracy"])
        history.eval_preference.append(m["preference"])
        history.eval_margin_by_kind.append(m["margin_by_kind"])

    if eval_pairs:
        evaluate(-1)
    order: list[int] = []
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if len(order) < cfg.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        index, order = order[: cfg.batch_size], order[cfg.batch_size:]
        policy.train()
        ids, mask = pair_batch([pairs[i] for i in index], tok)
        logps = sequence_logps(policy, ids.to(policy.device), mask.to(policy.device)).float().cpu()
        b = len(index)
        loss, cw, cl = dpo_loss(logps[:b], logps[b:], ref_chosen[index], ref_rejected[index], cfg.beta)
        loss_value = loss.item()  # read for the history anyway: checked before the update
        check_finite_loss(loss_value, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        margin = cw - cl
        history.step.append(step)
        history.loss.append(loss_value)
        history.margin.append(float(margin.mean()))
        history.accuracy.append(reward_accuracy(margin))
        history.chosen_reward.append(float(cw.mean()))
        history.rejected_reward.append(float(cl.mean()))
        if eval_pairs and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
            evaluate(step)
    history.seconds = time.perf_counter() - start
    return history
