"""Full-Scout benchmark: int4 weights on one GPU, decode against the memory-bandwidth roofline,
and a 4-layer full-width bf16 slice side by side with transformers.

    minillama4 bench scout --int4 --device cuda            # what scripts/gpu_check.sh runs
    minillama4 bench small --int4 --device cpu --contexts 16,64 --prefill 32 --slice-layers 2   # a dry run

Measured: build time and footprint of `random_model(scout, quantize="int4")` (built directly in
int4 on the device); prefill tokens/s; decode tokens/s at several contexts (the cache is filled
with random keys/values up to the context instead of a real prefill: decode cost does not depend
on the values); decode as a fraction of the roofline = (bytes one decode step must read) /
(measured device copy bandwidth) / (measured time per token), both eager and as a replayed CUDA
graph (decode.py; "static", the same step without a graph, on CPU); decode with a RouterTrace
active, in the graph (static on CPU), against the same without;
on CUDA the W4A16 expert kernel alone (its chosen block/split and bandwidth) and a torch.profiler
table of where a static decode step's GPU time goes; and transformers vs ours on the same bf16
weights of a `--slice-layers`-layer model at full width. Each part is printed as it lands; a part
that fails is reported and the next one runs.

Bytes per decode step: every weight except the routed experts and the embedding table, plus
top-k of E routed experts per MoE layer, one embedding row, and the KV cache positions each
layer attends to (one chunk at most for chunked layers).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from . import configs
from .checkpoint import random_model
from .config import Llama4Config
from .decode import DecodeStep
from .moe import MoE
from .trace import RouterTrace


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second moved by a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def decode_bytes(model, context: int) -> int:
    """Bytes one decode step reads at this context (see module docstring)."""
    cfg = model.cfg
    embed = model.model.embed_tokens.weight
    routed = sum(model_bytes(m.experts) for m in model.modules() if isinstance(m, MoE))
    weights = model_bytes(model) - embed.numel() * embed.element_size() - routed
    weights += routed * cfg.num_experts_per_tok // cfg.num_local_experts + embed.shape[1] * embed.element_size()
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * embed.element_size()
    kv = sum(min(context, cfg.attention_chunk_size) if cfg.is_chunked(i) else context
             for i in range(cfg.num_hidden_layers)) * per_position
    return weights + kv


def filled_cache(model, context: int, extra: int):
    """A KV cache holding `context` random positions (as if a prompt had been prefilled)."""
    cache = model.new_cache(1, context + extra)
    for keys, values, slot_pos in zip(cache.keys, cache.values, cache.slot_pos):
        slots = min(keys.shape[2], context)
        keys[:, :, :slots].normal_(0, 1)
        values[:, :, :slots].normal_(0, 1)
        first = context - slots  # the newest `slots` positions are the ones kept
        positions = torch.arange(first, context, device=keys.device)
        slot_pos[positions % keys.shape[2]] = positions
    cache.length = context
    return cache


@torch.inference_mode()
def time_decode(model, context: int, steps: int = 16, trace: bool = False, mode: str = "eager") -> float:
    """Tokens per second of greedy one-token steps at this context (argmax stays on the device).
    mode: "eager" (the ordinary forward), "static" or "graph" (decode.DecodeStep, CUDA graph)."""
    cache = filled_cache(model, context, steps + 3)
    tok = torch.ones(1, 1, dtype=torch.long, device=model.device)
    step = (lambda t: model(t, cache=cache)[:, -1]) if mode == "eager" else DecodeStep(model, cache, mode == "graph")
    for _ in range(2):  # warm-up (and, for "graph", the capture and a first replay)
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(model.device)
    start = time.perf_counter()
    if trace:
        with RouterTrace(model):
            for _ in range(steps):
                tok = step(tok).argmax(-1, keepdim=True)
    else:
        for _ in range(steps):
            tok = step(tok).argmax(-1, keepdim=True)
    _sync(model.device)
    return steps / (time.perf_counter() - start)


@torch.inference_mode()
def time_prefill(model, tokens: int) -> float:
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), device=model.device)
    model(ids[:, :16])
    _sync(model.device)
    start = time.perf_counter()
    model(ids)
    _sync(model.device)
    return tokens / (time.perf_counter() - start)


def _section(r: dict, name: str, fn, emit) -> None:
    """Run one part of the benchmark; on failure record the error and go on with the next part
    (a GPU lease is short: one broken part should not lose the others' numbers)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        r.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        emit(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()


def _time_ms(fn, cuda: bool) -> float:
    """Milliseconds per call: on CUDA the GPU time of a replayed graph of fn with a cold L2 cache
    (w4a16.time_ms), a plain average on the CPU."""
    if cuda:
        from .w4a16 import time_ms

        return time_ms(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def kernel_bandwidth(model, device) -> list[dict]:
    """The W4A16 expert kernel alone on the first MoE layer's experts, one row (batch-1 top-1
    decode): the (BLOCK_N, GROUPS, SPLIT, warps, variant) it chose and the int4 bytes (weights, scales) read per second."""
    from . import w4a16

    cuda = torch.device(device).type == "cuda"
    experts = next(m for m in model.modules() if isinstance(m, MoE)).experts
    ids = torch.zeros(1, dtype=torch.long, device=device)
    out = []
    for name in ("gate_up", "down"):
        packed, scales = getattr(experts, f"{name}_packed"), getattr(experts, f"{name}_scales")
        x = torch.randn(1, packed.shape[2] * 2, dtype=torch.bfloat16, device=device)
        w4a16.expert_matmul(x, ids, packed, scales)  # on CUDA: times the tiles and splits, keeps the best
        ms = _time_ms(lambda: w4a16.expert_matmul(x, ids, packed, scales), cuda)
        nbytes = packed[0].numel() + scales[0].numel() * scales.element_size()
        config = w4a16.CHOSEN.get(("int4", 1, packed.shape[1], x.shape[1], x.dtype, x.device), w4a16.DEFAULT_INT4)
        # the fastest configuration of each kernel variant, from the tuner's timings (CUDA only)
        times = w4a16.TIMES.get(("int4", 1, packed.shape[1], x.shape[1], x.dtype, x.device), {})
        variants = {}
        for c, t in sorted(times.items(), key=lambda item: item[1]):
            variants.setdefault(c[-1], {"config": list(c), "us": t * 1e3})
        out.append({"matrix": name, "n": packed.shape[1], "k": x.shape[1], "config": list(config),
                    "us": ms * 1e3, "GBps": nbytes / ms / 1e6, "variants_us": variants})
    return out


def kernel_profile(model, context: int, top: int = 12) -> list[dict]:
    """Where a static decode step's time goes: torch.profiler over 3 steps, by kernel (GPU time
    on CUDA, the ops' own CPU time on the CPU), the `top` biggest and then the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    cache = filled_cache(model, context, 8)
    step = DecodeStep(model, cache)
    tok = torch.ones(1, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        tok = step(tok).argmax(-1, keepdim=True)
        _sync(model.device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                tok = step(tok).argmax(-1, keepdim=True)
            _sync(model.device)
    rows = []
    for ev in prof.key_averages():
        t = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)) if cuda else ev.self_cpu_time_total
        if t > 0:
            rows.append({"kernel": ev.key[:90], "calls_per_step": ev.count / 3, "us_per_step": t / 3})
    rows.sort(key=lambda row: -row["us_per_step"])
    total = {"kernel": "(all)", "calls_per_step": sum(x["calls_per_step"] for x in rows),
             "us_per_step": sum(x["us_per_step"] for x in rows)}
    return rows[:top] + [total]


def run(preset="scout", device="cuda", int4=True, which="all", contexts=(128, 4096, 32768), prefill=2048,
        slice_layers=4, compare_hf=True, steps=16, emit=print, save=None) -> dict:
    """The whole benchmark. Each measurement is printed by `emit` as it lands and `save(r)` is
    called after each part, so a run cut short keeps what it measured."""
    cfg = configs.get(preset)
    text = Llama4Config(text=cfg.text, vision=None, name=cfg.name)
    cuda = torch.device(device).type == "cuda"
    r = {"preset": preset, "device": str(device), "int4": int4, "which": which,
         "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    save = save or (lambda r: None)
    bandwidth = copy_bandwidth(device, 1 << (30 if cuda else 26))
    r["copy_bandwidth_GBps"] = bandwidth / 1e9
    emit(f"{r['gpu']}, torch {r['torch']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    if cuda:
        from . import fused  # which fused kernels this run uses (MINILLAMA4_FUSED)

        r["fused_kernels"] = sorted(fused.KERNELS) if fused.ENABLED else []
        emit(f"fused kernels: {', '.join(r['fused_kernels']) or 'none'}")
    start = time.perf_counter()
    model = random_model(text, quantize="int4" if int4 else None, which=which, device=device,
                         context=max(contexts) + steps + 2, verbose=True)
    _sync(device)
    r["build_s"] = time.perf_counter() - start
    r["weights_GiB"] = model_bytes(model) / 2**30
    if cuda:
        r["allocated_GiB"] = torch.cuda.memory_allocated(device) / 2**30
    emit(f"built in {r['build_s']:.1f} s: weights {r['weights_GiB']:.1f} GiB"
         + (f", allocated {r['allocated_GiB']:.1f} GiB" if cuda else ""))
    save(r)

    def prefill_part():
        r["prefill_tokens"], r["prefill_tok_s"] = prefill, time_prefill(model, prefill)
        emit(f"prefill {prefill} tokens: {r['prefill_tok_s']:,.0f} tok/s")
    _section(r, "prefill", prefill_part, emit)
    if cuda and int4:
        r["prefill_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        emit(f"peak allocated after prefill: {r['prefill_peak_GiB']:.1f} GiB")

    def kernel_part():
        r["w4a16"] = kernel_bandwidth(model, device)
        for k in r["w4a16"]:
            emit(f"W4A16 kernel, {k['matrix']} [{k['n']} x {k['k']}], block_n/groups/split/warps/variant {k['config']}: "
                 f"{k['us']:.1f} us = {k['GBps']:.0f} GB/s ({100 * k['GBps'] * 1e9 / bandwidth:.0f}% of copy); "
                 f"best of each variant: " + ", ".join(f"{v} {b['us']:.1f} us {b['config'][:4]}"
                                                       for v, b in k["variants_us"].items()))
    if cuda and int4:
        _section(r, "w4a16", kernel_part, emit)
    save(r)

    r["decode"] = []
    for ctx in contexts:
        ideal = decode_bytes(model, ctx) / bandwidth
        for mode in ("eager", "graph") if cuda else ("eager", "static"):
            def decode_part(ctx=ctx, mode=mode):
                tok_s = time_decode(model, ctx, steps, mode=mode)
                r["decode"].append({"context": ctx, "mode": mode, "tok_s": tok_s, "roofline_tok_s": 1 / ideal,
                                    "fraction_of_roofline": tok_s * ideal})
                emit(_decode_line(r["decode"][-1]))
            _section(r, f"decode {ctx} {mode}", decode_part, emit)
            save(r)

    def choices_part():
        from . import quant, w4a16

        r["kernels_chosen"] = {"int4 linears (rows, out, in)": {f"{k[0]}x{k[1]}x{k[2]}": v for k, v in quant._LINEAR_KERNEL.items()},
                               "row kernels (kind, rows, n, k)": {f"{k[0]} {k[1]}x{k[2]}x{k[3]}": list(v)
                                                                  for k, v in w4a16.CHOSEN.items()},
                               "linears in one launch (rows, outs, in)": {f"{k[0]}x{'+'.join(map(str, k[1]))}x{k[2]}": v
                                                                          for k, v in quant._TOGETHER.items()}}
        emit(f"kernels chosen by timing: {json.dumps(r['kernels_chosen'])}")
    if cuda:
        _section(r, "kernels chosen", choices_part, emit)

    def trace_part():
        mode = "graph" if cuda else "static"
        r["decode_trace_context"], r["decode_trace_mode"] = contexts[0], mode
        r["decode_trace_on_tok_s"] = time_decode(model, contexts[0], steps, trace=True, mode=mode)
        emit(_trace_line(r))
    _section(r, "trace", trace_part, emit)

    def profile_part():
        r["profile"] = kernel_profile(model, contexts[0])
        emit(f"static decode step at context {contexts[0]}, GPU time by kernel (torch.profiler):")
        emit("\n".join(_profile_lines(r["profile"])))
    if cuda:
        _section(r, "profile", profile_part, emit)
    model = None  # frees the full model (the closures above hold it through this name) before the slice
    if cuda:
        torch.cuda.empty_cache()
        r["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        emit(f"peak allocated {r['peak_allocated_GiB']:.1f} GiB")
    save(r)
    if compare_hf:
        def slice_part():
            r["slice"] = compare_slice(text, slice_layers, device, prefill, steps)
            emit("\n".join(_slice_lines(r["slice"])))
        _section(r, "slice", slice_part, emit)
        save(r)
    return r


def _trace_line(r: dict) -> str:
    """Decode with a RouterTrace active against the same mode and context without one."""
    ctx, mode = r["decode_trace_context"], r.get("decode_trace_mode", "eager")
    off = [d["tok_s"] for d in r.get("decode", []) if d["context"] == ctx and d["mode"] == mode]
    versus = f" (without: {off[0]:.1f}, {100 * (1 - r['decode_trace_on_tok_s'] / off[0]):+.0f}% slower)" if off else ""
    return f"decode with RouterTrace active at context {ctx} ({mode}): {r['decode_trace_on_tok_s']:.1f} tok/s{versus}"


def _decode_line(d: dict) -> str:
    return (f"decode at context {d['context']:>6,} ({d.get('mode', 'eager'):>6}): {d['tok_s']:7.1f} tok/s = "
            f"{100 * d['fraction_of_roofline']:.1f}% of the roofline ({d['roofline_tok_s']:.0f} tok/s)")


def compare_slice(cfg: Llama4Config, layers: int, device, prefill: int, steps: int) -> dict:
    """Ours vs transformers on the same bf16 weights, `layers` layers at full width."""
    from .bench import bench_decode, bench_forward
    from .hf_reference import to_transformers

    small = Llama4Config(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_hidden_layers": layers,
                                                  "moe_layers": None, "no_rope_layers": None}), vision=None)
    ours = random_model(small, device=device, context=prefill + steps + 64)
    hf = to_transformers(ours, copy=False)  # the same tensors: the full-width slice fits once
    fwd = bench_forward(ours, hf, tokens=prefill, warmup=1, repeats=3)
    dec = bench_decode(ours, hf, new_tokens=steps, prompt_tokens=16, warmup=1, repeats=3)
    # bench_decode times whole generate calls (eager steps); the static step / CUDA graph is timed
    # in steady state at the same short context (a graph is captured once per cache, not per token)
    mode = "graph" if torch.device(device).type == "cuda" else "static"
    step = {"mode": mode, "context": 16, "tok_s": time_decode(ours, 16, steps, mode=mode)}
    out = {"layers": layers, "forward": fwd, "decode": dec, "decode_step": step}
    if torch.device(device).type == "cuda":
        out["profile"] = kernel_profile(ours, 16)
    return out


def _slice_lines(s: dict) -> list[str]:
    f, d = s["forward"]["results"], s["decode"]["results"]
    lines = [f"{s['layers']}-layer full-width bf16 slice, same weights (ours fast / ours reference / transformers):",
             "  prefill tok/s " + " / ".join(f"{f[k]['tokens_per_s']:,.0f}" for k in ("ours_fast", "ours_reference", "transformers"))
             + f"  -> {f['ours_fast']['tokens_per_s'] / f['transformers']['tokens_per_s']:.2f}x transformers",
             "  decode tok/s  " + " / ".join(f"{d[k]['decode_tokens_per_s']:,.1f}" for k in ("ours_fast", "ours_reference", "transformers"))
             + f"  -> {d['ours_fast']['decode_tokens_per_s'] / d['transformers']['decode_tokens_per_s']:.2f}x transformers"]
    if "decode_step" in s:
        st = s["decode_step"]
        lines.append(f"  decode tok/s, ours {st['mode']} step at context {st['context']}: {st['tok_s']:,.1f}"
                     f"  -> {st['tok_s'] / d['transformers']['decode_tokens_per_s']:.2f}x transformers")
    if "profile" in s:
        lines.append(f"  ours, static decode step at context {s['decode_step']['context']}, GPU time by kernel:")
        lines += _profile_lines(s["profile"])
    return lines


def _profile_lines(rows: list[dict]) -> list[str]:
    return [f"  {row['us_per_step']:9.1f} us  {row['calls_per_step']:6.0f} calls  {row['kernel']}" for row in rows]


def format_report(r: dict) -> str:
    """The summary of a finished (or partly failed) run."""
    lines = [f"full {r['preset']} ({'int4 ' + r['which'] if r['int4'] else 'bf16'}) on {r['gpu']}, torch {r['torch']}",
             f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s; built in {r['build_s']:.1f} s; "
             f"weights {r['weights_GiB']:.1f} GiB" + (f"; peak allocated {r['peak_allocated_GiB']:.1f} GiB"
                                                      if "peak_allocated_GiB" in r else "")]
    if "prefill_tok_s" in r:
        lines.append(f"prefill {r['prefill_tokens']} tokens: {r['prefill_tok_s']:,.0f} tok/s")
    lines += [_decode_line(d) for d in r.get("decode", [])]
    if "decode_trace_on_tok_s" in r:
        lines.append(_trace_line(r))
    if "slice" in r:
        lines += _slice_lines(r["slice"])
    lines += [f"FAILED {name}: {err}" for name, err in r.get("errors", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minillama4 bench PRESET --int4", description=__doc__.split("\n\n")[0])
    p.add_argument("preset", nargs="?", default="scout", choices=sorted(configs.PRESETS))
    p.add_argument("--int4", action="store_true", help="int4 weights (else bf16)")
    p.add_argument("--which", default="all", choices=["ffn", "all"], help="int4 for the FFN only or every linear")
    p.add_argument("--device", default="cuda")
    p.add_argument("--contexts", default="128,4096,32768", help="decode contexts, comma separated")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per context")
    p.add_argument("--slice-layers", type=int, default=4)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from .bench import check_args

    check_args(args.device, args.json)
    try:
        contexts = tuple(int(c) for c in args.contexts.split(","))
    except ValueError:
        raise SystemExit(f"--contexts {args.contexts!r}: expected comma-separated token counts, e.g. 128,4096") from None
    for flag, value in [("--contexts", min(contexts)), ("--prefill", args.prefill), ("--steps", args.steps),
                        ("--slice-layers", args.slice_layers)]:
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be >= 1")
    layers = configs.get(args.preset).text.num_hidden_layers  # the slice runs last: refuse it now
    if args.slice_layers > layers:
        raise SystemExit(f"--slice-layers {args.slice_layers}: {args.preset} has {layers} layers")
    def save(r):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(r, fh, indent=2, default=str)

    r = run(args.preset, args.device, args.int4, args.which, contexts,
            args.prefill, args.slice_layers, not args.no_hf, args.steps,
            emit=lambda line: print(line, flush=True), save=save)
    print("\nsummary:\n" + format_report(r))
    save(r)
    return 1 if r.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
