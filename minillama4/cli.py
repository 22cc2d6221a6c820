"""The `minillama4` command line: parameter counts, generation, router traces, environment checks.

    minillama4 params scout [--json]          exact total/active parameters and weight memory
    minillama4 generate --preset tiny --prompt "hello" [--max-new-tokens 20 --temperature 0.8]
    minillama4 trace --checkpoint DIR --prompt "hello" [--layers 0,1]
    minillama4 doctor                         versions, hardware, course and test extras
    minillama4 bench ...                      timings (forwarded to minillama4.bench)

`main(argv)` returns the exit code, so tests call it in-process. Bad input prints one
`error: ...` line to stderr and returns 2. Notebook and test packages (transformers, plotly,
ipywidgets, jupyterlab) are imported only inside `doctor` and `bench` (transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from . import configs
from .checkpoint import from_pretrained, read_config
from .model import Llama4Text
from .params import BYTES_PER_PARAM, count_params
from .plan import MemoryPlanError
from .tokenizer import ByteTokenizer, load_tokenizer
from .trace import RouterTrace

PUBLISHED_TOTAL = {"scout": (108_641_793_536, "meta-llama/Llama-4-Scout-17B-16E"),
                   "maverick": (401_583_781_376, "meta-llama/Llama-4-Maverick-17B-128E")}
RUNNABLE_PRESETS = ("tiny", "small")  # the others have billions of parameters
BEHEMOTH_NOTE = ("note: behemoth is an ILLUSTRATIVE GUESS, not a published config. Meta published only "
                 "288B active parameters, 16 experts and nearly 2T total; the shapes are ours.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like the library errors below
        raise SystemExit(_fail(f"{message} (see `{self.prog} --help`)"))


def _seed(text: str) -> int:
    """A seed torch accepts: an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 2**63)")
    return value


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = lambda c: c.replace(",", "").replace(".", "").isdigit()  # noqa: E731
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n and numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _printable(text: str) -> str:
    """Escape control characters (random weights emit arbitrary bytes)."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------------------------- params
def cmd_params(args) -> int:
    cfg = configs.get(args.name)
    pc = count_params(cfg)
    memory = {fmt: pc.memory_gib(fmt) for fmt in BYTES_PER_PARAM}
    if args.json:
        out = {"name": cfg.name, **pc.as_dict(), "memory_gib": memory}
        out |= {"published_total": PUBLISHED_TOTAL[args.name][0]} if args.name in PUBLISHED_TOTAL else {}
        out |= {"note": BEHEMOTH_NOTE.removeprefix("note: ")} if args.name == "behemoth" else {}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cfg.name}: parameters by component (active = touched by one text token)")
    rows = [[name, f"{t:,}", f"{a:,}"] for name, (t, a) in [*pc.components.items(), ("TOTAL", (pc.total, pc.active))]]
    _print_table(["component", "total", "active"], rows)
    print(f"text:   {pc.part('text.'):,}\nvision: {pc.part('vision.'):,}")
    size = lambda gib: f"{gib:,.1f} GiB" if gib >= 0.1 else f"{gib * 1024:,.2f} MiB"  # noqa: E731
    print("weights: " + ", ".join(f"{fmt} {size(gib)}" for fmt, gib in memory.items())
          + "  (int4 includes one bf16 scale per 128 weights)")
    if args.name in PUBLISHED_TOTAL:
        published, repo = PUBLISHED_TOTAL[args.name]
        verdict = "exact match" if published == pc.total else f"differs by {pc.total - published:+,}"
        print(f"published total ({repo}): {published:,}\ncomputed total: {pc.total:,}  -> {verdict}")
    if args.name == "behemoth":
        print(BEHEMOTH_NOTE)
    return 0


# ------------------------------------------------------------------------- generate and trace
def _check_tokenizer_fits(tok, text_cfg, checkpoint) -> None:
    """A folder without tokenizer.json gets the course's byte tokenizer, which only the course's own
    checkpoints read: for any other model its ids would mean other tokens, and the output nonsense."""
    if isinstance(tok, ByteTokenizer) and (text_cfg.bos_token_id != tok.bos_id or text_cfg.vocab_size < tok.vocab_size):
        raise ValueError(f"{checkpoint} has no tokenizer.json, and its model was not trained on the course's byte "
                         f"tokenizer (config: bos_token_id {text_cfg.bos_token_id}, vocab_size {text_cfg.vocab_size}; "
                         f"byte tokenizer: {tok.bos_id}, {tok.vocab_size}): put the model's tokenizer.json in the folder")


def _load(args):
    """(model, tokenizer, description) from --preset or --checkpoint."""
    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to start from")
    if args.checkpoint is not None:
        if not os.path.isdir(args.checkpoint):
            raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} does not exist")
        tok = load_tokenizer(args.checkpoint)
        _check_tokenizer_fits(tok, read_config(args.checkpoint).text, args.checkpoint)  # before the weights load
        model = from_pretrained(args.checkpoint, dtype=args.dtype)
        return model, tok, f"checkpoint {args.checkpoint} ({model.dtype})"
    if args.preset not in RUNNABLE_PRESETS:
        cfg = configs.get(args.preset)  # ValueError for an unknown name
        raise ValueError(f"preset {cfg.name!r} is far too large for random weights here; "
                         f"use one of {list(RUNNABLE_PRESETS)} or --checkpoint DIR")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.float32}[args.dtype]
    model = Llama4Text.random(configs.get(args.preset), seed=args.seed, dtype=dtype).eval()
    return model, load_tokenizer(None), (f"preset {args.preset} with RANDOM weights (seed {args.seed}, "
                                         f"{model.dtype}): untrained, so the text is gibberish")


def cmd_generate(args) -> int:
    model, tok, what = _load(args)
    ids = tok.encode(args.prompt, bos=True)
    with RouterTrace(model) as trace:
        out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, stop_tokens=model.cfg.eos_token_id)
    new = out[0, len(ids):].tolist()
    print(f"model: {what}\nprompt: {args.prompt!r} ({len(ids)} tokens incl. <|begin_of_text|>)")
    print(f"generated {len(new)} tokens (temperature {args.temperature}, top_p {args.top_p}):")
    print(_printable(tok.decode(new)))
    k, e = model.cfg.num_experts_per_tok, model.cfg.num_local_experts
    print(f"\nrouting over every forwarded token ({e} experts, top-{k}; "
          "max/mean 1 and entropy frac 1 = perfectly balanced):")
    rows = []
    for s in trace.summary():
        load = trace.load(s["layer"])
        top = torch.topk(load, min(3, e))
        busiest = " ".join(f"e{i}:{n}" for n, i in zip(top.values.tolist(), top.indices.tolist()) if n)
        rows.append([s["layer"], s["tokens"], f"{s['max_over_mean']:.2f}", f"{s['cv']:.2f}",
                     f"{s['entropy_frac'] + 0.0:.2f}", busiest])  # + 0.0: no "-0.00"
    _print_table(["layer", "tokens", "max/mean", "CV", "entropy frac", "top-3 experts (tokens)"], rows)
    return 0


def cmd_trace(args) -> int:
    model, tok, what = _load(args)
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected comma-separated layer numbers") from None
    trace = RouterTrace(model)
    bad = [i for i in layers or [] if i not in trace.moe_layers]
    if bad:
        raise ValueError(f"--layers: {bad} are not MoE layers; MoE layers are {trace.moe_layers}")
    with trace, torch.no_grad():
        model(torch.tensor([tok.encode(args.prompt, bos=True)]))
    table = trace.table(tok, layers)
    print(f"model: {what}\nexpert chosen by each MoE layer's router, one row per token:")
    cols = [c for c in table[0] if c.startswith("L")]
    _print_table(["pos", "token"] + cols, [[r["position"], r["token"]] + [r[c] for c in cols] for r in table])
    return 0


# -------------------------------------------------------------------------------------- doctor
def _version(module: str) -> str:
    import importlib
    from importlib.metadata import version

    mod = importlib.import_module(module)  # the check is that it imports, not just that it is listed
    return str(getattr(mod, "__version__", None) or version(module.replace("_", "-")))


def cmd_doctor(args) -> int:
    def check(label, fn):
        try:
            line = f"OK       {label}: {fn()}"
        except Exception as e:  # doctor never crashes
            line = f"MISSING  {label}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        print(line)

    def ram():
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        gib = {k: int(info[k].split()[0]) / 2**20 for k in ("MemTotal", "MemAvailable")}
        return f"{gib['MemTotal']:.1f} GiB total, {gib['MemAvailable']:.1f} GiB available"

    def cuda():
        if not torch.cuda.is_available():
            return "not available (CPU only, which is all the course needs)"
        return "; ".join(f"{torch.cuda.get_device_name(i)} "
                         f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB)"
                         for i in range(torch.cuda.device_count()))

    print("== core")
    check("python", lambda: f"{platform.python_version()} ({sys.executable})")
    for mod in ("torch", "einops", "safetensors", "numpy", "minillama4"):
        check(mod, lambda mod=mod: _version(mod))
    print("== hardware")
    check("cpus", lambda: os.cpu_count())
    check("ram", ram)
    check("torch threads", torch.get_num_threads)
    check("cuda", cuda)
    def labextension(name):
        """Is this JupyterLab extension installed and not disabled (what the widgets and plots need)?"""
        from jupyter_core.paths import jupyter_path

        found = [d for d in jupyter_path("labextensions") if os.path.isdir(os.path.join(d, *name.split("/")))]
        if not found:
            raise FileNotFoundError(f"{name} not installed in any labextensions folder")
        from jupyter_server.config_manager import BaseJSONConfigManager

        disabled = {}
        for d in jupyter_path("labconfig"):
            disabled.update(BaseJSONConfigManager(config_dir=d).get("page_config").get("disabledExtensions", {}))
        if disabled.get(name):
            raise RuntimeError(f"{name} is installed but disabled (jupyter labextension enable {name})")
        return f"enabled ({found[0]})"

    print("== course extras (pip install -e '.[notebooks]')")
    for mod in ("jupyterlab", "ipywidgets", "plotly", "jupyterlab_widgets"):
        check(mod, lambda mod=mod: _version(mod))
    check("JupyterLab widgets extension", lambda: labextension("@jupyter-widgets/jupyterlab-manager"))
    check("JupyterLab plotly renderer", lambda: labextension("jupyterlab-plotly"))
    print("== test extras (pip install -e '.[dev]')")
    for mod in ("pytest", "nbval", "transformers"):
        check(mod, lambda mod=mod: _version(mod))
    return 0


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minillama4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="total/active parameters and weight memory of a preset")
    p.add_argument("name", help=f"one of {list(configs.PRESETS)}")
    p.add_argument("--json", action="store_true", help="exact integer counts as JSON")
    for name, helptext in (("generate", "generate text and summarise the routing"),
                           ("trace", "one forward pass: the expert chosen for every token")):
        p = sub.add_parser(name, help=helptext)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--preset", help=f"random weights: one of {list(RUNNABLE_PRESETS)}")
        src.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face Llama 4 checkpoint folder")
        p.add_argument("--prompt", required=True)
        p.add_argument("--seed", type=_seed, default=0, help="weights of a preset, and sampling")
        p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=20)
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            p.add_argument("--top-p", type=float, default=1.0)
        else:
            p.add_argument("--layers", help="comma-separated MoE layers to show (default all)")
    sub.add_parser("doctor", help="versions, hardware, and which extras are installed")
    sub.add_parser("bench", help="timings (see `minillama4 bench --help`)", add_help=False)
    return parser


def _exit_code(e: SystemExit) -> int:
    """argparse: --help is 0, a usage error 2 (already printed); bench's SystemExit("message"):
    print the message, 2."""
    if isinstance(e.code, str):
        return _fail(e.code)
    return e.code if isinstance(e.code, int) else int(e.code is not None) * 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to minillama4.bench, imported on demand
        try:
            from .bench import main as bench_main
        except ImportError as e:
            return _fail(f"minillama4.bench is not available ({e})")
        try:
            return bench_main(argv[1:])
        except SystemExit as e:
            return _exit_code(e)
    commands = {"params": cmd_params, "generate": cmd_generate, "trace": cmd_trace, "doctor": cmd_doctor}
    try:
        args = build_parser().parse_args(argv)
        return commands[args.command](args)
    except SystemExit as e:
        return _exit_code(e)
    except (ValueError, OSError, TypeError, ImportError, MemoryPlanError) as e:
        return _fail(str(e) or type(e).__name__)  # one line, except a checkpoint's list of mismatches


if __name__ == "__main__":
    sys.exit(main())
