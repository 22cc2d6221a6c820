"""The post-training course task: chat-formatted addition with graded difficulty and a verifier.

    rng = random.Random(0)
    p = problem_at_level(rng, level=5)           # e.g. Problem(a=487, b=65): 3 digits, 2 carries
    p.question, p.answer, p.level                # ("487+65=", "552", 5) for that one
    chat_prompt(p.question)                      # Llama 4 chat format, up to the assistant header
    reward(p, "552"), reward(p, "552\\n487+65=552"), reward(p, "551")   # 1.0, 1.0, 0.0
    is_verbose("552\\n487+65=552")                # True: correct, but more than the user asked for

Difficulty. A problem a+b has level = (digits of the larger operand) + (number of carries), so
with up to 3 digits the levels run from 1 (3+4) to 6 (999+1: 3 digits, 3 carries). Writing the
answer most-significant digit first, as people do, means a model must know the carry into a
column before it writes that column's digit: carries are what make the task hard for a small
transformer, and length adds columns to get wrong.

Chat format. Exactly Llama 4's (meta-llama/llama-models, models/llama4/chat_format.py):
    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n{question}<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n{response}<|eot|>
with the course's ByteTokenizer (one token per byte, the special tokens as single ids).

Responses come in two styles. "concise" is the bare number ("552"), what the user wants;
"verbose" restates the whole sum on a second line ("552\\n487+65=552"), a habit of the people who
wrote the SFT data. The verifier accepts both (it reads the first number of a finished
response), so RL cannot tell them apart; preferring the concise one is the "response quality"
corner case left to DPO. The answer comes first in both styles, so the style does not change how
hard the sum is, and the restatement uses only characters the base model knows (a chatty
English suffix would need letters our base model never saw, and it samples them as noise). A
response that never emits <|eot|> within MAX_NEW_TOKENS is unfinished and scores 0.

The base model is pre-trained briefly (pretrain_base) on a mix of raw "a+b=c\\n" lines
(minillama4.data's arithmetic documents) and single-turn dialogues in the chat format, with the
loss on every token: it has seen the template as text, as real base models see dialogues on the
web, but was never taught to answer. (Without any dialogues in pre-training, a few hundred SFT
steps did not transfer the raw skill to the chat layout at all on this model: the answer sits 14
tokens further from the operands, and the attention has to be relearnt.) `build_course_cache`
runs the whole pipeline of notebook 07 (base -> SFT -> RL -> DPO, and the precomputed widget
variants) and writes the checkpoints and results the notebook loads.

Simplifications against Meta's pipeline: one toy skill instead of reasoning, code, chat and
images; a 0.6M-parameter model; a rule-based verifier instead of reward models and judges; a
few thousand examples instead of millions. Easy levels have few distinct problems (level 1 has
55), so the evaluation problems of levels 1-2 also occur in training; levels 4-6 are mostly
unseen.

Axes: b batch (sequences), t tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import configs
from ..checks import check_choice, check_int, check_real, check_type, is_int
from ..config import Llama4Config
from ..tokenizer import ByteTokenizer

MAX_DIGITS = 3  # operands have 1..MAX_DIGITS digits
LEVELS = tuple(range(1, 2 * MAX_DIGITS + 1))  # difficulty levels 1..6
# longest response: a 4-digit sum, newline, "999+999=", the sum again, <|eot|>
MAX_NEW_TOKENS = 2 * (MAX_DIGITS + 1) + 1 + 2 * MAX_DIGITS + 2 + 1


# ------------------------------------------------------------------------------ problems
def count_carries(a: int, b: int) -> int:
    """Number of columns of a + b (written in base 10) that carry into the next column."""
    for name, value in (("a", a), ("b", b)):
        check_int(name, value, 0)  # a negative operand looped forever (-1 // 10 == -1)
    carries, carry = 0, 0
    while a or b:
        carry = 1 if a % 10 + b % 10 + carry >= 10 else 0
        carries += carry
        a, b = a // 10, b // 10
    return carries


@dataclass(frozen=True)
class Problem:
    a: int  # first operand (a non-negative integer: the task is adding natural numbers)
    b: int  # second operand

    def __post_init__(self):
        for name in ("a", "b"):
            check_int(f"Problem.{name}", getattr(self, name), 0)

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def digits(self) -> int:
        """Digits of the larger operand."""
        return len(str(max(self.a, self.b)))

    @property
    def carries(self) -> int:
        return count_carries(self.a, self.b)

    @property
    def level(self) -> int:
        """Difficulty: digits + carries (1..2 * MAX_DIGITS)."""
        return self.digits + self.carries


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def problem_at_level(rng: random.Random, level: int, max_digits: int = MAX_DIGITS) -> Problem:
    """A random problem of exactly this level: the larger operand's digit count d is drawn
    uniformly from the counts that allow the level (level - d carries, 0 <= level - d <= d),
    the other operand has 1..d digits, and pairs are redrawn until the carries match."""
    check_int("max_digits", max_digits, 1)
    if not is_int(level):  # a float level matches no carry count: it would search forever
        raise TypeError(f"level={level!r}: must be an integer in 1..{2 * max_digits}")
    choices = [d for d in range(1, max_digits + 1) if 0 <= level - d <= d]
    if not choices:
        raise ValueError(f"level {level} is impossible with up to {max_digits} digits (levels 1..{2 * max_digits})")
    d = rng.choice(choices)
    for _ in range(100_000):
        a, b = _number(rng, d), _number(rng, rng.randint(1, d))
        if rng.random() < 0.5:
            a, b = b, a
        p = Problem(a, b)
        if p.digits == d and p.carries == level - d:
            return p
    raise RuntimeError(f"no problem of level {level} found")  # pragma: no cover - probability ~0


def make_problems(n: int, seed: int, levels=LEVELS, max_digits: int = MAX_DIGITS) -> list[Problem]:
    """n problems, levels cycling through `levels` in a seeded random order (as balanced as n
    allows). Problems may repeat at easy levels, where few distinct ones exist."""
    check_int("n", n, 0)
    check_int("seed", seed, 0)
    levels = list(check_levels("levels", levels, max_digits))
    rng = random.Random(seed)
    order = [levels[i % len(levels)] for i in range(n)]
    rng.shuffle(order)
    return [problem_at_level(rng, level, max_digits) for level in order]


def by_level(problems, values=None) -> dict[int, list]:
    """Group values (default: the problems themselves) by the level of the matching problem."""
    out = defaultdict(list)
    for i, p in enumerate(problems):
        out[p.level].append(p if values is None else values[i])
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ argument checks
# shared by sft, rl and dpo: each refuses bad input by name before any sampling or training step
def check_levels(name: str, levels, max_digits: int = MAX_DIGITS, increasing: bool = False) -> tuple[int, ...]:
    """A non-empty collection of levels in 1..2 * max_digits (strictly increasing if asked: the
    curriculum walks them easiest first)."""
    check_int("max_digits", max_digits, 1)
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise TypeError(f"{name}={levels!r}: must be a tuple of difficulty levels, e.g. {LEVELS}")
    levels = tuple(levels)
    top = 2 * max_digits
    if not levels:
        raise ValueError(f"{name}=(): must name at least one difficulty level in 1..{top}")
    for lv in levels:
        if not is_int(lv) or not 1 <= lv <= top:
            raise ValueError(f"{name}={levels!r}: {lv!r} is not a difficulty level; expected integers in 1..{top}")
    if increasing and any(a >= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"{name}={levels!r}: must be increasing, without repeats (easiest first)")
    return levels


def check_model(name: str, model) -> None:
    """A model (an nn.Module such as Llama4Text), not its config or a path."""
    check_type(name, model, torch.nn.Module, "pass a model: Llama4Text.random(model_config()) or load_stage(path)")


def check_items(name: str, items, kind, hint: str = "", allow_empty: bool = False) -> list:
    """items as a list, every one an instance of `kind` (a generator is read once, here)."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be a list of {kind.__name__}, got {type(items).__name__}")
    items = list(items)
    if not items and not allow_empty:
        raise ValueError(f"{name} is empty: expected at least one {kind.__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] is a {type(item).__name__}: expected {kind.__name__} items"
                            f"{'; ' + hint if hint else ''}")
    return items


def check_eval_problems(name: str, problems):
    """None (no evaluation) or a non-empty list of Problems: an empty set has no accuracy."""
    if problems is None:
        return None
    return check_items(name, problems, Problem, "make them with make_problems or eval_problems (None: no evaluation)")


@contextlib.contextmanager
def keeping_mode(model):
    """Restore the model's train/eval mode on the way out, also when a non-finite loss stops a loop."""
    was_training = model.training
    try:
        yield model
    finally:
        model.train(was_training)


def stage_config(cfg, cls, stage: str, example: str):
    """A stage's config: the defaults for None, else a `cls` checked again (a field may have been
    set after the config was built). Pre-training's TrainConfig has other fields and a 6x higher
    lr: it must not pass for an SFTConfig."""
    if cfg is None:
        return cls()
    check_type("cfg", cfg, cls, f"{stage} takes a {cls.__name__} (e.g. {example})")
    cfg.__post_init__()
    return cfg


def check_optimizer_fields(cfg) -> None:
    """The AdamW and schedule fields shared by SFTConfig, RLConfig and DPOConfig."""
    prefix = type(cfg).__name__
    check_real(f"{prefix}.lr", cfg.lr, 0, low_open=True)
    check_int(f"{prefix}.warmup", cfg.warmup, 0)
    check_real(f"{prefix}.weight_decay", cfg.weight_decay, 0)
    if not isinstance(cfg.betas, (tuple, list)) or len(cfg.betas) != 2:
        raise ValueError(f"{prefix}.betas={cfg.betas!r}: must be two AdamW decay rates in [0, 1), e.g. (0.9, 0.99)")
    for b in cfg.betas:
        check_real(f"{prefix}.betas", b, 0, 1, high_open=True)
    check_real(f"{prefix}.grad_clip", cfg.grad_clip, 0)
    check_int(f"{prefix}.seed", cfg.seed, 0)
    check_int(f"{prefix}.eval_every", cfg.eval_every, 0)


def check_group_size(name: str, g) -> int:
    """GRPO's G: one sample has no group to be compared with (its advantage is always 0)."""
    check_int(name, g, 1)
    if g < 2:
        raise ValueError(f"{name}={g}: GRPO needs >= 2 samples per prompt to compare them (a group of 1 has zero "
                         "advantage, so every group would be filtered and nothing learnt)")
    return g


def check_tokenizer(tokenizer) -> None:
    if tokenizer is not None:
        check_type("tokenizer", tokenizer, ByteTokenizer)


# ------------------------------------------------------------------------------ chat format
def chat_prompt(question: str) -> str:
    """The Llama 4 chat prompt for one user turn, ending where the assistant starts to write."""
    return ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n" + question
            + "<|eot|><|header_start|>assistant<|header_end|>\n\n")


def format_response(problem: Problem, style: str = "concise") -> str:
    """The reference response in a style: "concise" -> "552", "verbose" -> "552\n487+65=552"."""
    if style == "concise":
        return problem.answer
    if style == "verbose":
        return problem.answer + "\n" + problem.question + problem.answer
    raise ValueError(f"style={style!r}: expected 'concise' or 'verbose'")


def encode_chat(tok: ByteTokenizer, problem: Problem, response: str) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + response + <|eot|>, and a mask that is True on the assistant's tokens
    (the response and its <|eot|>): the only tokens SFT trains on."""
    prompt = tok.encode(chat_prompt(problem.question))
    answer = tok.encode(response) + [tok.eot_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def pad_batch(sequences, masks, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ids [b, t] and mask [b, t] (False on padding). The model is causal, so right
    padding never changes the logits of the real tokens before it."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), t, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


# ------------------------------------------------------------------------------ the verifier
_NUMBER = re.compile(r"\d+")


def parse_answer(response: str) -> str | None:
    """The first number in a response (its digits as written), or None."""
    m = _NUMBER.search(response)
    return m.group(0) if m else None


def is_correct(problem: Problem, response: str, finished: bool = True) -> bool:
    """The response is finished (ended with <|eot|>) and its first number is the sum."""
    return finished and parse_answer(response) == problem.answer


def reward(problem: Problem, response: str, finished: bool = True) -> float:
    """The verifiable reward of RL: 1.0 for a correct finished response, else 0.0."""
    return float(is_correct(problem, response, finished))


def is_verbose(response: str) -> bool:
    """Anything besides the bare number counts as verbose."""
    return not response.strip().isdigit()


# ------------------------------------------------------------------------------ sampling
@dataclass
class Completion:
    problem: Problem  # what was asked
    text: str  # the response, decoded, without the <|eot|>
    finished: bool  # ended with <|eot|> within the token limit
    prompt_ids: list[int]  # the chat prompt's token ids
    response_ids: list[int]  # the generated ids, <|eot|> included when finished, no padding

    @property
    def correct(self) -> bool:
        return is_correct(self.problem, self.text, self.finished)

    @property
    def verbose(self) -> bool:
        return is_verbose(self.text)

    @property
    def reward(self) -> float:
        return float(self.correct)


@torch.no_grad()
def generate_bucketed(model, prompts: list[list[int]], n_samples: int, temperature: float, seed: int,
                      max_new_tokens: int, stop_id: int) -> list[list[tuple[list[int], bool]]]:
    """Sample n_samples continuations of every prompt (token id lists of any lengths):
    out[i][j] = (new ids up to and including the first stop_id, finished?). Prompts of equal
    length share one batched generate call (the model has no padding mask); each call's seed is
    derived from `seed` and the prompt length, so a prompt's samples do not depend on which other
    lengths are in the list."""
    out: list[list] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_len[len(ids)].append(i)
    was_training = model.training
    model.eval()
    for length, rows in sorted(by_len.items()):
        ids = torch.tensor([prompts[i] for i in rows]).repeat_interleave(n_samples, dim=0)
        gen = model.generate(ids, max_new_tokens, temperature=temperature, seed=seed * 1000 + length,
                             stop_tokens=[stop_id])[:, length:].tolist()
        for k, new in enumerate(gen):
            finished = stop_id in new
            out[rows[k // n_samples]].append((new[: new.index(stop_id) + 1] if finished else new, finished))
    model.train(was_training)
    return out


def complete(model, problems, n_samples: int = 1, temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = MAX_NEW_TOKENS, tokenizer: ByteTokenizer | None = None) -> list[list[Completion]]:
    """n_samples chat completions of every problem: out[i][j] is sample j of problem i (greedy at
    temperature 0; see generate_bucketed for batching and seeds)."""
    check_model("model", model)
    problems = check_items("problems", problems, Problem, allow_empty=True)
    check_int("n_samples", n_samples, 1)
    check_tokenizer(tokenizer)
    tok = tokenizer or ByteTokenizer()
    prompts = [tok.encode(chat_prompt(p.question)) for p in problems]
    gen = generate_bucketed(model, prompts, n_samples, temperature, seed, max_new_tokens, tok.eot_id)
    return [[Completion(p, tok.decode(new[:-1] if done else new), done, ids, new) for new, done in row]
            for p, ids, row in zip(problems, prompts, gen)]


def complete_raw(model, problems, tokenizer: ByteTokenizer | None = None) -> list[str]:
    """Greedy answers in the base model's native format (raw_prompt_ids, up to a newline)."""
    check_model("model", model)
    problems = check_items("problems", problems, Problem, allow_empty=True)
    check_tokenizer(tokenizer)
    tok = tokenizer or ByteTokenizer()
    newline = tok.encode("\n")[0]
    gen = generate_bucketed(model, [raw_prompt_ids(tok, p) for p in problems], 1, 0.0, 0, MAX_DIGITS + 2, newline)
    return [tok.decode(row[0][0]).split("\n")[0] for row in gen]


def pass_rates(problems, correct) -> dict[int, float]:
    """level -> fraction of True in `correct` (one bool per problem)."""
    return {lv: sum(v) / len(v) for lv, v in by_level(problems, list(correct)).items()}


@dataclass
class Evaluation:
    """Greedy answers to a problem set, summarised."""

    pass_rate: dict[int, float]  # level -> fraction answered correctly
    verbose_rate: dict[int, float]  # level -> fraction of responses that are not a bare number
    accuracy: float  # over all problems
    verbose: float  # over all problems
    completions: list[Completion]  # one per problem, in order

    def summary(self) -> dict:
        return {"pass_rate": self.pass_rate, "verbose_rate": self.verbose_rate,
                "accuracy": self.accuracy, "verbose": self.verbose}


def evaluate_chat(model, problems, tokenizer: ByteTokenizer | None = None) -> Evaluation:
    """Greedy chat answers to every problem: pass rate and verbose rate per level."""
    problems = check_items("problems", problems, Problem)  # an empty set has no accuracy
    completions = [c[0] for c in complete(model, problems, tokenizer=tokenizer)]
    n = max(len(completions), 1)
    return Evaluation(pass_rates(problems, [c.correct for c in completions]),
                      pass_rates(problems, [c.verbose for c in completions]),
                      sum(c.correct for c in completions) / n, sum(c.verbose for c in completions) / n,
                      completions)


def record_eval(history, model, problems, step: int, tokenizer: ByteTokenizer | None = None) -> None:
    """Append a held-out greedy evaluation at `step` to a training history with the fields
    eval_step, eval_accuracy, eval_pass_rate and eval_verbose (SFTHistory, RLHistory)."""
    ev = evaluate_chat(model, problems, tokenizer)
    history.eval_step.append(step)
    history.eval_accuracy.append(ev.accuracy)
    history.eval_pass_rate.append(ev.pass_rate)
    history.eval_verbose.append(ev.verbose)


def evaluate_raw(model, problems, tokenizer: ByteTokenizer | None = None) -> dict[int, float]:
    """level -> greedy pass rate in the raw "a+b=" format (how a base model is tested)."""
    problems = check_items("problems", problems, Problem)  # read once (a generator), and not empty: {} read as no levels
    answers = complete_raw(model, problems, tokenizer)
    return pass_rates(problems, [a == p.answer for a, p in zip(answers, problems)])


# ------------------------------------------------------------------------------ the base model
def model_config() -> Llama4Config:
    """The course's tiny Llama 4 (4 layers, NoPE in layer 3, 4 experts + shared expert, d=64)
    with attention chunks of 64 tokens, so that every chat sequence (at most ~50 tokens) fits in
    one chunk and RoPE layers see the whole question."""
    return dataclasses.replace(configs.tiny().replace_text(attention_chunk_size=64, floor_scale=64),
                               name="posttrain-tiny")


def pretraining_stream(n_chars: int = 1_500_000, seed: int = 0, chat_share: float = 0.3, max_digits: int = MAX_DIGITS,
                       tokenizer: ByteTokenizer | None = None) -> torch.Tensor:
    """Token ids [n] of the base model's pre-training mix, documents in a seeded random order,
    each followed by <|end_of_text|>:
      - raw text: minillama4.data's arithmetic documents, 20 "a+b=c\n" lines each;
      - dialogues: one chat turn each, user "a+b=" and assistant "c" (concise), in the Llama 4
        chat format, about `chat_share` of the tokens.
    Operands have 1..max_digits digits, the digit count drawn first (data.arithmetic_problem)."""
    from ..data import arithmetic_documents, arithmetic_problem

    check_int("n_chars", n_chars, 1)
    check_real("chat_share", chat_share, 0, 1)  # (1.5 was refused as n_chars=-500, NaN as a float conversion)
    check_tokenizer(tokenizer)
    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed)
    raw = [tok.encode(doc) + [tok.eos_id]
           for doc in arithmetic_documents(int(n_chars * (1 - chat_share)), seed=seed, max_digits=max_digits)]
    chats, total = [], 0
    while total < n_chars * chat_share:
        question, answer = arithmetic_problem(rng, max_digits)
        ids = tok.encode(chat_prompt(question) + answer + "<|eot|>") + [tok.eos_id]
        chats.append(ids)
        total += len(ids)
    docs = raw + chats
    rng.shuffle(docs)
    return torch.tensor([i for doc in docs for i in doc], dtype=torch.long)


def pretrain_base(steps: int = 3000, seed: int = 0, chat_share: float = 0.3, progress: bool = False, **overrides):
    """A briefly pre-trained base model: model_config() from seed, trained with
    minillama4.train.train on pretraining_stream(chat_share=...) for `steps` steps (batch 32
    windows of 64 tokens). Returns (model, History)."""
    from ..model import Llama4Text
    from .loop import TrainConfig, train

    check_real("chat_share", chat_share, 0, 1)  # before the model is built
    model = Llama4Text.random(model_config(), seed=seed)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=30, batch_size=32, seq_len=64, seed=seed,
                      progress=progress, log_every=0)
    history = train(model, pretraining_stream(seed=seed, chat_share=chat_share), cfg, **overrides)
    return model, history


def raw_prompt_ids(tok: ByteTokenizer, problem: Problem) -> list[int]:
    """The base model's native format: <|end_of_text|> then "a+b=" (as in its training stream)."""
    return [tok.eos_id] + tok.encode(problem.question)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k)."""
    check_int("n", n, 1)
    check_int("c", c, 0)
    check_int("k", k, 1)
    if c > n or k > n:  # k > n samples cannot estimate pass@k (it used to answer 1.0 for c = 0)
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): needs c <= n (correct of n samples) and k <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) under `model`: [b, t-1], float32. Position j of the
    result scores token j + 1 (so a mask over ids is applied as mask[:, 1:])."""
    logits = model(ids[:, :-1]).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def completion_batch(completions, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids [b, t] (right-padded) and a mask [b, t] on the response tokens."""
    seqs = [c.prompt_ids + c.response_ids for c in completions]
    masks = [[False] * len(c.prompt_ids) + [True] * len(c.response_ids) for c in completions]
    return pad_batch(seqs, masks, pad_id)


# ------------------------------------------------------------------------------ the course pipeline
@dataclass
class PipelineConfig:
    """Everything notebook 07's cached results depend on (see build_course_cache)."""

    seed: int = 0  # seeds the base model's init and every stage
    pretrain_steps: int = 3000  # base model: steps of pre-training (batch 32 x 64 tokens)
    chat_share: float = 0.3  # share of dialogue tokens in the pre-training mix (the rest: raw "a+b=c" lines)
    eval_per_level: int = 100  # held-out problems per level for every pass-rate figure
    sft_examples: int = 2048  # size of the SFT dataset before pruning
    verbose_fraction: float = 0.6  # share of SFT responses in the verbose style
    judge_format: str = "chat"  # how the judge (the base model) is asked: "chat" or "raw"
    drop_fraction: float = 0.5  # the main run: drop this share of SFT data as easy (Meta: > 50%)
    drop_variants: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)  # widget: SFT on each pruning level
    sft_epochs: float = 2.0  # SFT passes over the kept data (steps scale with the data kept)
    sft_lr: float = 5e-4  # SFT peak learning rate
    rl_steps: int = 60  # GRPO steps of every run
    rl_samples_per_step: int = 512  # prompts per step x group size, the same for every group size
    rl_group_size: int = 8  # G of the main run
    rl_kl_coef: float = 0.05  # beta of the KL penalty in the main run
    rl_lr: float = 1e-4  # GRPO learning rate
    rl_variants: tuple[tuple[int, float], ...] = ((4, 0.05), (8, 0.0), (8, 0.05), (8, 0.2), (16, 0.05))  # (G, KL)
    dpo_problems: int = 256  # problems whose samples make the training pairs
    dpo_eval_problems: int = 128  # problems whose samples make the held-out pairs
    dpo_samples: int = 8  # samples per problem when building pairs
    dpo_beta: float = 1.0  # beta of the main run (see the beta variants: smaller beta drifts further)
    dpo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)  # widget: DPO with each beta
    dpo_steps: int = 40  # DPO optimizer steps (batch 32 pairs)
    dpo_lr: float = 2e-5  # DPO learning rate

    def __post_init__(self):
        _check_pipeline(self)


def _check_pipeline(cfg: PipelineConfig) -> None:
    """Every field, so a bad setting fails where it is built, not after minutes of pre-training."""
    def name(field):
        return f"PipelineConfig.{field}"

    for field in ("pretrain_steps", "eval_per_level", "sft_examples", "rl_steps", "rl_samples_per_step",
                  "dpo_problems", "dpo_eval_problems", "dpo_steps"):
        check_int(name(field), getattr(cfg, field), 1)
    check_int(name("seed"), cfg.seed, 0)
    check_real(name("chat_share"), cfg.chat_share, 0, 1)
    check_real(name("verbose_fraction"), cfg.verbose_fraction, 0, 1)
    check_choice(name("judge_format"), cfg.judge_format, ("chat", "raw"))
    check_real(name("drop_fraction"), cfg.drop_fraction, 0, 1, high_open=True)
    for i, frac in enumerate(_nonempty(cfg, "drop_variants")):
        check_real(name(f"drop_variants[{i}]"), frac, 0, 1, high_open=True)
    for field in ("sft_epochs", "sft_lr", "rl_lr", "dpo_lr"):
        check_real(name(field), getattr(cfg, field), 0, low_open=True)
    check_real(name("rl_kl_coef"), cfg.rl_kl_coef, 0)
    runs = [(name("rl_group_size"), cfg.rl_group_size)]
    for i, variant in enumerate(_nonempty(cfg, "rl_variants")):
        if not isinstance(variant, (tuple, list)) or len(variant) != 2:
            raise ValueError(f"{name('rl_variants')}={cfg.rl_variants!r}: expected (group size, KL weight) pairs")
        runs.append((name(f"rl_variants[{i}][0]"), variant[0]))
        check_real(name(f"rl_variants[{i}][1]"), variant[1], 0)
    for field, g in runs:
        check_group_size(field, g)
        if cfg.rl_samples_per_step < g:
            raise ValueError(f"{name('rl_samples_per_step')}={cfg.rl_samples_per_step}: must be at least every "
                             f"group size ({g}): prompts per step = rl_samples_per_step // group size")
    # one sample can never be both the chosen and the rejected response of a pair
    check_int(name("dpo_samples"), cfg.dpo_samples, 2)
    check_real(name("dpo_beta"), cfg.dpo_beta, 0, low_open=True)
    for i, beta in enumerate(_nonempty(cfg, "dpo_betas")):
        check_real(name(f"dpo_betas[{i}]"), beta, 0, low_open=True)


def _nonempty(cfg, field: str) -> tuple:
    value = getattr(cfg, field)
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"PipelineConfig.{field}={value!r}: must be a non-empty tuple")
    return tuple(value)


def eval_problems(cfg: PipelineConfig | None = None) -> list[Problem]:
    """The held-out problems of notebook 07 (seeded apart from every training set)."""
    cfg = cfg or PipelineConfig()
    return make_problems(cfg.eval_per_level * len(LEVELS), seed=cfg.seed + 12345)


def round_to_bf16(model):
    """Round every weight to bfloat16 and back, in place: the cached checkpoints are stored in
    bf16 (half the size), and each stage starts from exactly the weights the cache holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model


def save_stage(model, path) -> None:
    """save_pretrained in bfloat16 (the model itself stays fp32)."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)


def load_stage(path):
    """A cached stage checkpoint as an fp32 Llama4Text."""
    from ..checkpoint import from_pretrained

    return from_pretrained(path, dtype="float32")


STAGES = ("base", "sft", "rl", "dpo")


def build_course_cache(path, cfg: PipelineConfig | None = None, start_at: str = "base", log=print) -> dict:
    """Run notebook 07's whole pipeline and write its cache under `path`:
    base/, sft/, rl/, dpo/ (checkpoints, bf16) and results.json (histories of every stage and of
    the widget variants). About 11 CPU-minutes (one thread). Returns the results dict.
    start_at="rl" (say) reuses the cached checkpoints and results of the stages before it.
    Results are reproducible on one machine with one thread; another machine or thread count
    can round differently, and small models amplify that, so expect similar, not equal, numbers."""
    import json
    import time
    from pathlib import Path

    cfg = cfg or PipelineConfig()
    check_type("cfg", cfg, PipelineConfig)
    _check_pipeline(cfg)  # again: a field may have been changed after the config was built
    check_choice("start_at", start_at, STAGES)
    if not callable(log):
        raise TypeError(f"log={log!r}: must be callable, like print")
    path = Path(path)
    _check_cache_to_reuse(path, STAGES.index(start_at))
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"config": dataclasses.asdict(cfg), "seconds": {}}
    held_out = eval_problems(cfg)
    first = STAGES.index(start_at)
    if first:  # reuse the earlier stages
        old = load_results(path)
        results["seconds"] = {k: v for k, v in old["seconds"].items() if k != "total"}
        results.update({k: old[k] for k in ("pretrain", "judge", "sft", "rl")[: {1: 1, 2: 3, 3: 4}[first]]})
        base = load_stage(path / "base")
        sft_model = load_stage(path / "sft") if first > 1 else None
        rl_model = load_stage(path / "rl") if first > 2 else None

    def lap(name, t0):
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {results['seconds'][name]:.0f} s")

    # 1. base model
    if first <= 0:
        t0 = time.perf_counter()
        base, history = pretrain_base(cfg.pretrain_steps, cfg.seed, cfg.chat_share)
        round_to_bf16(base)
        save_stage(base, path / "base")
        results["pretrain"] = {"loss": history.loss[::10], "raw_pass_rate": evaluate_raw(base, held_out),
                               "chat_pass_rate": evaluate_chat(base, held_out).pass_rate}
        lap("pretrain", t0)
    if first <= 1:
        sft_model = _sft_stage(path, cfg, base, held_out, results, log)
    if first <= 2:
        rl_model = _rl_stage(path, cfg, sft_model, held_out, results, log)
    _dpo_stage(path, cfg, rl_model, held_out, results, log)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (path / "results.json").write_text(json.dumps(_rounded(results)))
    return results


def _check_cache_to_reuse(path, first: int) -> None:
    """start_at after "base" reuses the stages before it: they must be in the cache already."""
    missing = [str(path / name) for name in ("results.json", *STAGES[:first]) if first and not (path / name).exists()]
    if missing:
        raise ValueError(f"start_at={STAGES[first]!r} reuses the cached stages before it, but {missing} "
                         f"{'is' if len(missing) == 1 else 'are'} missing; build from start_at='base'")


def _finish_stage(model, path, stage: str, t0: float, results: dict, log) -> None:
    """Round the stage's model to bf16 (what the cache stores), save it, record the time."""
    import time

    round_to_bf16(model)
    save_stage(model, path / stage)
    results["seconds"][stage] = round(time.perf_counter() - t0, 1)
    log(f"{stage}: {results['seconds'][stage]:.0f} s")


def _sft_stage(path, cfg, base, held_out, results, log):
    """Judge the SFT data with the base model; SFT on every pruning variant and a random subset."""
    import copy
    import time

    from .sft import SFTConfig, judge_scores, make_sft_dataset, prune_easy, train_sft

    t0 = time.perf_counter()
    data = make_sft_dataset(cfg.sft_examples, seed=cfg.seed + 1, verbose_fraction=cfg.verbose_fraction)
    scores = judge_scores(base, [ex.problem for ex in data], fmt=cfg.judge_format)
    results["judge"] = {"scores": [round(float(s), 6) for s in scores], "levels": [ex.problem.level for ex in data]}
    sft_cfg = SFTConfig(epochs=cfg.sft_epochs, lr=cfg.sft_lr, seed=cfg.seed, eval_every=16)
    variants, sft_model = {}, None
    for frac in sorted(set(cfg.drop_variants) | {cfg.drop_fraction}):
        model = copy.deepcopy(base)
        h = train_sft(model, prune_easy(data, scores, frac), sft_cfg, eval_problems=held_out)
        variants[str(frac)] = h.to_dict()
        log(f"  SFT drop {frac:.0%}: {h.n_examples} examples, {len(h.step)} steps, accuracy {h.eval_accuracy[-1]:.1%}")
        if frac == cfg.drop_fraction:
            sft_model = model
    # control: a random subset of the same size as the main run's, same steps
    rng = random.Random(cfg.seed + 2)
    n_keep = len(data) - round(cfg.drop_fraction * len(data))
    model = copy.deepcopy(base)
    h = train_sft(model, [data[i] for i in sorted(rng.sample(range(len(data)), n_keep))], sft_cfg,
                  eval_problems=held_out)
    results["sft"] = {"variants": variants, "random_subset": h.to_dict()}
    log(f"  SFT random {n_keep}: accuracy {h.eval_accuracy[-1]:.1%}")
    _finish_stage(sft_model, path, "sft", t0, results, log)
    return sft_model


def _rl_stage(path, cfg, sft_model, held_out, results, log):
    """GRPO from the SFT model: the main run and the (group size, KL weight) variants."""
    import copy
    import time

    from .rl import RLConfig, train_rl

    t0 = time.perf_counter()
    rl_runs, rl_model = {}, None
    for g, kl in sorted(set(cfg.rl_variants) | {(cfg.rl_group_size, cfg.rl_kl_coef)}):
        model = copy.deepcopy(sft_model)
        rcfg = RLConfig(steps=cfg.rl_steps, prompts_per_step=cfg.rl_samples_per_step // g, group_size=g,
                        kl_coef=kl, lr=cfg.rl_lr, seed=cfg.seed, eval_every=10)
        h = train_rl(model, rcfg, eval_problems=held_out)
        rl_runs[f"G={g}, KL={kl:g}"] = h.to_dict()
        log(f"  RL G={g} KL={kl:g}: accuracy {h.eval_accuracy[0]:.1%} -> {h.eval_accuracy[-1]:.1%}")
        if (g, kl) == (cfg.rl_group_size, cfg.rl_kl_coef):
            rl_model = model
    results["rl"] = {"main": f"G={cfg.rl_group_size}, KL={cfg.rl_kl_coef:g}", "variants": rl_runs,
                     "seconds": {name: h["seconds"] for name, h in rl_runs.items()}}
    _finish_stage(rl_model, path, "rl", t0, results, log)
    return rl_model


def _dpo_stage(path, cfg, rl_model, held_out, results, log):
    """Pairs from the RL model's samples; DPO with every beta variant."""
    import copy
    import time

    from .dpo import DPOConfig, build_pairs, train_dpo

    t0 = time.perf_counter()
    train_p = make_problems(cfg.dpo_problems, seed=cfg.seed + 21)
    test_p = make_problems(cfg.dpo_eval_problems, seed=cfg.seed + 22)
    pairs = build_pairs(rl_model, train_p, cfg.dpo_samples, seed=cfg.seed)
    held_pairs = build_pairs(rl_model, test_p, cfg.dpo_samples, seed=cfg.seed + 1)
    dpo_runs, dpo_model = {}, None
    for beta in sorted(set(cfg.dpo_betas) | {cfg.dpo_beta}):
        model = copy.deepcopy(rl_model)
        h = train_dpo(model, pairs, DPOConfig(beta=beta, steps=cfg.dpo_steps, lr=cfg.dpo_lr, seed=cfg.seed,
                                              eval_every=5), reference=rl_model, eval_pairs=held_pairs)
        ev = evaluate_chat(model, held_out)
        dpo_runs[str(beta)] = {"history": h.to_dict(), "accuracy": ev.accuracy, "verbose": ev.verbose,
                               "pass_rate": ev.pass_rate}
        log(f"  DPO beta={beta:g}: margin {h.eval_margin[-1]:.2f}, accuracy {ev.accuracy:.1%}, "
            f"verbose {ev.verbose:.1%}")
        if beta == cfg.dpo_beta:
            dpo_model = model
    kinds = [p.kind for p in pairs]
    results["dpo"] = {"main": str(cfg.dpo_beta), "variants": dpo_runs, "n_pairs": len(pairs),
                      "n_held_out_pairs": len(held_pairs),
                      "pair_kinds": {k: kinds.count(k) for k in ("wrong", "verbose")}}
    _finish_stage(dpo_model, path, "dpo", t0, results, log)


def _rounded(obj, digits: int = 5):
    """Floats rounded to `digits` significant digits, recursively (a smaller results.json)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def load_results(path) -> dict:
    """results.json of a cache written by build_course_cache."""
    import json
    from pathlib import Path

    return json.loads((Path(path) / "results.json").read_text())
