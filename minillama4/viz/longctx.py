"""Figures and a widget for the long-context notebook (iRoPE), beyond those in minillama4.viz.

    from minillama4.viz import longctx as lviz
    lviz.kv_cache_figure(configs.scout())             # full cache vs chunk ring buffer, 1K..10M tokens
    lviz.extrapolation_figure(results)                # accuracy vs evaluation length per variant
    lviz.kv_memory_explorer(configs.scout())          # sliders: chunk, NoPE interval, context, format

Pure figure builders (same inputs, same figure) from `minillama4.longctx` results and read-outs;
the explorer follows minillama4.viz.widgets (a dataclass with `.ui`, controls and current figure).
Axes: s key positions.
"""

from __future__ import annotations

import dataclasses
import html
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..checks import check_choice, check_int, check_real, check_type
from ..config import Llama4Config, TextConfig
from ..longctx import GIB, KVMemory, accuracy_table, format_bytes, kv_cache_memory
from .plots import _array, _check_mapping, _check_result, _hline, _style
from .widgets import _Explorer, show_figure

FULL_COLOUR, RING_COLOUR, ROPE_COLOUR = "#d9534f", "#3b6fb6", "#7f7f7f"
MARKED_CONTEXTS = (131072, 1048576, 10485760)  # 128K, 1M, 10M (Scout's advertised 10,485,760)
BYTES_PER_FORMAT = {"bf16": 2, "fp8": 1}  # bytes per cached number


def _text(cfg: Llama4Config | TextConfig) -> TextConfig:
    return cfg.text if isinstance(cfg, Llama4Config) else cfg


def tokens_label(n: int) -> str:
    """131072 -> '128K', 10485760 -> '10M', 1000 -> '1,000' (binary K and M, as contexts are quoted)."""
    for size, unit in ((2**20, "M"), (2**10, "K")):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return f"{n:,}"


def _vline(fig: go.Figure, x: float, text: str, *, log_x: bool = False) -> None:
    """A dashed vertical line with a label at the top. Placed by hand like plots._hline: on a log
    axis plotly reads annotation positions as log10 values but shape positions as data."""
    fig.add_vline(x=x, line_dash="dash", line_color="grey")
    fig.add_annotation(text=text, x=math.log10(x) if log_x else x, xref="x", xanchor="left", y=1, yref="paper",
                       yanchor="bottom", showarrow=False, font=dict(color="grey", size=11))


# ------------------------------------------------------------------------------ KV cache
def kv_cache_figure(cfg: Llama4Config | TextConfig, *, max_context: int = 10485760, bytes_per_value: float = 2,
                    gpu_gib: float | None = 80.0, marked=MARKED_CONTEXTS, title: str | None = None) -> go.Figure:
    """KV-cache GiB of one sequence against context length (log-log): every layer keeping every
    position (full cache) vs chunked layers keeping one chunk (ring buffer), from
    `longctx.kv_cache_memory`. The marked contexts carry their sizes; a dashed line at one GPU."""
    check_type("cfg", cfg, (Llama4Config, TextConfig))
    check_int("max_context", max_context, 1)  # the axis is logarithmic: 0 tokens has no place on it
    if gpu_gib is not None:
        check_real("gpu_gib", gpu_gib, low=0)
    t = _text(cfg)
    xs = np.round(np.logspace(math.log10(1024), math.log10(max_context), 120)).astype(np.int64)
    extra = [m for m in marked if m <= max_context] + ([t.attention_chunk_size] if t.attention_chunk_size else [])
    xs = np.unique(np.concatenate([xs, np.asarray(extra, dtype=np.int64)]))
    full = [kv_cache_memory(t, int(n), False, bytes_per_value).total / GIB for n in xs]
    ring = [kv_cache_memory(t, int(n), True, bytes_per_value).total / GIB for n in xs]
    fig = go.Figure([
        go.Scatter(x=xs, y=full, mode="lines", name="full cache: every layer keeps every position",
                   line=dict(color=FULL_COLOUR), hovertemplate="%{x:,} tokens: %{y:,.2f} GiB<extra>full</extra>"),
        go.Scatter(x=xs, y=ring, mode="lines", name="ring buffer: chunked layers keep one chunk",
                   line=dict(color=RING_COLOUR), hovertemplate="%{x:,} tokens: %{y:,.2f} GiB<extra>ring</extra>"),
    ])
    for n in marked:
        if n > max_context:
            continue
        f, r = (kv_cache_memory(t, n, ring_buffer, bytes_per_value).total for ring_buffer in (False, True))
        fig.add_trace(go.Scatter(x=[n, n], y=[f / GIB, r / GIB], mode="markers+text", showlegend=False,
                                 marker=dict(color=[FULL_COLOUR, RING_COLOUR], size=8),
                                 text=[f"{tokens_label(n)}: {format_bytes(f)}", format_bytes(r)],
                                 textposition="middle left", hoverinfo="skip"))
    if gpu_gib:
        _hline(fig, gpu_gib, f"one {gpu_gib:g} GiB GPU", log_y=True, colour="black")
    fig.update_xaxes(type="log", exponentformat="power")
    fig.update_yaxes(type="log", exponentformat="power")
    chunked = sum(t.is_chunked(i) for i in range(t.num_hidden_layers))
    auto = (f"KV cache of one sequence: {t.num_hidden_layers} layers, {chunked} chunked "
            f"(chunk {t.attention_chunk_size}), {bytes_per_value:g} bytes per number")
    return _style(fig, title or auto, "context (tokens)", "KV cache (GiB)", height=440,
                  legend=dict(x=0.01, y=0.99))


# ------------------------------------------------------------------------------ the experiment
def _variant_name(variant: str, scale: float) -> str:
    if variant == "all_rope":
        return "all-RoPE (full attention)"
    if variant == "irope":
        return "iRoPE, no temperature" if scale == 0 else f"iRoPE, temperature attn_scale {scale:g}"
    return f"{variant}, attn_scale {scale:g}"


def _check_runs(results) -> None:
    _check_result("results", results, ("config", "task", "runs"), "longctx.run_experiment or load_results")
    if not results["runs"] or not all(results["runs"].values()):
        raise ValueError("results: no runs to show (results['runs'] is empty or has a variant without seeds)")


def extrapolation_figure(results: Mapping, *, title: str | None = None) -> go.Figure:
    """Retrieval accuracy against evaluation length, one line per variant and evaluation
    temperature (mean over seeds; the bars span the seeds' min to max), with the training length
    and chance level (1 / number of values) marked. `results` is `longctx.run_experiment`'s dict."""
    _check_runs(results)
    rows = accuracy_table(results)
    combos = list(dict.fromkeys((r["variant"], r["attn_scale"]) for r in rows))
    irope_scales = sorted({s for v, s in combos if v == "irope"})
    blues = ["#08306b", "#2171b5", "#6baed6", "#9ecae1", "#c6dbef"]
    traces = []
    for variant, scale in combos:
        sel = sorted((r for r in rows if (r["variant"], r["attn_scale"]) == (variant, scale)),
                     key=lambda r: r["seq_len"])
        x = [r["seq_len"] for r in sel]
        y = [r["mean"] for r in sel]
        lo = [r["mean"] - min(r["seeds"]) for r in sel]
        hi = [max(r["seeds"]) - r["mean"] for r in sel]
        if variant == "irope":
            colour = blues[irope_scales.index(scale) % len(blues)]
        else:
            colour = FULL_COLOUR if variant == "all_rope" else ROPE_COLOUR
        seeds = [", ".join(f"{a:.0%}" for a in r["seeds"]) for r in sel]
        traces.append(go.Scatter(
            x=x, y=y, mode="lines+markers", name=_variant_name(variant, scale), customdata=seeds,
            line=dict(color=colour, dash="solid" if scale == 0 else "dot"),
            error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1),
            hovertemplate="%{x} tokens: %{y:.1%} (seeds: %{customdata})<extra>%{fullData.name}</extra>"))
    fig = go.Figure(traces)
    train_len = results["config"]["train_len"]
    _vline(fig, train_len, " training length", log_x=True)
    chance = 1 / len(results["task"]["values"])
    _hline(fig, chance, f"chance ({chance:.0%})", colour="grey", dash="dot", anchor="right")
    lens = sorted({r["seq_len"] for r in rows})
    fig.update_xaxes(type="log", tickmode="array", tickvals=lens,
                     ticktext=[f"{n} ({n / train_len:g}x)" for n in lens])
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    n_seeds = len(next(iter(results["runs"].values())))
    return _style(fig, title or f"Retrieval accuracy beyond the training length (mean of {n_seeds} seeds)",
                  "evaluation length (tokens)", "answers right", height=420)


def training_curves(results: Mapping, key: str = "train_accuracy", *, title: str | None = None) -> go.Figure:
    """The stored learning curves (means over `every`-step windows), one line per variant and seed."""
    _check_runs(results)
    every = results.get("curve_every", 50)
    traces = []
    for variant, runs in results["runs"].items():
        for seed, run in runs.items():
            check_choice("key", key, [k for k, v in run.items() if isinstance(v, (list, tuple))])
            y = run[key]
            traces.append(go.Scatter(x=[every * (i + 1) for i in range(len(y))], y=y, mode="lines",
                                     name=f"{_variant_name(variant, 0).split(',')[0]} seed {seed}",
                                     line=dict(color=FULL_COLOUR if variant == "all_rope" else RING_COLOUR,
                                               dash="solid" if seed == next(iter(runs)) else "dot")))
    fig = go.Figure(traces)
    label = key.replace("train_", "training ")
    if "accuracy" in key:
        fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    return _style(fig, title or f"The {label} at the training length, mean per {every} steps", "step", label,
                  height=360)


def needle_attention_figure(weights: Mapping[str, Mapping[int, float]], *, train_len: int | None = None,
                            colours: Mapping[str, str] | None = None, log_y: bool = False,
                            title: str | None = None) -> go.Figure:
    """Mean attention weight a query puts on the token it must copy, against sequence length, one
    line per setting ({label: {seq_len: weight}}; `colours` {label: colour} overrides the blues),
    with 1 / length (attention spread evenly over the context) as a reference."""
    _check_mapping("weights", weights, "{setting label: {sequence length: mean attention weight}}")
    blues = ["#08306b", "#2171b5", "#6baed6", "#9ecae1"]
    traces, lens = [], set()
    for i, (label, by_len) in enumerate(weights.items()):
        _check_mapping(f"weights[{label!r}]", by_len, "{sequence length: mean attention weight}")
        if not all(isinstance(n, numbers.Real) and not isinstance(n, bool) and n > 0 for n in by_len):
            raise ValueError(f"weights[{label!r}] has keys {list(by_len)[:8]}: expected sequence lengths "
                             "(positive numbers; 1 / length is drawn beside them)")
        x = sorted(by_len)
        lens.update(x)
        colour = (colours or {}).get(label, blues[i % len(blues)])
        traces.append(go.Scatter(x=x, y=[float(by_len[n]) for n in x], mode="lines+markers", name=str(label),
                                 line=dict(color=colour),
                                 hovertemplate="%{x} tokens: %{y:.3f}<extra>%{fullData.name}</extra>"))
    lens = sorted(lens)
    traces.append(go.Scatter(x=lens, y=[1 / n for n in lens], mode="lines", name="1 / length (uniform)",
                             line=dict(color="grey", dash="dot")))
    fig = go.Figure(traces)
    if train_len:
        _vline(fig, train_len, " training length", log_x=True)
    fig.update_xaxes(type="log", tickmode="array", tickvals=lens, ticktext=[str(n) for n in lens])
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    else:
        fig.update_yaxes(range=[0, 1.05])
    return _style(fig, title or "Attention on the token to copy, mean over examples",
                  "sequence length (tokens)", "attention weight", height=380)


def attention_row_figure(weights, tokens: Sequence[str], highlight: Mapping[str, Sequence[int]] | None = None,
                         *, title: str | None = None) -> go.Figure:
    """One query's attention weights over key positions [s] as bars, the token strings in the
    hover and on the axis (short sequences), `highlight` positions coloured ({label: positions})."""
    w = _array(weights).astype(float).reshape(-1)
    if len(tokens) < len(w):
        raise ValueError(f"{len(w)} weights but only {len(tokens)} tokens")
    colours = [ROPE_COLOUR] * len(w)
    palette = [FULL_COLOUR, "#2ca02c", "#ff7f0e"]
    traces = [go.Bar(x=list(range(len(w))), y=w, marker_color=colours, customdata=list(tokens[:len(w)]),
                     name="other tokens", hovertemplate="position %{x} '%{customdata}': %{y:.3f}<extra></extra>")]
    for i, (label, positions) in enumerate((highlight or {}).items()):
        positions = [int(p) for p in positions if 0 <= int(p) < len(w)]
        traces.append(go.Bar(x=positions, y=w[positions], name=str(label), marker_color=palette[i % len(palette)],
                             customdata=[tokens[p] for p in positions],
                             hovertemplate="position %{x} '%{customdata}': %{y:.3f}<extra></extra>"))
    fig = go.Figure(traces)
    fig.update_layout(barmode="overlay", bargap=0.1)
    return _style(fig, title or "Attention of one query over the sequence", "key position", "attention weight",
                  height=320)


# ------------------------------------------------------------------------------ KV memory explorer
@dataclass(repr=False, eq=False)
class KVMemoryExplorer(_Explorer):
    ui: widgets.VBox  # the sliders, the table and the plot
    chunk: widgets.SelectionSlider  # attention_chunk_size of the RoPE layers
    interval: widgets.IntSlider  # every n-th layer is NoPE with full attention (0 = no NoPE layer)
    context: widgets.SelectionSlider  # tokens in the sequence
    number_format: widgets.Dropdown  # bytes per cached number
    table: widgets.HTML  # KV-cache bytes, full vs ring, at the chosen context
    output: widgets.Output  # shows `figure`
    base: Llama4Config | TextConfig  # the config the sliders start from
    gpu_gib: float | None = 80.0  # the GPU line drawn in the figure (None: no line)
    config: TextConfig | None = None  # base text config with the sliders' values
    full: KVMemory | None = None  # at the chosen context, every layer keeping every position
    ring: KVMemory | None = None  # the same with chunked layers keeping one chunk
    figure: go.Figure | None = None  # cache size against context, full vs ring


def _kv_table(ex: KVMemoryExplorer) -> str:
    t, full, ring = ex.config, ex.full, ex.ring
    chunked = sum(t.is_chunked(i) for i in range(t.num_hidden_layers))
    lines = [("layers: chunked RoPE / full attention", f"{chunked} / {t.num_hidden_layers - chunked}", ""),
             ("KV cache per token", format_bytes(full.per_token), format_bytes(ring.per_token)),
             (f"KV cache at {tokens_label(full.context)} tokens", format_bytes(full.total), format_bytes(ring.total)),
             ("saved by the ring buffer", "", f"{1 - ring.total / full.total:.1%} (x{full.total / ring.total:.2f})")]
    body = "".join(f"<tr><td style='padding:2px 10px'>{html.escape(a)}</td>"
                   f"<td style='padding:2px 10px;text-align:right'>{b}</td>"
                   f"<td style='padding:2px 10px;text-align:right'>{c}</td></tr>" for a, b, c in lines)
    return ("<table><tr><th></th><th style='padding:2px 10px'>full cache</th>"
            f"<th style='padding:2px 10px'>ring buffer</th></tr>{body}</table>")


def _refresh_kv(ex: KVMemoryExplorer) -> None:
    t = _text(ex.base)
    n = t.num_hidden_layers
    layout = [1] * n if ex.interval.value == 0 else [int((i + 1) % ex.interval.value != 0) for i in range(n)]
    ex.config = dataclasses.replace(t, no_rope_layers=layout, attention_chunk_size=ex.chunk.value)
    bytes_per_value = BYTES_PER_FORMAT[ex.number_format.value]
    ex.full = kv_cache_memory(ex.config, ex.context.value, False, bytes_per_value)
    ex.ring = kv_cache_memory(ex.config, ex.context.value, True, bytes_per_value)
    ex.table.value = _kv_table(ex)
    ex.figure = kv_cache_figure(ex.config, bytes_per_value=bytes_per_value, gpu_gib=ex.gpu_gib,
                                marked=(ex.context.value,), max_context=max(10485760, ex.context.value))
    show_figure(ex.output, ex.figure)


def kv_memory_explorer(cfg: Llama4Config | TextConfig, gpu_gib: float = 80.0) -> KVMemoryExplorer:
    """Sliders for the chunk size, the NoPE interval (0 = every layer RoPE and chunked), the
    context and the number format: KV-cache bytes with a full cache and with a one-chunk ring
    buffer for the chunked layers, as a table and a log-log figure."""
    check_type("cfg", cfg, (Llama4Config, TextConfig))
    if gpu_gib is not None:  # as kv_cache_figure
        check_real("gpu_gib", gpu_gib, low=0)
    t = _text(cfg)
    chunks = [2**i for i in range(9, 21)]
    chunk0 = t.attention_chunk_size if t.attention_chunk_size in chunks else 8192
    style, layout = {"description_width": "initial"}, widgets.Layout(width="420px")
    chunk = widgets.SelectionSlider(options=[(tokens_label(c), c) for c in chunks], value=chunk0,
                                    description="chunk size", continuous_update=False, style=style, layout=layout)
    interval = widgets.IntSlider(value=t.no_rope_layer_interval, min=0, max=8, description="NoPE every n-th layer",
                                 continuous_update=False, style=style, layout=layout)
    contexts = [2**i for i in range(13, 24)] + [10485760]
    context = widgets.SelectionSlider(options=[(tokens_label(c), c) for c in sorted(set(contexts))], value=131072,
                                      description="context", continuous_update=False, style=style, layout=layout)
    number_format = widgets.Dropdown(options=list(BYTES_PER_FORMAT), value="bf16", description="cache format")
    table, output = widgets.HTML(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([widgets.VBox([chunk, interval]), widgets.VBox([context, number_format])]),
                       table, output])
    ex = KVMemoryExplorer(ui, chunk, interval, context, number_format, table, output, cfg, gpu_gib)
    for control in (chunk, interval, context, number_format):
        control.observe(lambda _change: _refresh_kv(ex), names="value")
    _refresh_kv(ex)
    return ex
