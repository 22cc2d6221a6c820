"""CPU/GPU throughput benchmark: minillama4 against Hugging Face transformers on the same weights.

    python -m minillama4.bench                       # preset small, fp32, about 10 s on 2 cores
    python -m minillama4.bench --preset tiny --json bench.json
    minillama4 bench --dtype bf16 --threads 1        # the same, through the CLI

What is measured, and how:

* Setup. One `Llama4Text.random(cfg, seed)` model; `hf_reference.to_transformers` builds a
  transformers `Llama4ForCausalLM` that holds exactly the same weight tensors. Both run in eval
  mode under `torch.inference_mode()`, in the chosen dtype, on the chosen device and thread count.
  Input ids are random (fixed seed), batch 1 unless `--batch` says otherwise.
* Agreement. Before timing, the logits of one forward (ours with each dispatch, and transformers)
  are compared: the max absolute difference is printed, so the reader knows both sides compute
  the same model. Greedy decoding is also checked to produce the same tokens.
* Forward (prefill) throughput: tokens/s = batch * T / (median time of one forward over T tokens,
  no cache), for ours with the "fast" MoE dispatch, ours with the "reference" dispatch (a Python
  loop over experts) and transformers (which runs every expert on every token, with zero gates
  for the experts not chosen: a dense MoE). The candidates are timed in interleaved rounds
  (A, B, C, A, B, C, ...) after warmup rounds, so a slow patch of the machine hits all of them.
* Decode throughput: greedy `generate` of N new tokens from a short prompt with a KV cache
  (ours: `model.generate`, with each MoE dispatch; transformers:
  `hf.generate(..., min_new_tokens=N, do_sample=False)`), timed in interleaved rounds.
  Both do one prefill that yields the first new token, then N - 1 one-token forwards. We time
  the whole generate call and, separately, a prefill of the prompt into a fresh cache, and report
    decode tokens/s     = (N - 1) / (median generate time - median prefill time)
    end-to-end tokens/s = N / median generate time   (prefill included)
  The decode figure is the per-token cost of the cached loop, including each library's own
  per-step overhead (Python, cache bookkeeping, logits processing).
* Router trace overhead: forward tokens/s of ours (fast) with no `RouterTrace` active, measured
  twice (runs A and B: their difference is the noise level of this machine), against the same
  forward while a RouterTrace is active (a fresh one per call, entered and left outside the timed
  region: what is timed is the recording). The one-off cost of creating, entering and leaving a
  RouterTrace is timed separately. With no trace active the model pays one `is None` check per
  MoE layer.

Every figure is a median over repeats; timings use `time.perf_counter` (with
`torch.cuda.synchronize()` on CUDA). Ratios are ours / transformers in tokens/s: above 1 means
ours is faster. `--json PATH` writes every number, the raw times and the machine description.

transformers is imported only inside the functions that need it: `import minillama4.bench`
does not import it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch

from . import configs
from .model import Llama4Text
from .params import count_params
from .trace import RouterTrace

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- machine and models
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU, cores, torch threads, library versions, GPU name (on CUDA) and the current date."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed: the bench will fail later, with a clear error
        return "not installed"


@contextmanager
def _quiet_transformers():
    """transformers warns about config fields we set on purpose (e.g. Scout's equal rope factors)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_models(preset: str = "small", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """(ours, transformers) with the same random weights, both in eval mode."""
    from .hf_reference import to_transformers

    cfg = configs.get(preset)
    ours = Llama4Text.random(cfg, seed=seed, dtype=dtype, device=device).eval()
    with _quiet_transformers():
        hf = to_transformers(ours, copy=False)  # the same weight tensors (docs/benchmarks.md)
    return ours, hf


def model_info(model: Llama4Text) -> dict:
    """Shape of the benchmarked model and the weights a token touches in each implementation."""
    t = model.cfg
    pc = count_params(model.config)
    routed_total, routed_active = pc.components["text.routed_experts"]
    return {
        "preset": model.config.name,
        "layers": t.num_hidden_layers,
        "hidden_size": t.hidden_size,
        "experts": t.num_local_experts,
        "top_k": t.num_experts_per_tok,
        "moe_layers": len(t.moe_layers),
        "vocab_size": t.vocab_size,
        "params_total": pc.total,
        "params_active": pc.active,
        # transformers multiplies every token by every routed expert (zero gate if not chosen)
        "params_touched_per_token_transformers": pc.active - routed_active + routed_total,
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def random_ids(vocab_size: int, batch: int, tokens: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, tokens), generator=g).to(device)


# --------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device="cpu",
                     setup: dict[str, Callable[[], object]] | None = None,
                     teardown: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per call for each fn, timed in interleaved rounds after `warmup` untimed rounds.
    setup[name] / teardown[name] (optional) run before / after each call of fns[name], untimed."""
    setup, teardown = setup or {}, teardown or {}
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            if name in teardown:
                teardown[name]()
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio_phrase(ours: float, theirs: float, what: str = "ours", other: str = "transformers") -> str:
    """'ours is 3.2x faster than transformers' from two throughputs (higher = faster)."""
    if not ours > 0 or not theirs > 0:
        return f"{what} vs {other}: not measurable"
    r = ours / theirs
    x = max(r, 1 / r)
    digits = 2 if x < 1.1 else 1  # "1.04x", not "1.0x faster"
    return f"{what} is {x:.{digits}f}x {'faster' if r >= 1 else 'slower'} than {other}"


# --------------------------------------------------------------------------- the measurements
@torch.inference_mode()
def check_agreement(ours: Llama4Text, hf, tokens: int = 64, batch: int = 1, new_tokens: int = 8,
                    prompt_tokens: int = 8, seed: int = 0) -> dict:
    """Max |logits difference| between ours (both dispatches) and transformers on one forward,
    and whether greedy decoding produces the same tokens."""
    ids = random_ids(ours.cfg.vocab_size, batch, tokens, seed, ours.device)
    previous = _dispatch_of(ours)
    try:
        ref_logits = hf(ids).logits.float()
        diffs = {}
        for mode in ("fast", "reference"):
            ours.set_dispatch(mode)
            diffs[mode] = float((ours(ids).float() - ref_logits).abs().max())
    finally:
        ours.set_dispatch(previous)
    prompt = ids[:, :prompt_tokens]
    a = ours.generate(prompt, new_tokens)
    b = _hf_generate(hf, prompt, new_tokens)
    return {"tokens": tokens, "max_abs_diff_fast": diffs["fast"], "max_abs_diff_reference": diffs["reference"],
            "logits_scale": float(ref_logits.abs().max()), "greedy_new_tokens": new_tokens,
            "greedy_same_tokens": bool(torch.equal(a.cpu(), b.cpu()))}


def _dispatch_of(model: Llama4Text) -> str:
    from .moe import MoE

    modes = {m.dispatch for m in model.modules() if isinstance(m, MoE)}
    return modes.pop() if len(modes) == 1 else "fast"


def _hf_generate(hf, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)


@torch.inference_mode()
def bench_forward(ours: Llama4Text, hf, tokens: int = 256, batch: int = 1, warmup: int = 5,
                  repeats: int = 30, seed: int = 0) -> dict:
    """Prefill throughput (no cache): ours fast, ours reference, transformers."""
    ids = random_ids(ours.cfg.vocab_size, batch, tokens, seed, ours.device)
    previous = _dispatch_of(ours)
    fns = {"ours_fast": lambda: ours(ids), "ours_reference": lambda: ours(ids),
           "transformers": lambda: hf(ids, use_cache=False)}
    setup = {"ours_fast": lambda: ours.set_dispatch("fast"),
             "ours_reference": lambda: ours.set_dispatch("reference")}
    try:
        times = time_interleaved(fns, warmup, repeats, ours.device, setup)
    finally:
        ours.set_dispatch(previous)
    n = batch * tokens
    out = {"batch": batch, "tokens": tokens, "warmup": warmup, "repeats": repeats, "results": {}}
    for name, ts in times.items():
        med = _median(ts)
        out["results"][name] = {"median_s": med, "min_s": min(ts), "tokens_per_s": n / med, "times_s": ts}
    tf = out["results"]["transformers"]["tokens_per_s"]
    for name in ("ours_fast", "ours_reference"):
        out["results"][name]["speedup_vs_transformers"] = out["results"][name]["tokens_per_s"] / tf
    return out


@torch.inference_mode()
def bench_decode(ours: Llama4Text, hf, new_tokens: int = 64, prompt_tokens: int = 16, batch: int = 1,
                 warmup: int = 1, repeats: int = 10, seed: int = 1) -> dict:
    """Greedy generation with a KV cache: decode-phase and end-to-end tokens/s (see module doc),
    for ours with each MoE dispatch and for transformers."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 1")
    prompt = random_ids(ours.cfg.vocab_size, batch, prompt_tokens, seed, ours.device)
    previous = _dispatch_of(ours)
    fns, setup = {}, {}
    for who, mode in (("ours_fast", "fast"), ("ours_reference", "reference")):
        fns[f"{who}_generate"] = lambda: ours.generate(prompt, new_tokens)
        fns[f"{who}_prefill"] = lambda: ours(prompt, cache=ours.new_cache(batch, prompt_tokens + new_tokens))
        setup[f"{who}_generate"] = setup[f"{who}_prefill"] = lambda mode=mode: ours.set_dispatch(mode)
    fns["transformers_generate"] = lambda: _hf_generate(hf, prompt, new_tokens)
    fns["transformers_prefill"] = lambda: hf(prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    try:
        with _quiet_transformers():
            times = time_interleaved(fns, warmup, repeats, ours.device, setup)
    finally:
        ours.set_dispatch(previous)
    out = {"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "warmup": warmup,
           "repeats": repeats, "results": {}}
    for who in ("ours_fast", "ours_reference", "transformers"):
        gen, pre = _median(times[f"{who}_generate"]), _median(times[f"{who}_prefill"])
        decode_s = gen - pre
        steps = new_tokens - 1  # one-token forwards after the prefill
        out["results"][who] = {
            "generate_median_s": gen,
            "prefill_median_s": pre,
            "decode_s": decode_s,
            "decode_tokens_per_s": batch * steps / decode_s if steps > 0 and decode_s > 0 else float("nan"),
            "ms_per_decode_step": 1e3 * decode_s / steps if steps > 0 else float("nan"),
            "end_to_end_tokens_per_s": batch * new_tokens / gen,
            "generate_times_s": times[f"{who}_generate"],
            "prefill_times_s": times[f"{who}_prefill"],
        }
    t = out["results"]["transformers"]
    for who in ("ours_fast", "ours_reference"):
        o = out["results"][who]
        o["decode_speedup_vs_transformers"] = o["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        o["end_to_end_speedup_vs_transformers"] = o["end_to_end_tokens_per_s"] / t["end_to_end_tokens_per_s"]
    return out


@torch.inference_mode()
def bench_trace(ours: Llama4Text, tokens: int = 256, batch: int = 1, warmup: int = 5, repeats: int = 30,
                seed: int = 2) -> dict:
    """Forward tokens/s with no RouterTrace (twice: A and B, the noise level) and inside an active
    one (a fresh trace per call, entered and left outside the timed region), plus the median
    cost of creating, entering and leaving a RouterTrace, timed on its own."""
    ids = random_ids(ours.cfg.vocab_size, batch, tokens, seed, ours.device)
    active: list[RouterTrace] = []

    def enter():
        active.append(RouterTrace(ours).__enter__())

    def leave():
        active.pop().__exit__(None, None, None)

    previous = _dispatch_of(ours)
    ours.set_dispatch("fast")
    fns = {"no_trace_a": lambda: ours(ids), "no_trace_b": lambda: ours(ids), "trace_on": lambda: ours(ids)}
    try:
        times = time_interleaved(fns, warmup, repeats, ours.device, {"trace_on": enter}, {"trace_on": leave})
    finally:
        while active:
            leave()
        ours.set_dispatch(previous)

    def enter_exit():
        with RouterTrace(ours):
            pass

    enter_exit_s = _median(time_interleaved({"enter_exit": enter_exit}, 5, 50)["enter_exit"])
    n = batch * tokens
    out = {"batch": batch, "tokens": tokens, "warmup": warmup, "repeats": repeats, "results": {},
           "enter_exit_s": enter_exit_s}
    for name, ts in times.items():
        med = _median(ts)
        out["results"][name] = {"median_s": med, "min_s": min(ts), "tokens_per_s": n / med, "times_s": ts}
    a = out["results"]["no_trace_a"]["median_s"]
    out["noise_pct"] = 100 * (out["results"]["no_trace_b"]["median_s"] / a - 1)
    out["trace_overhead_pct"] = 100 * (out["results"]["trace_on"]["median_s"] / a - 1)
    return out


def run_all(preset: str = "small", dtype: str = "fp32", device: str = "cpu", tokens: int = 256,
            new_tokens: int = 64, prompt_tokens: int = 16, batch: int = 1, warmup: int = 5,
            repeats: int = 30, decode_repeats: int = 10, threads: int | None = None, seed: int = 0,
            trace: bool = True) -> dict:
    """Every measurement; the dict that `--json` writes."""
    if threads is not None:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    ours, hf = build_models(preset, DTYPES[dtype], device, seed)
    result = {"machine": machine_info(device), "model": model_info(ours),
              "settings": {"preset": preset, "dtype": dtype, "device": device, "tokens": tokens,
                           "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "batch": batch,
                           "warmup": warmup, "repeats": repeats, "decode_repeats": decode_repeats,
                           "threads": torch.get_num_threads(), "seed": seed}}
    result["agreement"] = check_agreement(ours, hf, tokens=min(tokens, 64), batch=batch,
                                          new_tokens=min(new_tokens, 8), prompt_tokens=prompt_tokens, seed=seed)
    result["forward"] = bench_forward(ours, hf, tokens, batch, warmup, repeats, seed)
    result["decode"] = bench_decode(ours, hf, new_tokens, prompt_tokens, batch,
                                    warmup=max(1, min(warmup, 2)), repeats=decode_repeats, seed=seed + 1)
    if trace:
        result["trace"] = bench_trace(ours, tokens, batch, warmup, repeats, seed + 2)
    return result


# --------------------------------------------------------------------------- report
def format_report(r: dict) -> str:
    m, mi, s = r["machine"], r["model"], r["settings"]
    lines = [
        f"minillama4 bench: preset={s['preset']} dtype={s['dtype']} device={s['device']} threads={s['threads']}",
        f"machine: {m['cpu']} | {m['cores']} cores | torch {m['torch']} | transformers {m['transformers']} "
        f"| python {m['python']} | {m['date']}" + (f" | GPU {m['gpu']}" if "gpu" in m else "")
        + (f" | load avg {m['load_average_1min']:.2f} at start" if m.get("load_average_1min") is not None else ""),
        f"model: {mi['layers']} layers, d={mi['hidden_size']}, {mi['experts']} experts top-{mi['top_k']} "
        f"in {mi['moe_layers']} MoE layers, vocab {mi['vocab_size']}; {mi['params_total']:,} params, "
        f"{mi['params_active']:,} active per token (transformers' dense MoE touches "
        f"{mi['params_touched_per_token_transformers']:,})",
    ]
    a = r["agreement"]
    lines += ["", f"same model? max |logits ours - transformers| over {a['tokens']} tokens: "
                  f"{a['max_abs_diff_fast']:.3g} (fast dispatch), {a['max_abs_diff_reference']:.3g} (reference)"
                  f" [logits up to {a['logits_scale']:.3g}]; greedy {a['greedy_new_tokens']} tokens identical: "
                  f"{'yes' if a['greedy_same_tokens'] else 'NO'}"]

    f = r["forward"]
    fr = f["results"]
    lines += ["", f"forward (prefill, no cache): batch {f['batch']} x {f['tokens']} tokens, median of "
                  f"{f['repeats']} interleaved runs after {f['warmup']} warmup",
              f"  {'implementation':<28}{'ms/forward':>12}{'tokens/s':>12}{'vs transformers':>18}"]
    names = {"ours_fast": "ours (fast dispatch)", "ours_reference": "ours (reference dispatch)",
             "transformers": "transformers (dense MoE)"}
    for key, label in names.items():
        x = fr[key]
        ratio = x["tokens_per_s"] / fr["transformers"]["tokens_per_s"]
        lines.append(f"  {label:<28}{1e3 * x['median_s']:>12.2f}{x['tokens_per_s']:>12,.0f}{ratio:>17.2f}x")
    fast, ref, hf = (fr[k]["tokens_per_s"] for k in ("ours_fast", "ours_reference", "transformers"))
    lines += [f"  -> {ratio_phrase(fast, hf, 'ours (fast)')}",
              f"  -> {ratio_phrase(ref, hf, 'ours (reference)')}",
              f"  -> {ratio_phrase(fast, ref, 'fast dispatch', 'reference dispatch')}"]

    d = r["decode"]
    dr = d["results"]
    lines += ["", f"decode (greedy generate, KV cache): batch {d['batch']}, prompt {d['prompt_tokens']} + "
                  f"{d['new_tokens']} new tokens, median of {d['repeats']} interleaved runs",
              "  decode tok/s = (new - 1) / (generate time - prefill time); end-to-end = new / generate time",
              f"  {'implementation':<28}{'generate ms':>12}{'prefill ms':>12}{'ms/step':>9}{'decode tok/s':>14}"
              f"{'end-to-end tok/s':>18}"]
    for key, label in names.items():
        x = dr[key]
        lines.append(f"  {label:<28}{1e3 * x['generate_median_s']:>12.1f}{1e3 * x['prefill_median_s']:>12.2f}"
                     f"{x['ms_per_decode_step']:>9.2f}{x['decode_tokens_per_s']:>14,.0f}"
                     f"{x['end_to_end_tokens_per_s']:>18,.0f}")
    tf = dr["transformers"]
    for key, label in (("ours_fast", "ours (fast)"), ("ours_reference", "ours (reference)")):
        decode = ratio_phrase(dr[key]["decode_tokens_per_s"], tf["decode_tokens_per_s"], label)
        e2e = ratio_phrase(dr[key]["end_to_end_tokens_per_s"], tf["end_to_end_tokens_per_s"], label)
        lines.append(f"  -> decode phase: {decode}; end to end: {e2e}")

    if "trace" in r:
        t = r["trace"]
        tr = t["results"]
        lines += ["", f"router trace overhead: ours (fast), forward batch {t['batch']} x {t['tokens']} tokens, "
                      f"median of {t['repeats']} interleaved runs",
                  f"  {'':<28}{'ms/forward':>12}{'tokens/s':>12}{'vs no trace A':>16}"]
        for key, label in (("no_trace_a", "no trace (run A)"), ("no_trace_b", "no trace (run B: noise)"),
                           ("trace_on", "RouterTrace active")):
            x = tr[key]
            pct = 100 * (x["median_s"] / tr["no_trace_a"]["median_s"] - 1)
            lines.append(f"  {label:<28}{1e3 * x['median_s']:>12.2f}{x['tokens_per_s']:>12,.0f}{pct:>+15.1f}%")
        lines += ["  -> with no trace active the model pays one `is None` check per MoE layer; the A/B gap is",
                  f"     this machine's noise ({t['noise_pct']:+.1f}%); recording router logits, ids and gates costs "
                  f"{t['trace_overhead_pct']:+.1f}%",
                  f"  -> creating + entering + leaving a RouterTrace (once per `with`, not timed above): "
                  f"{1e6 * t['enter_exit_s']:.0f} us"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillama4 bench", description="Throughput of minillama4 vs Hugging Face "
                                "transformers on the same random weights (forward, decode, router-trace overhead).")
    p.add_argument("--preset", default="small", choices=sorted(configs.PRESETS),
                   help="model shape (default: small; scout/maverick/behemoth are far too large for a CPU)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations (default: fp32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per forward in the prefill benchmark (default: 256)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="tokens to generate in the decode benchmark (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for the decode benchmark (default: 16)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing (default: 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed forward rounds (default: 30)")
    p.add_argument("--decode-repeats", type=int, default=10, help="timed generate rounds (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="weights and input ids seed (default: 0)")
    p.add_argument("--no-trace", action="store_true", help="skip the RouterTrace overhead benchmark")
    p.add_argument("--json", metavar="PATH", help="also write every number (and raw times) to this JSON file")
    return p


def check_args(device: str, json_path: str | None) -> None:
    """Refuse a device this machine lacks, or a --json path that cannot be written, before the
    minutes of benchmarking that would otherwise be lost."""
    import os

    from .devices import as_device

    try:
        as_device(device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(json_path):
            raise SystemExit(f"--json {json_path}: cannot write there (is {folder} an existing, writable folder?)")


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--int4" in argv or (argv and argv[0] in configs.PRESETS):  # `minillama4 bench scout --int4`
        from .bench_scout import main as scout_main

        return scout_main(argv)
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be >= 1")
    for flag in ("tokens", "batch", "new_tokens", "prompt_tokens", "repeats", "decode_repeats"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup {args.warmup}: must be >= 0")
    check_args(args.device, args.json)
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("minillama4 bench compares against Hugging Face transformers: pip install 'minillama4[dev]'")
    from .plan import MemoryPlanError, check_weights_fit

    try:  # before building anything: the large presets do not fit a laptop in full precision
        check_weights_fit(configs.get(args.preset), DTYPES[args.dtype], args.device)
    except MemoryPlanError as e:
        raise SystemExit(f"--preset {args.preset}: {e}") from None
    result = run_all(preset=args.preset, dtype=args.dtype, device=args.device, tokens=args.tokens,
                     new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, batch=args.batch,
                     warmup=args.warmup, repeats=args.repeats, decode_repeats=args.decode_repeats,
                     threads=args.threads, seed=args.seed, trace=not args.no_trace)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
