"""Full-Scout benchmark: int4 weights on one GPU, decode against the memory-bandwidth roofline,
and a 4-layer full-width bf16 slice side by side with transformers.

    minillama4 bench scout --int4 --device cuda            # what scripts/gpu_check.sh runs
    minillama4 bench small --int4 --device cpu --contexts 16,64 --prefill 32 --slice-layers 2   # a dry run

Measured: build time and footprint of `random_model(scout, quantize="int4")` (built directly in
int4 on the device); prefill tokens/s; decode tokens/s at several contexts (the cache is filled
with random keys/values up to the context instead of a real prefill: decode cost does not depend
on the values); decode as a fraction of the roofline = (bytes one decode step must read) /
(measured device copy bandwidth) / (measured time per token), both eager and as a replayed CUDA
graph (decode.py; "static", the same step without a graph, on CPU); decode with a RouterTrace active;
and transformers vs ours on the same bf16 weights of a `--slice-layers`-layer model at full width.

Bytes per decode step: every weight except the routed experts and the embedding table, plus
top-k of E routed experts per MoE layer, one embedding row, and the KV cache positions each
layer attends to (one chunk at most for chunked layers).
"""

from __future__ import annotations

import argparse
import json
import time

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


def run(preset="scout", device="cuda", int4=True, which="all", contexts=(128, 4096, 32768), prefill=2048,
        slice_layers=4, compare_hf=True, steps=16) -> dict:
    cfg = configs.get(preset)
    text = Llama4Config(text=cfg.text, vision=None, name=cfg.name)
    r = {"preset": preset, "device": str(device), "int4": int4, "which": which,
         "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
         "torch": torch.__version__}
    bandwidth = copy_bandwidth(device, 1 << (30 if torch.device(device).type == "cuda" else 26))
    r["copy_bandwidth_GBps"] = bandwidth / 1e9
    start = time.perf_counter()
    model = random_model(text, quantize="int4" if int4 else None, which=which, device=device,
                         context=max(contexts) + steps + 2, verbose=True)
    _sync(device)
    r["build_s"] = time.perf_counter() - start
    r["weights_GiB"] = model_bytes(model) / 2**30
    if torch.device(device).type == "cuda":
        r["allocated_GiB"] = torch.cuda.memory_allocated(device) / 2**30
    r["prefill_tokens"], r["prefill_tok_s"] = prefill, time_prefill(model, prefill)
    r["decode"] = []
    graph = torch.device(device).type == "cuda"
    for ctx in contexts:
        ideal = decode_bytes(model, ctx) / bandwidth
        for mode in ("eager", "graph") if graph else ("eager", "static"):
            tok_s = time_decode(model, ctx, steps, mode=mode)
            r["decode"].append({"context": ctx, "mode": mode, "tok_s": tok_s, "roofline_tok_s": 1 / ideal,
                                "fraction_of_roofline": tok_s * ideal})
    r["decode_trace_on_tok_s"] = time_decode(model, contexts[0], steps, trace=True)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        r["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if compare_hf:
        r["slice"] = compare_slice(text, slice_layers, device, prefill, steps)
    return r


def compare_slice(cfg: Llama4Config, layers: int, device, prefill: int, steps: int) -> dict:
    """Ours vs transformers on the same bf16 weights, `layers` layers at full width."""
    from .bench import bench_decode, bench_forward
    from .hf_reference import to_transformers

    small = Llama4Config(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_hidden_layers": layers,
                                                  "moe_layers": None, "no_rope_layers": None}), vision=None)
    ours = random_model(small, device=device, context=prefill + steps + 64)
    hf = to_transformers(ours)
    fwd = bench_forward(ours, hf, tokens=prefill, warmup=1, repeats=3)
    dec = bench_decode(ours, hf, new_tokens=steps, prompt_tokens=16, warmup=1, repeats=3)
    # bench_decode times whole generate calls (eager steps); the static step / CUDA graph is timed
    # in steady state at the same short context (a graph is captured once per cache, not per token)
    mode = "graph" if torch.device(device).type == "cuda" else "static"
    step = {"mode": mode, "context": 16, "tok_s": time_decode(ours, 16, steps, mode=mode)}
    return {"layers": layers, "forward": fwd, "decode": dec, "decode_step": step}


def format_report(r: dict) -> str:
    lines = [f"full {r['preset']} ({'int4 ' + r['which'] if r['int4'] else 'bf16'}) on {r['gpu']}, torch {r['torch']}",
             f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s; built in {r['build_s']:.1f} s; "
             f"weights {r['weights_GiB']:.1f} GiB" + (f"; peak allocated {r['peak_allocated_GiB']:.1f} GiB"
                                                      if "peak_allocated_GiB" in r else ""),
             f"prefill {r['prefill_tokens']} tokens: {r['prefill_tok_s']:,.0f} tok/s"]
    for d in r["decode"]:
        lines.append(f"decode at context {d['context']:>6,} ({d.get('mode', 'eager'):>6}): {d['tok_s']:7.1f} tok/s = "
                     f"{100 * d['fraction_of_roofline']:.1f}% of the roofline ({d['roofline_tok_s']:.0f} tok/s)")
    lines.append(f"decode with RouterTrace active at context {r['decode'][0]['context']}: {r['decode_trace_on_tok_s']:.1f} tok/s")
    if "slice" in r:
        s = r["slice"]
        f, d = s["forward"]["results"], s["decode"]["results"]
        lines.append(f"{s['layers']}-layer full-width bf16 slice, same weights (ours fast / ours reference / transformers):")
        lines.append("  prefill tok/s " + " / ".join(f"{f[k]['tokens_per_s']:,.0f}" for k in ("ours_fast", "ours_reference", "transformers"))
                     + f"  -> {f['ours_fast']['tokens_per_s'] / f['transformers']['tokens_per_s']:.2f}x transformers")
        lines.append("  decode tok/s  " + " / ".join(f"{d[k]['decode_tokens_per_s']:,.1f}" for k in ("ours_fast", "ours_reference", "transformers"))
                     + f"  -> {d['ours_fast']['decode_tokens_per_s'] / d['transformers']['decode_tokens_per_s']:.2f}x transformers")
        if "decode_step" in s:
            st = s["decode_step"]
            lines.append(f"  decode tok/s, ours {st['mode']} step at context {st['context']}: {st['tok_s']:,.1f}"
                         f"  -> {st['tok_s'] / d['transformers']['decode_tokens_per_s']:.2f}x transformers")
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
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    r = run(args.preset, args.device, args.int4, args.which, tuple(int(c) for c in args.contexts.split(",")),
            args.prefill, args.slice_layers, not args.no_hf, args.steps)
    print(format_report(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
