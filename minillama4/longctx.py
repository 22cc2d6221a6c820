"""Long context with iRoPE: synthetic retrieval tasks, the toy length-extrapolation experiment,
NoPE attention read-outs, and KV-cache memory arithmetic (full cache vs a chunk ring buffer).

    from minillama4 import longctx
    batch = longctx.PasskeyTask().batch(seq_len=32, batch=4, seed=0)     # "k3x#7b0q...?" -> "7"
    longctx.kv_cache_memory(configs.scout(), 1, ring_buffer=False).total  # 196,608 = 192 KiB per token
    results = longctx.run_experiment(longctx.ExperimentConfig())         # about an hour on 2 CPU cores: cached as JSON

Two retrieval tasks, in the course's byte tokens (one character = one token):

  PasskeyTask (the experiment's task; passkey retrieval, Mohtashami & Jaggi 2023, with distractors):
      <|begin_of_text|>k3x9q#7b0...m4?   ->  7
    a haystack of random letters AND digits, one digit marked by "#" before it, then "?": answer
    the marked digit. The other digits are distractors, so the model must bind "#" to the next
    token (a local job) and find that one digit anywhere in the sequence (a global job).
  KeyValueTask (associative recall, the "a=3 b=7 ?b" task):
      <|begin_of_text|>a3 q7 c1 x0 ... ?q7?x0?c1?a   ->  3 (one answer after each "?k")
    every queried key occurs once among the pairs, other keys are drawn with replacement from the
    keys not asked. It needs a key-specific binding: in our tries (600 to 1,500 steps, 5 to 15
    pairs, with and without "=") the 4-layer toy stayed at 21-41% right, far from solving it, so the
    experiment uses the passkey task; KeyValueTask stays for exercises.

The experiment trains small models at one short length and evaluates them at longer ones:
  all-RoPE  every layer RoPE with full causal attention (a classic Llama)
  iRoPE     Llama 4's layout: RoPE layers attend within chunks, every 4th layer is NoPE with full
            causal attention; at evaluation NoPE queries may get the temperature s(p) (attention.py)
Training uses no temperature; evaluation switches `attn_temperature_tuning` on a copy of the
config with floor_scale = the training length, so s(p) grows where the model has never been.

Simplifications: the loss is the cross-entropy of the answer tokens only; fp32; no MoE balancing
loss; tiny models and short toy tasks, so what they do need not be what Scout does at 10M tokens.
KV-cache arithmetic counts keys and values only (no paging, no quantization scales, no padding).

Axes (einops names used in this file): b batch, t query tokens, s key tokens, h query heads,
k kv heads, g query heads per kv head (h = k * g), dh head dim, n pairs or haystack tokens,
q queries per sequence, p tokens per pair, three the 3 tokens of a query (?, key, value), v vocab.
"""

from __future__ import annotations

import dataclasses
import json
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .checks import check_choice, check_finite_loss, check_int, check_real, check_type, is_int
from .config import MAX_ATTN_SCALE, Llama4Config, TextConfig
from .configs import tiny
from .layers import rope_angles, rope_inv_freq
from .model import Llama4Text
from .tokenizer import ByteTokenizer
from .train.loop import TrainConfig, lr_at, param_groups

KIB, MIB, GIB = 2**10, 2**20, 2**30
VARIANTS = ("all_rope", "irope")  # the two layouts the experiment compares


# ------------------------------------------------------------------------------ retrieval tasks
@dataclass
class RetrievalBatch:
    ids: torch.Tensor  # [b, t] model inputs (the last answer is not an input)
    answers: torch.Tensor  # [b, q] token ids of the answers
    answer_pos: torch.Tensor  # [q] positions whose next-token prediction is an answer
    key_pos: torch.Tensor  # [b, q] position of the token that marks what to copy ("#" or the key)
    value_pos: torch.Tensor  # [b, q] position of the token to copy

    def select(self, rows: torch.Tensor) -> "RetrievalBatch":
        """The examples picked by `rows` (a boolean mask [b] or indices)."""
        return RetrievalBatch(self.ids[rows], self.answers[rows], self.answer_pos, self.key_pos[rows],
                              self.value_pos[rows])


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class PasskeyTask:
    filler: str = string.ascii_lowercase + string.digits  # haystack symbols; its digits are distractors
    values: str = string.digits  # what the passkey can be (the answer is one token)
    marker: str = "#"  # the token right before the passkey
    query: str = "?"  # the last input token: the answer comes next
    bos: bool = True  # start with <|begin_of_text|> (an attention sink)
    name: str = "passkey"  # for plots and saved runs

    def haystack_len(self, seq_len: int) -> int:
        """Haystack tokens (marker and passkey included) of a seq_len-token input."""
        n = seq_len - int(self.bos) - 1
        if n < 2:
            raise ValueError(f"seq_len={seq_len}: too short for a marker, a passkey and the query")
        return n

    def batch(self, seq_len: int, batch: int, seed: int | torch.Generator = 0,
              tokenizer: ByteTokenizer | None = None) -> RetrievalBatch:
        """`batch` seeded examples of exactly seq_len input tokens; the marker sits uniformly at
        any haystack position that leaves room for the passkey after it."""
        tok = tokenizer or ByteTokenizer()
        g, n = _generator(seed), self.haystack_len(seq_len)
        filler, values = torch.tensor(tok.encode(self.filler)), torch.tensor(tok.encode(self.values))
        hay = filler[torch.randint(0, len(filler), (batch, n), generator=g)]
        where = torch.randint(0, n - 1, (batch,), generator=g)
        answers = values[torch.randint(0, len(values), (batch,), generator=g)]
        rows = torch.arange(batch)
        hay[rows, where] = tok.encode(self.marker)[0]
        hay[rows, where + 1] = answers
        parts = [hay, torch.full((batch, 1), tok.encode(self.query)[0])]
        if self.bos:
            parts.insert(0, torch.full((batch, 1), tok.bos_id))
        key_pos = (where + int(self.bos))[:, None]
        return RetrievalBatch(torch.cat(parts, 1), answers[:, None], torch.tensor([seq_len - 1]), key_pos, key_pos + 1)


@dataclass(frozen=True)
class KeyValueTask:
    keys: str = string.ascii_lowercase  # one character per key; each queried key occurs once in the pairs
    values: str = string.digits  # one character per value (an answer is one token)
    sep: str = ""  # between a key and its value: "" gives pairs "a3 ", "=" gives "a=3 "
    n_queries: int = 4  # queries "?k" after the pairs, distinct keys, each followed by its answer
    bos: bool = True  # start with <|begin_of_text|>
    name: str = "key_value"  # for plots and saved runs

    @property
    def pair_tokens(self) -> int:
        """Tokens per pair: key, separator, value, space."""
        return 3 + len(self.sep)

    def pairs_for(self, seq_len: int) -> int:
        """Pairs in a seq_len-token input: [bos] + pair_tokens n + 3 q - 1 (last answer not input)."""
        fixed = int(self.bos) + 3 * self.n_queries - 1
        n, rest = divmod(seq_len - fixed, self.pair_tokens)
        if n < self.n_queries or rest:
            raise ValueError(f"seq_len={seq_len}: needs {fixed} + {self.pair_tokens} n tokens with n >= "
                             f"n_queries={self.n_queries} pairs (e.g. {fixed + self.pair_tokens * self.n_queries})")
        return n

    def batch(self, seq_len: int, batch: int, seed: int | torch.Generator = 0,
              tokenizer: ByteTokenizer | None = None) -> RetrievalBatch:
        """`batch` seeded examples of exactly seq_len input tokens (see the module docstring)."""
        q, n = self.n_queries, self.pairs_for(seq_len)
        if q >= len(self.keys):
            raise ValueError(f"n_queries={q} must be below the {len(self.keys)} keys (distractors need one)")
        tok = tokenizer or ByteTokenizer()
        g = _generator(seed)
        key_ids, value_ids = torch.tensor(tok.encode(self.keys)), torch.tensor(tok.encode(self.values))
        n_keys = len(self.keys)
        order = torch.rand(batch, n_keys, generator=g).argsort(-1)
        queried, pool = order[:, :q], order[:, q:]  # asked keys, and the keys left for distractors
        keys = pool.gather(1, torch.randint(0, n_keys - q, (batch, n), generator=g))
        slots = torch.rand(batch, n, generator=g).argsort(-1)[:, :q]  # where the asked pairs sit
        keys = keys.scatter(1, slots, queried)
        values = torch.randint(0, len(self.values), (batch, n), generator=g)
        space, qmark = (tok.encode(c)[0] for c in " ?")
        seps = [torch.full_like(keys, i) for i in tok.encode(self.sep)]
        pairs = torch.stack([key_ids[keys], *seps, value_ids[values], torch.full_like(keys, space)], dim=-1)
        answers = value_ids[values.gather(1, slots)]
        queries = torch.stack([torch.full_like(queried, qmark), key_ids[queried], answers], dim=-1)
        parts = [rearrange(pairs, "b n p -> b (n p)"), rearrange(queries, "b q three -> b (q three)")[:, :-1]]
        if self.bos:
            parts.insert(0, torch.full((batch, 1), tok.bos_id))
        first_query = int(self.bos) + self.pair_tokens * n
        key_pos = int(self.bos) + self.pair_tokens * slots
        return RetrievalBatch(torch.cat(parts, 1), answers, first_query + 3 * torch.arange(q) + 1, key_pos,
                              key_pos + 1 + len(self.sep))


Task = PasskeyTask | KeyValueTask


def crosses_chunk(batch: RetrievalBatch, chunk: int) -> torch.Tensor:
    """[b, q] True where the marker (or key) and the token to copy fall in different chunks: no
    chunked layer sees both, so only a full-attention layer can bind them."""
    return batch.key_pos // chunk != batch.value_pos // chunk


# ------------------------------------------------------------------------------ model variants
def variant_config(variant: str, base: Llama4Config | None = None, chunk: int = 8,
                   floor_scale: int = 32, attn_scale: float = 0.1) -> Llama4Config:
    """The experiment's models, from configs.tiny() by default, temperature tuning off:
    "all_rope": every layer RoPE, full causal attention; "irope": NoPE every 4th layer (from the
    base config's interval), RoPE layers chunked with `chunk`."""
    base = base or tiny()
    common = dict(attn_temperature_tuning=False, floor_scale=floor_scale, attn_scale=attn_scale)
    n = base.text.num_hidden_layers
    if variant == "all_rope":
        return base.replace_text(no_rope_layers=[1] * n, attention_chunk_size=None, **common)
    if variant == "irope":
        return base.replace_text(no_rope_layers=None, attention_chunk_size=chunk, **common)
    raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")


def with_text_config(model: Llama4Text, **changes) -> Llama4Text:
    """The same weights under a copy of the text config with `changes` (e.g. temperature tuning
    switched on, another floor_scale or chunk size): a new model, the original is untouched.
    The layer layout (no_rope_layers, moe_layers) must stay the same, since the weights do."""
    cfg = model.config.replace_text(**changes)
    if cfg.text.no_rope_layers != model.cfg.no_rope_layers or cfg.text.moe_layers != model.cfg.moe_layers:
        raise ValueError("with_text_config changes settings, not the layer layout (the weights depend on it)")
    new = Llama4Text(cfg).to(device=model.device, dtype=model.dtype)
    new.load_state_dict(model.state_dict())
    return new.train(model.training)


# ------------------------------------------------------------------------------ training and evaluation
@dataclass
class ExperimentConfig:
    variants: tuple[str, ...] = VARIANTS  # model layouts to train (see variant_config)
    seeds: tuple[int, ...] = (0, 1, 2)  # one model per variant and seed (init and data seed)
    train_len: int = 32  # input tokens per training sequence
    eval_lens: tuple[int, ...] = (32, 64, 128, 256)  # input lengths evaluated: 1x, 2x, 4x, 8x
    chunk: int = 8  # attention_chunk_size of the iRoPE model's RoPE layers
    floor_scale: int = 32  # temperature floor_scale at evaluation (= train_len)
    attn_scales: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)  # evaluation temperatures; 0 = tuning off
    steps: int = 600  # optimizer steps per model
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate (warmup + cosine, train.lr_at)
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    eval_examples: int = 1000  # held-out examples per evaluation length (seeded, same for all models)
    eval_seed: int = 12345  # seed of the evaluation examples (training seeds are 0, 1, ...)
    curve_every: int = 25  # the stored learning curves average this many steps per point
    threads: int = 1  # torch threads while training (1 is fastest on a busy 2-core machine)

    def __post_init__(self):
        # checked here, so a typo in the last variant or a zero count fails before any model trains
        _each("variants", self.variants, lambda n, v: check_choice(n, v, VARIANTS))
        _each("seeds", self.seeds, lambda n, v: check_int(n, v, 0))
        _each("eval_lens", self.eval_lens, lambda n, v: check_int(n, v, 1))
        _each("attn_scales", self.attn_scales, lambda n, v: check_real(n, v, low=0, high=MAX_ATTN_SCALE))
        for name in ("train_len", "chunk", "floor_scale", "steps", "batch_size", "eval_examples", "curve_every",
                     "threads"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup", self.warmup, 0)
        check_int("eval_seed", self.eval_seed, 0)
        check_real("lr", self.lr, low=0, low_open=True)
        check_real("weight_decay", self.weight_decay, low=0)


def _each(name: str, values, check) -> None:
    """A non-empty list or tuple whose items pass check(f"{name}[{i}]", item)."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name}={values!r}: expected a tuple")
    if not values:
        raise ValueError(f"{name}=(): expected at least one value")
    for i, v in enumerate(values):
        check(f"{name}[{i}]", v)


def _check_task(task, lengths: dict[str, object]) -> None:
    """The task can make sequences of every length ({argument name: length or lengths}): one
    one-example batch each, before anything trains (KeyValueTask accepts only some lengths)."""
    check_type("task", task, (PasskeyTask, KeyValueTask))
    for name, value in lengths.items():
        for n in value if isinstance(value, (list, tuple)) else (value,):
            try:
                task.batch(n, 1, seed=0)
            except ValueError as e:  # the task's message names seq_len; say which setting it came from
                where = "" if name == "seq_len" else f"{name}: "
                raise ValueError(f"{where}{e} ({type(task).__name__})") from e


def answer_loss(model: Llama4Text, batch: RetrievalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the answers, and whether each greedy answer was right [b, q]."""
    logits = model(batch.ids)[:, batch.answer_pos].float()  # [b, q, v]
    loss = F.cross_entropy(rearrange(logits, "b q v -> (b q) v"), rearrange(batch.answers, "b q -> (b q)"))
    return loss, logits.argmax(-1) == batch.answers


def train_retrieval(model: Llama4Text, cfg: ExperimentConfig, seed: int = 0, task: Task = PasskeyTask(),
                    progress: bool = False) -> dict[str, list[float]]:
    """Train in place on fresh batches at cfg.train_len (AdamW, warmup + cosine, clipping at 1);
    returns the per-step loss and accuracy. Stops with FloatingPointError at a NaN/inf loss."""
    check_type("cfg", cfg, ExperimentConfig)
    _check_task(task, {"cfg.train_len": cfg.train_len})
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas)
    g = torch.Generator().manual_seed(seed)
    history = {"loss": [], "accuracy": []}
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        loss, right = answer_loss(model, task.batch(cfg.train_len, cfg.batch_size, g))
        check_finite_loss(loss.item(), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        history["loss"].append(loss.item())
        history["accuracy"].append(right.float().mean().item())
        if progress and (step + 1) % 100 == 0:
            recent = history["accuracy"][-100:]
            print(f"  step {step + 1}: loss {loss.item():.3f}, accuracy (last 100) {sum(recent) / len(recent):.2f}",
                  flush=True)
    model.eval()
    return history


@torch.no_grad()
def retrieval_accuracy(model: Llama4Text, seq_len: int, n_examples: int = 1000, seed: int = 12345,
                       task: Task = PasskeyTask(), batch_size: int = 250) -> float:
    """Fraction of the answers of n seeded examples of `seq_len` input tokens that are right (greedy)."""
    check_int("n_examples", n_examples, 1)  # 0 examples has no accuracy (it divided by zero)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    _check_task(task, {"seq_len": seq_len})
    g = torch.Generator().manual_seed(seed)
    right, total = 0, 0
    was_training = model.training
    model.eval()
    for start in range(0, n_examples, batch_size):
        hits = answer_loss(model, task.batch(seq_len, min(batch_size, n_examples - start), g))[1]
        right, total = right + int(hits.sum()), total + hits.numel()
    model.train(was_training)
    return right / total


def evaluate_lengths(model: Llama4Text, cfg: ExperimentConfig, task: Task = PasskeyTask()) -> dict:
    """{attn_scale: {seq_len: accuracy}} for every evaluation length; attn_scale 0 = tuning off.
    Keys are strings (JSON). Models without NoPE layers are evaluated once: the temperature only
    touches NoPE queries, so every attn_scale gives the same answers."""
    has_nope = not all(model.cfg.no_rope_layers)
    out = {}
    for scale in cfg.attn_scales:
        if scale and not has_nope:
            continue
        m = with_text_config(model, attn_temperature_tuning=bool(scale), floor_scale=cfg.floor_scale,
                             attn_scale=float(scale))
        out[f"{scale:g}"] = {str(n): retrieval_accuracy(m, n, cfg.eval_examples, cfg.eval_seed, task)
                             for n in cfg.eval_lens}
    return out


def train_variant(variant: str, seed: int, cfg: ExperimentConfig, task: Task = PasskeyTask(),
                  progress: bool = False) -> tuple[Llama4Text, dict]:
    """One trained model (init seed = data seed = `seed`) and its training history."""
    mcfg = variant_config(variant, chunk=cfg.chunk, floor_scale=cfg.floor_scale)
    model = Llama4Text.random(mcfg, seed=seed)
    return model, train_retrieval(model, cfg, seed, task, progress)


def _downsample(xs: list[float], every: int) -> list[float]:
    """Means over consecutive windows of `every` steps (a compact learning curve for the JSON)."""
    return [round(sum(xs[i:i + every]) / len(xs[i:i + every]), 4) for i in range(0, len(xs), every)]


def run_experiment(cfg: ExperimentConfig = ExperimentConfig(), task: Task = PasskeyTask(),
                   checkpoint_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train every (variant, seed) and evaluate each at every length and attn_scale. Returns a
    JSON-able dict: the config, the task, and per variant and seed the accuracies, learning
    curves (means over cfg.curve_every steps) and seconds. checkpoint_dir: also save each
    variant's first-seed model there (save_pretrained into checkpoint_dir/<variant>)."""
    # everything is checked before the first model trains (ExperimentConfig checks its own fields)
    check_type("cfg", cfg, ExperimentConfig)
    _check_task(task, {"train_len": cfg.train_len, "eval_lens": cfg.eval_lens})
    for variant in cfg.variants:
        variant_config(variant, chunk=cfg.chunk, floor_scale=cfg.floor_scale)
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is a file, not a folder")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    results = {"config": dataclasses.asdict(cfg), "task": dataclasses.asdict(task),
               "curve_every": cfg.curve_every, "runs": {}}
    try:
        for variant in cfg.variants:
            for seed in cfg.seeds:
                start = time.perf_counter()
                if progress:
                    print(f"{variant}, seed {seed}:", flush=True)
                model, hist = train_variant(variant, seed, cfg, task, progress)
                run = {"accuracy": evaluate_lengths(model, cfg, task),
                       "train_loss": _downsample(hist["loss"], cfg.curve_every),
                       "train_accuracy": _downsample(hist["accuracy"], cfg.curve_every),
                       "seconds": round(time.perf_counter() - start, 1)}
                results["runs"].setdefault(variant, {})[str(seed)] = run
                if checkpoint_dir is not None and seed == cfg.seeds[0]:
                    model.save_pretrained(Path(checkpoint_dir) / variant)
                if progress:
                    print(f"  {run['accuracy']}  ({run['seconds']} s)", flush=True)
    finally:
        torch.set_num_threads(threads)
    return results


def config_dict(cfg: ExperimentConfig) -> dict:
    """cfg as it reads back from the results JSON (tuples become lists), to check a cache's settings."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_results(results: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def accuracy_table(results: dict) -> list[dict]:
    """One row per (variant, attn_scale, seq_len): mean accuracy over seeds and the per-seed list."""
    rows = []
    for variant, runs in results["runs"].items():
        scales = next(iter(runs.values()))["accuracy"]
        for scale, by_len in scales.items():
            for n in by_len:
                accs = [runs[s]["accuracy"][scale][n] for s in runs]
                rows.append({"variant": variant, "attn_scale": float(scale), "seq_len": int(n),
                             "mean": sum(accs) / len(accs), "seeds": accs})
    return rows


# ------------------------------------------------------------------------------ attention read-outs
def _layer(model: Llama4Text, layer) -> int:
    """A layer index of the model (negative counts from the end), checked by name."""
    check_type("model", model, Llama4Text, "the text model: Llama4Text (or a Llama4's .language_model)")
    n = len(model.model.layers)
    if not is_int(layer):
        raise TypeError(f"layer={layer!r}: must be an integer")
    if not -n <= layer < n:
        raise ValueError(f"layer={layer}: the model has {n} layers, 0 to {n - 1}")
    return layer % n


class _Reached(Exception):
    """Stops a forward pass once the wanted layer input is seen (layer_input)."""


@torch.no_grad()
def layer_input(model: Llama4Text, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The input [b, t, d] of layer `layer`'s attention (after its RMSNorm), from a forward pass
    that stops there. It depends only on the layers below, so attention settings of this layer
    (like the NoPE temperature) can be changed without recomputing it."""
    layer, seen = _layer(model, layer), {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _Reached

    hook = model.model.layers[layer].self_attn.register_forward_pre_hook(grab)
    try:
        model(ids)
    except _Reached:
        pass
    finally:
        hook.remove()
    return seen["x"]


@torch.no_grad()
def attention_probs(model: Llama4Text, ids: torch.Tensor, layer: int, queries: torch.Tensor | None = None,
                    x: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights [b, h, t, s] of one layer, recomputed from the layer's own input and
    projections with the same steps as attention.Attention (RoPE, QK norm, temperature, mask):
    softmax(q k^T / sqrt(dh) + mask)      (Vaswani et al. 2017, eq. 1)
    queries: only these query positions (t = len(queries)), to keep long sequences small.
    x: the layer's input if already known (`layer_input`), which saves the forward pass."""
    layer = _layer(model, layer)
    attn = model.model.layers[layer].self_attn
    x = layer_input(model, ids, layer) if x is None else x
    cfg = model.cfg
    positions = torch.arange(x.shape[1], device=x.device)
    rows = positions if queries is None else torch.as_tensor(queries, device=x.device)
    inv_freq = rope_inv_freq(cfg, x.device)
    q = attn.queries(x[:, rows], rows, rope_angles(rows, inv_freq))  # the layer's own steps
    k = attn.keys(x, rope_angles(positions, inv_freq))
    return attn.weights(q, k, rows, positions)


@torch.no_grad()
def needle_attention(model: Llama4Text, batch: RetrievalBatch, layer: int,
                     x: torch.Tensor | None = None) -> torch.Tensor:
    """[b, h, q] attention weight each answer position puts on the token it must copy, per head
    (x: the layer's input, see attention_probs)."""
    probs = attention_probs(model, batch.ids, layer, batch.answer_pos, x)  # [b, h, q, s]
    index = repeat(batch.value_pos, "b q -> b h q 1", h=probs.shape[1])
    return probs.gather(3, index)[..., 0]


@torch.no_grad()
def needle_attention_by_length(model: Llama4Text, batches: dict[int, RetrievalBatch], layer: int,
                               inputs: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """{seq_len: [h]} mean attention on the token to copy, over examples and queries, per head.
    inputs: {seq_len: layer input} from `layer_input`, to reuse them across attention settings."""
    inputs = inputs or {}
    return {n: needle_attention(model, b, layer, inputs.get(n)).mean(dim=(0, 2)) for n, b in batches.items()}


# ------------------------------------------------------------------------------ KV-cache memory
@dataclass
class KVMemory:
    """Bytes of the KV cache of one sequence of `context` tokens, by layer kind."""

    context: int  # tokens in the context
    nope_bytes: int  # NoPE (and unchunked RoPE) layers: every position is kept
    rope_bytes: int  # chunked RoPE layers: every position, or min(context, chunk) with a ring buffer
    ring_buffer: bool  # whether chunked layers keep one chunk only

    @property
    def total(self) -> int:
        return self.nope_bytes + self.rope_bytes

    @property
    def per_token(self) -> float:
        return self.total / self.context


def kv_bytes_per_token_per_layer(cfg: TextConfig | Llama4Config, bytes_per_value: float = 2) -> float:
    """One layer's cache for one token: keys and values, k kv heads of dh numbers each:
    2 * k * dh * bytes_per_value (Scout in bf16: 2 * 8 * 128 * 2 = 4,096 bytes)."""
    check_type("cfg", cfg, (TextConfig, Llama4Config))
    check_real("bytes_per_value", bytes_per_value, low=0, low_open=True)
    t = cfg.text if isinstance(cfg, Llama4Config) else cfg
    return 2 * t.num_key_value_heads * t.head_dim * bytes_per_value


def kv_cache_memory(cfg: TextConfig | Llama4Config, context: int, ring_buffer: bool = True,
                    bytes_per_value: float = 2, batch: int = 1) -> KVMemory:
    """KV cache of `batch` sequences of `context` tokens:
    full cache:   layers * context * 2 * k * dh * bytes
    ring buffer:  (full-attention layers * context + chunked layers * min(context, chunk)) * 2 * k * dh * bytes
    A chunked layer at position p reads only keys p - p % chunk .. p, at most `chunk` positions, so
    a ring buffer of one chunk per chunked layer loses nothing. The totals equal
    `plan.kv_cache_bytes` and, for a real cache, `model.new_cache(b, n, ring=...).nbytes()`."""
    check_int("context", context, 1)  # 0 divided by zero in per_token, a negative gave negative bytes
    check_int("batch", batch, 1)
    t = cfg.text if isinstance(cfg, Llama4Config) else cfg
    per = kv_bytes_per_token_per_layer(t, bytes_per_value) * batch
    chunked = sum(t.is_chunked(i) for i in range(t.num_hidden_layers))
    full = t.num_hidden_layers - chunked
    kept = min(context, t.attention_chunk_size) if ring_buffer and chunked else context
    return KVMemory(context, round(full * context * per), round(chunked * kept * per), ring_buffer)


def kv_cache_table(cfg: TextConfig | Llama4Config, contexts=(131072, 1048576, 10485760),
                   bytes_per_value: float = 2) -> list[dict]:
    """Per context: full-cache and ring-buffer bytes, and the ratio full / ring."""
    rows = []
    for n in contexts:
        full, ring = (kv_cache_memory(cfg, n, ring_buffer, bytes_per_value).total for ring_buffer in (False, True))
        rows.append({"context": n, "full_bytes": full, "ring_bytes": ring, "saving": full / ring})
    return rows


def format_bytes(n: float) -> str:
    """4096 -> '4 KiB', 25769803776 -> '24 GiB' (binary units, up to 3 significant decimals)."""
    for size, unit in ((2**40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if abs(n) >= size:
            return f"{n / size:,.3f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n:g} B"
