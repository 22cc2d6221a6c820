"""Load-balancing sweeps: train the same model under several balancing settings and keep a small,
JSON-ready record of every run, for notebook 03 (which loads a cached sweep instead of training).

    from minillama4.train.sweeps import BalancingRun, SweepSetup, run_balancing, run_sweep, load_sweep
    record = run_balancing(BalancingRun(bias_update_rate=0.01))   # one 300-step run -> dict
    sweep = run_sweep(path="notebooks/data/03_load_balancing/sweep.json")   # all default_runs()
    sweep = load_sweep("notebooks/data/03_load_balancing/sweep.json")     # {"setup", "meta", "runs"}
    dropped_fractions(record_loads(sweep["runs"]["none"], "tail_load"), (1.0, 1.25, 2.0))

A record keeps, per run: the training loss and the measured Switch / z losses as means over
windows of `every` steps; the busiest expert's load over the mean load (max/mean) per MoE layer,
per step, averaged over the same windows; the token copies per expert and layer summed over windows
of `load_every` steps; the exact per-step loads of the last `tail` steps (for capacity and
dropping, which act on one batch at a time); the final selection bias of a bias-balanced run; the
final validation loss. Everything a figure shows is computed again from these numbers.

Simplifications: one seed per setting (the model init, batch order and corpus are identical across
runs, so the balancing method is the only difference); fp32 on the CPU; window means smooth the
per-step noise of the curves. Results depend slightly on the thread count (float summation order).

Axes: s steps (or windows of steps), L MoE layers, e experts, f capacity factors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import reduce

from .. import configs
from ..balance import dropped_fraction, imbalance
from ..checks import check_choice, check_int, check_real, check_type
from ..data import TokenCorpus, load_corpus, random_batches
from ..model import Llama4Text
from .loop import History, TrainConfig, train

__all__ = ["BalancingRun", "SweepSetup", "default_runs", "corpus_fingerprint", "run_balancing", "compact_history", "run_sweep",
           "save_sweep", "load_sweep", "record_loads", "dropped_fractions", "mean_imbalance", "run_method",
           "sweep_index", "METHOD_KEYS", "CAPACITY_FACTORS"]

METHOD_KEYS = ("switch_aux", "z_loss", "bias_update_rate")  # the TrainConfig fields a run may set
CAPACITY_FACTORS = (1.0, 1.25, 2.0)  # capacity factors the notebook reports


@dataclass(frozen=True)
class BalancingRun:
    """One balancing setting: the TrainConfig coefficients that differ from no balancing."""

    switch_aux: float = 0.0  # Switch load-balancing loss coefficient alpha (Switch used 1e-2)
    z_loss: float = 0.0  # router z-loss coefficient c_z (ST-MoE used 1e-3)
    bias_update_rate: float = 0.0  # DeepSeek-V3 bias step gamma (DeepSeek-V3 used 1e-3)

    def __post_init__(self):  # refused here, before a sweep trains or saves anything
        for name in METHOD_KEYS:
            check_real(name, getattr(self, name), low=0)

    @property
    def name(self) -> str:
        """A stable key: "none", "switch_aux=0.01", "switch_aux=0.01+z_loss=0.001", ..."""
        parts = [f"{k}={getattr(self, k):g}" for k in METHOD_KEYS if getattr(self, k)]
        return "+".join(parts) or "none"

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in METHOD_KEYS}


# the presets a sweep can train on a CPU (a sweep trains the text model: tiny_multimodal's is tiny's);
# scout, maverick and behemoth have billions of weights
TRAINABLE_PRESETS = ("tiny", "small", "tiny_multimodal")


@dataclass(frozen=True)
class SweepSetup:
    """What every run of a sweep shares: model, corpus, schedule and what the record keeps."""

    preset: str = "small"  # minillama4.configs preset of the model (small: 16 experts, top-1)
    model_seed: int = 0  # Llama4Text.random seed: the same initial weights for every run
    corpus_seed: int = 0  # load_corpus seed (prose, code and math mixed)
    chars_per_domain: int = 200_000  # load_corpus size per domain
    steps: int = 300  # length of the learning-rate schedule (TrainConfig.steps)
    batch_size: int = 16  # TrainConfig.batch_size
    seq_len: int = 128  # TrainConfig.seq_len
    data_seed: int = 0  # TrainConfig.seed: the batch order, identical for every run
    every: int = 5  # steps per window of the loss and max/mean series
    load_every: int = 10  # steps per window of the summed loads
    tail: int = 20  # last steps whose loads are kept exactly
    eval_batches: int = 8  # validation batches for the final validation loss (0 = none)

    def __post_init__(self):
        check_choice("preset", self.preset, TRAINABLE_PRESETS)  # scout & co. have billions of parameters
        for name in ("chars_per_domain", "steps", "batch_size", "seq_len", "every", "load_every", "tail"):
            check_int(name, getattr(self, name), 1)  # tail=0 kept every step (loads[-0:])
        for name in ("model_seed", "corpus_seed", "data_seed", "eval_batches"):
            check_int(name, getattr(self, name), 0)

    def train_config(self, run: BalancingRun) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                           seed=self.data_seed, eval_batches=max(self.eval_batches, 1), progress=False,
                           log_every=0, **run.overrides())


def default_runs() -> list[BalancingRun]:
    """The notebook's sweep: the four methods (none, Switch, z-loss, bias), Switch + z-loss together
    as in ST-MoE, and each coefficient one decade below and above its default."""
    return [BalancingRun(), BalancingRun(switch_aux=1e-2), BalancingRun(z_loss=1e-3),
            BalancingRun(switch_aux=1e-2, z_loss=1e-3), BalancingRun(bias_update_rate=1e-2),
            BalancingRun(switch_aux=1e-3), BalancingRun(switch_aux=1e-1),
            BalancingRun(z_loss=1e-4), BalancingRun(z_loss=1e-2),
            BalancingRun(bias_update_rate=1e-3), BalancingRun(bias_update_rate=1e-1)]


def _window_mean(x: torch.Tensor, every: int) -> torch.Tensor:
    """x [s, ...] -> [ceil(s / every), ...] means over consecutive windows (the last may be short)."""
    return torch.stack([chunk.mean(0) for chunk in torch.split(x, every)])


def _window_sum(x: torch.Tensor, every: int) -> torch.Tensor:
    return torch.stack([chunk.sum(0) for chunk in torch.split(x, every)])


def _window_steps(n: int, every: int) -> list[int]:
    """The last step of each window of `every` steps over steps 0..n-1."""
    return [min(start + every, n) - 1 for start in range(0, n, every)]


def _rounded(x: torch.Tensor, digits: int = 4) -> list:
    return torch.round(x.double(), decimals=digits).tolist()


def compact_history(history: History, setup: SweepSetup | None = None) -> dict:
    """A History -> the JSON-ready record described in the module docstring (no run settings)."""
    check_type("history", history, History, "the result of train(...)")
    if setup is not None:
        check_type("setup", setup, SweepSetup)
    if not history.step or not history.moe_layers:
        raise ValueError(f"history has {len(history.step)} steps and {len(history.moe_layers)} MoE layers: "
                         "a record needs at least one step of a model with MoE layers")
    setup = setup or SweepSetup()
    n = len(history.step)
    loads = history.loads()  # [s, L, e]
    record = {
        "moe_layers": list(history.moe_layers),
        "n_experts": int(loads.shape[-1]),
        "tokens_per_step": int(loads[0, 0].sum()),
        "steps_run": n,
        "step": _window_steps(n, setup.every),
        "loss": _rounded(_window_mean(torch.tensor(history.loss), setup.every)),
        "switch_aux_loss": _rounded(_window_mean(torch.tensor(history.switch_aux), setup.every)),
        "z_loss_value": _rounded(_window_mean(torch.tensor(history.z_loss), setup.every)),
        "max_over_mean": _rounded(_window_mean(history.max_over_mean(), setup.every), 3),  # [s, L]
        "load_step": _window_steps(n, setup.load_every),
        "load": _window_sum(loads, setup.load_every).long().tolist(),  # [s, L, e]
        "tail_load": loads[-setup.tail:].long().tolist(),  # [tail, L, e]
        "final_bias": _rounded(history.bias[-1]) if history.bias else None,  # [L, e]
        "val_loss": round(history.val_loss[-1], 4) if history.val_loss else None,
        "seconds": round(history.seconds, 1),
    }
    return record


def run_balancing(run: BalancingRun, setup: SweepSetup | None = None, corpus=None,
                  max_steps: int | None = None, history: bool = False):
    """Train a fresh `setup.preset` model with `run`'s balancing and return its record (a dict;
    with history=True, (record, History)). corpus: (train, val) from load_corpus, loaded here if
    None. max_steps: stop after that many steps but keep the `setup.steps` learning-rate schedule
    and batch order, so a short run repeats the first steps of the full one exactly (up to float
    summation order)."""
    check_type("run", run, BalancingRun, "e.g. BalancingRun(switch_aux=1e-2)")
    setup = setup or SweepSetup()
    check_type("setup", setup, SweepSetup)
    if max_steps is not None:
        check_int("max_steps", max_steps, 1)  # 0 used to run all setup.steps (`0 or steps`)
    if corpus is not None:
        _check_corpus(corpus)
    train_data, val_data = corpus or load_corpus(setup.corpus_seed, setup.chars_per_domain)
    cfg = setup.train_config(run)
    model = Llama4Text.random(configs.get(setup.preset), seed=setup.model_seed)
    # the same windows train() would draw for this TrainConfig, cut after max_steps
    batches = random_batches(train_data.ids, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))
    batches = itertools.islice(batches, min(max_steps or cfg.steps, cfg.steps))
    hist = train(model, batches, cfg, val_data=val_data if setup.eval_batches else None)
    record = {"name": run.name, **run.overrides(), **compact_history(hist, setup), "threads": torch.get_num_threads()}
    return (record, hist) if history else record


def _check_corpus(corpus) -> None:
    if not (isinstance(corpus, (tuple, list)) and len(corpus) == 2 and all(isinstance(c, TokenCorpus) for c in corpus)):
        raise TypeError(f"corpus must be a (train, val) pair of TokenCorpus, as load_corpus returns; got "
                        f"{type(corpus).__name__}")


def corpus_fingerprint(corpus) -> str:
    """(train, val) TokenCorpus pair -> "n_train+n_val:md5 of both id streams", to tell whether a
    cached sweep was trained on the very same tokens. The prose domain depends on the Python
    installation and even on the process: inside a Jupyter kernel ipykernel replaces builtins.input,
    whose docstring then drops out of the prose, so a kernel and a plain script get different
    corpora from the same load_corpus call."""
    train_data, val_data = corpus
    digest = hashlib.md5()
    for part in (train_data, val_data):
        digest.update(part.ids.to(torch.int64).numpy().tobytes())
    return f"{len(train_data)}+{len(val_data)}:{digest.hexdigest()}"


def save_sweep(sweep: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sweep, separators=(",", ":")) + "\n")


def load_sweep(path: str | Path) -> dict:
    """{"setup": SweepSetup fields, "meta": {...}, "runs": {name: record}} as saved by run_sweep."""
    return json.loads(Path(path).read_text())


def run_sweep(runs: list[BalancingRun] | None = None, setup: SweepSetup | None = None,
              path: str | Path | None = None, verbose: bool = True) -> dict:
    """Run every BalancingRun (default_runs()) with the same setup. With `path`, the sweep is saved
    after each run and runs already saved there with the same setup and corpus (corpus_fingerprint)
    are kept, not repeated, so an interrupted sweep resumes. A file at `path` that holds another
    sweep (another setup or corpus) or no sweep at all is refused before any run: it is never
    overwritten. meta records the corpus fingerprint, versions and thread count."""
    setup = setup or SweepSetup()
    check_type("setup", setup, SweepSetup)
    runs = default_runs() if runs is None else list(runs)
    for i, run in enumerate(runs):
        check_type(f"runs[{i}]", run, BalancingRun, "e.g. BalancingRun(switch_aux=1e-2)")
    if path is not None:
        _check_writable(Path(path))  # before the first run, not after it (its minutes would be lost)
    corpus = load_corpus(setup.corpus_seed, setup.chars_per_domain)
    sweep = {"setup": dataclasses.asdict(setup), "meta": {"corpus": corpus_fingerprint(corpus)}, "runs": {}}
    if path is not None and Path(path).exists():
        sweep["runs"] = _saved_runs(path, sweep)
    for run in runs:
        if run.name in sweep["runs"]:
            continue
        record = run_balancing(run, setup, corpus)
        sweep["runs"][run.name] = record
        if verbose:
            mm = record["max_over_mean"][-1]
            print(f"{run.name:<32} loss {record['loss'][-1]:.3f}  max/mean per layer {mm}  {record['seconds']:.0f} s")
        sweep["meta"].update({"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "device": "cpu", "threads": torch.get_num_threads()})
        if path is not None:
            save_sweep(sweep, path)
    return sweep


def _check_writable(path: Path) -> None:
    """save_sweep can write `path`: not a folder, and its nearest existing parent is a writable folder."""
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder: pass a file path such as {str(path / 'sweep.json')!r}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"path={str(path)!r}: cannot be written ({str(parent)!r} is "
                         f"{'not a folder' if not parent.is_dir() else 'not writable'}); pass another path")


def _saved_runs(path, sweep: dict) -> dict:
    """The runs saved at `path` if it holds this very sweep (setup and corpus); anything else is
    refused, so that the first save cannot replace another sweep's runs."""
    how = "pass another path, or delete the file to start this sweep there"
    try:
        saved = load_sweep(path)
        setup, corpus, runs = saved["setup"], saved["meta"]["corpus"], saved["runs"]
        if not isinstance(setup, dict) or not isinstance(runs, dict):
            raise TypeError("its setup and runs are not mappings")
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"path={str(path)!r} exists but holds no saved sweep ({error!r}); {how}") from None
    differs = [f"{k}={setup.get(k)!r} there, {v!r} here" for k, v in sweep["setup"].items() if setup.get(k) != v]
    differs += [f"{k} there, not a SweepSetup field" for k in setup if k not in sweep["setup"]]
    if corpus != sweep["meta"]["corpus"]:
        differs.append(f"corpus {corpus} there, {sweep['meta']['corpus']} here")
    if differs:
        raise ValueError(f"path={str(path)!r} holds another sweep ({len(runs)} run(s) saved; {', '.join(differs)}): "
                         f"it is kept as it is; {how}")
    return runs


# ------------------------------------------------------------------------------ reading records
def record_loads(record: dict, key: str = "load") -> torch.Tensor:
    """A record's "load" ([windows, L, e], summed over load_every steps) or "tail_load" ([tail, L, e],
    one row per step) as a tensor."""
    return torch.tensor(record[key], dtype=torch.long)


def _check_step_loads(loads) -> None:
    """loads [s, L, e] with at least one step, layer and expert (a mean over none has no value)."""
    check_type("loads", loads, torch.Tensor, "[s, L, e] loads, e.g. record_loads(record, \"tail_load\")")
    if loads.dim() != 3 or 0 in loads.shape:
        raise ValueError(f"loads has shape {tuple(loads.shape)}: expected [steps, layers, experts] with "
                         "at least one of each")


def dropped_fractions(loads: torch.Tensor, factors=CAPACITY_FACTORS, top_k: int = 1) -> torch.Tensor:
    """loads [s, L, e] token copies per expert of s single steps -> [f, L]: the fraction of token
    copies that experts with capacity ceil(factor * n * k / e) would drop, mean over the s steps
    (capacity applies to each batch, so each step is dropped separately; balance.dropped_fraction)."""
    _check_step_loads(loads)
    factors = tuple(factors)
    if not factors:
        raise ValueError("factors is empty: expected capacity factors, e.g. (1.0, 1.25, 2.0)")
    out = torch.tensor([[[dropped_fraction(layer, f, top_k) for layer in step] for step in loads] for f in factors])
    return reduce(out, "f s L -> f L", "mean")


def mean_imbalance(loads: torch.Tensor) -> list[dict]:
    """loads [s, L, e] of single steps -> per layer the mean over steps of balance.imbalance
    (max_over_mean, cv, entropy, entropy_frac; tokens is per step)."""
    _check_step_loads(loads)
    per_step = [imbalance(step) for step in loads]  # s lists of L dicts
    return [{key: sum(step[j][key] for step in per_step) / len(per_step) for key in per_step[0][j]}
            for j in range(loads.shape[1])]


def run_method(record: dict) -> tuple[str, float]:
    """(method, coefficient) of a record: ("none", 0.0), ("switch_aux", 0.01), ("z_loss", ...),
    ("bias_update_rate", ...), or ("combined", 0.0) when several coefficients are set."""
    active = [k for k in METHOD_KEYS if record.get(k)]
    if not active:
        return "none", 0.0
    if len(active) > 1:
        return "combined", 0.0
    return active[0], float(record[active[0]])


def sweep_index(sweep: dict) -> dict[str, dict[float, str]]:
    """{method: {coefficient: run name}} over a sweep's runs, coefficients ascending; the
    single-coefficient methods also list "none" under coefficient 0."""
    index: dict[str, dict[float, str]] = {}
    for name, record in sweep["runs"].items():
        method, coef = run_method(record)
        index.setdefault(method, {})[coef] = name
    none = index.get("none", {}).get(0.0)
    for method in METHOD_KEYS:
        if method in index and none is not None:
            index[method][0.0] = none
    return {m: dict(sorted(c.items())) for m, c in index.items()}
