"""Lightweight supervised fine-tuning (SFT) on judge-pruned data, as in Llama 4's post-training.

Meta (Llama 4 blog, "Post-training our new models"): "we removed more than 50% of our data tagged
as easy by using Llama models as a judge and did lightweight SFT on the remaining harder set"
(95% pruned for Behemoth). Here:

    data = make_sft_dataset(2048, seed=0, verbose_fraction=0.6)        # chat examples, levels 1..6
    scores = judge_scores(base_model, [ex.problem for ex in data], fmt="chat")   # P(judge solves it)
    hard = prune_easy(data, scores, drop_fraction=0.5)                 # drop the easiest half
    history = train_sft(model, hard, SFTConfig(epochs=2), eval_problems=held_out)

The judge. The judge model (the base model itself, or any other) scores each example by its
exact probability of producing the reference answer when sampling at temperature 1, asked in
the chat format (fmt="chat") or in raw text ("a+b=" -> answer + newline, fmt="raw"):
    p_solve(x) = prod_t p_judge(y_t | x, y_<t) = exp(sum_t log p_judge(y_t | x, y_<t))
which is pass@1 without sampling; pass@k = 1 - (1 - p_solve)^k. "Easy" = high p_solve. Meta's
judges were prompted LLMs that tagged difficulty; a likelihood judge is the simplest stand-in.

The loss (masked SFT): next-token cross-entropy on the assistant's tokens only (response and
its <|eot|>); the prompt, the chat headers and the padding carry no loss:
    L = sum_{b,t} m[b,t+1] * CE(logits[b,t], ids[b,t+1]) / sum_{b,t} m[b,t+1]
(mean over assistant tokens in the batch, as TRL's completion-only loss).

Simplifications: one epoch-based loop with AdamW and warmup + cosine (minillama4.train.lr_at);
no packing, no gradient accumulation, fp32; the SFT data are generated, not human-written, and
a share of their responses are "verbose" on purpose (see posttrain_task) so DPO has a style to fix.

Axes: b batch (sequences), t tokens, v vocab.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from ..checks import check_choice, check_finite_loss, check_int, check_real, check_type
from ..tokenizer import ByteTokenizer
from .loop import TrainConfig, lr_at, param_groups
from .posttrain_task import (LEVELS, Problem, check_eval_problems, check_items, check_model, check_optimizer_fields,
                             check_tokenizer, encode_chat, format_response, keeping_mode, make_problems, pad_batch,
                             raw_prompt_ids, record_eval, stage_config, token_logprobs)


@dataclass(frozen=True)
class SFTExample:
    problem: Problem  # the question
    response: str  # the reference assistant response
    style: str  # "concise" or "verbose"


def make_sft_dataset(n: int, seed: int = 0, verbose_fraction: float = 0.6, levels=LEVELS) -> list[SFTExample]:
    """n examples with levels balanced over `levels`; each response is verbose with probability
    verbose_fraction (seeded), else the bare number."""
    check_real("verbose_fraction", verbose_fraction, 0, 1)
    problems = make_problems(n, seed, levels)  # checks n, seed and levels
    rng = random.Random(seed + 1)
    out = []
    for p in problems:
        style = "verbose" if rng.random() < verbose_fraction else "concise"
        out.append(SFTExample(p, format_response(p, style), style))
    return out


def sft_batch(examples, tokenizer: ByteTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-encoded examples -> ids [b, t] (right-padded) and assistant mask [b, t]."""
    tok = tokenizer or ByteTokenizer()
    encoded = [encode_chat(tok, ex.problem, ex.response) for ex in examples]
    return pad_batch([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_id)


def _check_targets(mask: torch.Tensor) -> None:
    if not bool(mask[:, 1:].any()):
        raise ValueError(f"mask {tuple(mask.shape)} has no True after position 0: no token to train on "
                         "(expected True on the assistant's response and <|eot|>, as sft_batch makes it)")


def masked_sft_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens where mask is True (assistant tokens).
    logits [b, t, v] from model(ids); position t is scored against ids[:, t+1] iff mask[:, t+1].
    A mask with no assistant token after position 0 is refused: every chat example ends in a
    scored <|eot|>, so it means a wrong mask (it used to give a loss of 0.0 that trained nothing)."""
    check_type("logits", logits, torch.Tensor, "[b, t, v] from model(ids)")
    check_type("ids", ids, torch.Tensor, "[b, t] token ids")
    check_type("mask", mask, torch.Tensor, "[b, t] True on the assistant's tokens, e.g. from sft_batch")
    if logits.dim() != 3 or ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape) or logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, ids {tuple(ids.shape)}, mask {tuple(mask.shape)}: "
                         "expected logits [b, t, v] and ids and mask [b, t] of the same b and t")
    if mask.device.type == "cpu":  # a host read on a GPU would wait for the forward: train_sft checks
        _check_targets(mask)        # sft_batch's CPU mask before moving it
    target_mask = rearrange(mask[:, 1:], "b t -> (b t)").float()
    ce = F.cross_entropy(rearrange(logits[:, :-1].float(), "b t v -> (b t) v"),
                         rearrange(ids[:, 1:], "b t -> (b t)"), reduction="none")
    # L = sum m * CE / sum m  (no loss on prompt, header or padding tokens)
    return (ce * target_mask).sum() / target_mask.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------ the judge
@torch.no_grad()
def judge_scores(judge, problems, fmt: str = "raw", batch_size: int = 256,
                 tokenizer: ByteTokenizer | None = None) -> torch.Tensor:
    """p_solve [n]: the judge's probability of sampling exactly the right answer at temperature 1.
    fmt "raw": the prompt is <|end_of_text|> "a+b=" and the answer ends with a newline (a base
    model's native format); "chat": the chat prompt, and the answer is the concise response and
    <|eot|> (a chat model as judge)."""
    check_model("judge", judge)
    problems = check_items("problems", problems, Problem, allow_empty=True)
    check_choice("fmt", fmt, ("raw", "chat"))
    check_int("batch_size", batch_size, 1)
    check_tokenizer(tokenizer)
    tok = tokenizer or ByteTokenizer()
    seqs, masks = [], []
    for p in problems:
        if fmt == "raw":
            prompt, answer = raw_prompt_ids(tok, p), tok.encode(p.answer + "\n")
        else:  # "chat"
            ids, mask = encode_chat(tok, p, p.answer)
            prompt, answer = ids[: mask.index(True)], ids[mask.index(True):]
        seqs.append(prompt + answer)
        masks.append([False] * len(prompt) + [True] * len(answer))
    was_training = judge.training
    judge.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], masks[i:i + batch_size], tok.pad_id)
        logp = token_logprobs(judge, ids)
        # p_solve = exp(sum over answer tokens of log p)
        out.append(torch.exp((logp * mask[:, 1:]).sum(-1)))
    judge.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def prune_easy(examples, scores, drop_fraction: float) -> list:
    """Keep the hardest examples: drop the round(drop_fraction * n) with the highest judge score
    (ties broken by position, so the result is deterministic). The kept ones stay in order."""
    check_real("drop_fraction", drop_fraction, 0, 1, high_open=True)
    examples = list(examples)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.shape != (len(examples),):
        raise ValueError(f"scores of shape {tuple(scores.shape)}: expected one score per example, "
                         f"shape ({len(examples)},)")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"scores[{bad}]={float(scores[bad])}: judge scores must be finite")
    n_drop = round(drop_fraction * len(examples))
    order = sorted(range(len(examples)), key=lambda i: (-float(scores[i]), i))  # easiest first
    dropped = set(order[:n_drop])
    return [ex for i, ex in enumerate(examples) if i not in dropped]


# ------------------------------------------------------------------------------ training
@dataclass
class SFTConfig:
    epochs: float = 2.0  # passes over the (kept) examples; steps = ceil(epochs * n / batch_size)
    steps: int | None = None  # if set, overrides epochs
    batch_size: int = 32  # examples per step
    lr: float = 5e-4  # peak AdamW learning rate (a pre-trained model: far below pre-training's 3e-3)
    warmup: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    seed: int = 0  # seeds the shuffling
    eval_every: int = 0  # steps between evaluations on eval_problems (0 = only at the end)

    def __post_init__(self):
        _check_config(self)


def _check_config(cfg: SFTConfig) -> None:
    check_real("SFTConfig.epochs", cfg.epochs, 0, low_open=True)
    if cfg.steps is not None:
        check_int("SFTConfig.steps", cfg.steps, 1)
    check_int("SFTConfig.batch_size", cfg.batch_size, 1)
    check_real("SFTConfig.min_lr_ratio", cfg.min_lr_ratio, 0, 1)
    check_optimizer_fields(cfg)


@dataclass
class SFTHistory:
    step: list[int] = field(default_factory=list)  # optimizer step, from 0
    loss: list[float] = field(default_factory=list)  # masked SFT loss of the batch (nats / assistant token)
    lr: list[float] = field(default_factory=list)  # learning rate of that step (warmup, then cosine)
    eval_step: list[int] = field(default_factory=list)  # steps after which eval_problems were answered
    eval_accuracy: list[float] = field(default_factory=list)  # greedy exact-answer rate
    eval_pass_rate: list[dict] = field(default_factory=list)  # level -> greedy pass rate
    eval_verbose: list[float] = field(default_factory=list)  # fraction of verbose answers
    n_examples: int = 0  # training examples (after pruning)
    seconds: float = 0.0  # wall-clock time of the whole run

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches over `steps` steps: a fresh seeded permutation every epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def sft_steps(n_examples: int, cfg: SFTConfig) -> int:
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def train_sft(model, examples, cfg: SFTConfig | None = None, eval_problems=None,
              tokenizer: ByteTokenizer | None = None) -> SFTHistory:
    """Masked SFT of `model` in place on `examples`; greedy evaluation on eval_problems every
    cfg.eval_every steps and at the end."""
    check_model("model", model)
    examples = check_items("examples", examples, SFTExample, "make them with make_sft_dataset")
    cfg = stage_config(cfg, SFTConfig, "SFT", "SFTConfig(steps=100)")
    eval_problems = check_eval_problems("eval_problems", eval_problems)
    check_tokenizer(tokenizer)
    with keeping_mode(model):
        return _train_sft(model, examples, cfg, eval_problems, tokenizer or ByteTokenizer())


def _train_sft(model, examples, cfg: SFTConfig, eval_problems, tok: ByteTokenizer) -> SFTHistory:
    steps = sft_steps(len(examples), cfg)
    lr_cfg = TrainConfig(steps=steps, lr=cfg.lr, warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    history = SFTHistory(n_examples=len(examples))
    start = time.perf_counter()

    def evaluate(step):
        record_eval(history, model, eval_problems, step, tok)

    model.train()
    for step, index in enumerate(_batches(len(examples), cfg.batch_size, steps, cfg.seed)):
        lr = lr_at(step, lr_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, mask = sft_batch([examples[i] for i in index], tok)
        _check_targets(mask)  # on the CPU copy: no wait for the device
        ids, mask = ids.to(model.device), mask.to(model.device)
        loss = masked_sft_loss(model(ids), ids, mask)
        loss_value = loss.item()  # read for the history anyway: checked before the update
        check_finite_loss(loss_value, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        history.step.append(step)
        history.loss.append(loss_value)
        history.lr.append(lr)
        if eval_problems is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
            evaluate(step)
    if eval_problems is not None:
        evaluate(steps - 1)
    history.seconds = time.perf_counter() - start
    return history
