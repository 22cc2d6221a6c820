"""Plotly figure builders for the course notebooks: pure functions from tensors, configs and
ParamCounts to `plotly.graph_objects.Figure`.

    from minillama4 import viz
    viz.expert_load_heatmap(trace.load_matrix(), trace.moe_layers)
    viz.attention_mask_figure(ml4.configs.tiny(), seq_len=96)

Every figure that tells experts apart gives expert j the colour `expert_colours(e)[j]`, so an
expert keeps its colour across the token view, load bars, score histograms and training curves.
Nothing here keeps state: the same inputs give the same figure. Tensors, numpy arrays and lists
are all accepted where an array is expected.

Axes: n tokens, e experts, k top-k slot, L layers (MoE layers where it says so).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..attention import attention_mask, nope_temperature
from ..checks import check_int, check_real, check_type, is_int
from ..config import Llama4Config, TextConfig
from ..layers import rope_inv_freq
from ..params import ParamCount, count_params
from ..trace import load_stats

FORMATS = ("bf16", "fp8", "int4")
MASK_COLOURS = [[0.0, "#f1f1f1"], [1.0, "#3b6fb6"]]  # not allowed, allowed


# ------------------------------------------------------------------------------ shared helpers
def expert_colours(n_experts: int) -> list[str]:
    """One colour per expert, used by every figure: plotly's default palette up to 10 experts,
    Dark24 up to 24, evenly spaced Turbo colours beyond (Maverick's 128)."""
    if n_experts <= 10:
        return list(pcolors.qualitative.Plotly[:n_experts])
    if n_experts <= 24:
        return list(pcolors.qualitative.Dark24[:n_experts])
    return pcolors.sample_colorscale("Turbo", [j / (n_experts - 1) for j in range(n_experts)])


def text_colour(background: str) -> str:
    """The text colour, "black" or "white", that reads better on `background` (hex or rgb())."""
    colours, _ = pcolors.convert_colors_to_same_type(background, "tuple")
    r, g, b = colours[0][:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return np.stack([t.detach().cpu().numpy() for t in x])
    return np.asarray(x)


def _check_result(name: str, value, keys, made_by: str) -> None:
    """A figure's input dict holds `keys` (what `made_by` returns); an empty or foreign dict is
    refused by name instead of failing as a KeyError deep in the figure."""
    check_type(name, value, Mapping, f"pass what {made_by} returns")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{name} lacks {missing}: expected what {made_by} returns "
                         f"(got {'an empty dict' if not value else f'keys {list(value)[:8]}'})")


def _check_fields(name: str, value, keys, made_by: str) -> None:
    """Like _check_result for inputs that may be a mapping or an object with attributes (a
    history dataclass or its to_dict()): the missing fields are named instead of a KeyError."""
    if isinstance(value, Mapping):
        _check_result(name, value, keys, made_by)
        return
    missing = [k for k in keys if not hasattr(value, k)]
    if missing:
        raise ValueError(f"{name} lacks {missing}: expected what {made_by} returns "
                         f"(got a {type(value).__name__})")


def _check_ids(name: str, ids, n: int, what: str, bound: str = "") -> None:
    """Every entry of the integer array `ids` indexes one of n things (experts, domains, ...): an
    id outside [0, n) would be drawn in the wrong colour or row, or dropped, so it is refused.
    what: the ids' name ("expert ids"); bound: where n comes from ("n_experts=4")."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= n)]
    if bad.size:
        raise ValueError(f"{name} holds {bad.flat[0].item()!r}: expected {what} in [0, {n})"
                         + (f" ({bound})" if bound else ""))


def _check_mapping(name: str, value, hint: str) -> None:
    """A figure's {legend name: data} input: a non-empty mapping. A list failed as an AttributeError
    on .items(), and an empty dict drew an empty figure with no hint of why."""
    check_type(name, value, Mapping, hint)
    if not value:
        raise ValueError(f"{name} is empty: expected {hint}")


def _check_len(name: str, got: int, want: int, per: str) -> None:
    """`name` has one entry per `per` (want of them): refuse a list that would be cut or padded."""
    if got != want:
        raise ValueError(f"{name} has {got} entries, expected {want} (one per {per})")


def _check_cfg(cfg) -> None:
    """A model config (as kv_cache_figure checks it): a name such as "tiny" fails here, not deep inside."""
    check_type("cfg", cfg, (Llama4Config, TextConfig), "e.g. configs.tiny() or configs.get('tiny')")


def _text_cfg(cfg: Llama4Config | TextConfig) -> TextConfig:
    return cfg.text if isinstance(cfg, Llama4Config) else cfg


def _as_count(x: ParamCount | Llama4Config | TextConfig) -> ParamCount:
    return x if isinstance(x, ParamCount) else count_params(x)


def human(n: float) -> str:
    """108641793536 -> '108.6B'; 1234 -> '1.2K'."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def _layers_text(layers: list[int]) -> str:
    if len(layers) <= 6:
        return ", ".join(map(str, layers))
    return f"{layers[0]}, {layers[1]}, {layers[2]}, ..., {layers[-1]} ({len(layers)} layers)"


def _expert_axis(n_experts: int) -> dict:
    step = max(1, math.ceil(n_experts / 32))
    ticks = list(range(0, n_experts, step))
    return dict(tickmode="array", tickvals=ticks, ticktext=[f"E{j}" for j in ticks])


def _style(fig: go.Figure, title: str, x: str | None = None, y: str | None = None, **layout) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=60, r=30, t=70, b=50), **layout)
    if x is not None:
        fig.update_layout(xaxis_title=x)
    if y is not None:
        fig.update_layout(yaxis_title=y)
    return fig


def _hline(fig: go.Figure, y: float, text: str, *, log_y: bool = False, colour: str = "grey",
           dash: str = "dash", anchor: str = "left") -> None:
    """A horizontal line across the plot with a label. The label is placed by hand because on a
    log axis plotly reads annotation positions as log10 values but shape positions as data."""
    fig.add_hline(y=y, line_dash=dash, line_color=colour)
    fig.add_annotation(text=text, x=0 if anchor == "left" else 1, xref="paper", xanchor=anchor,
                       y=math.log10(y) if log_y else y, yref="y", yanchor="bottom", showarrow=False,
                       font=dict(color=colour, size=11))


def _discrete_colourscale(colours: list[str]) -> list:
    """Heatmap colourscale giving integer z = j exactly colours[j] (use zmin=-0.5, zmax=e-0.5)."""
    n = len(colours)
    scale = []
    for j, c in enumerate(colours):
        scale += [[j / n, c], [(j + 1) / n, c]]
    return scale


# ------------------------------------------------------------------------------ routing
def expert_load_heatmap(load_matrix, layers=None, *, title: str | None = None) -> go.Figure:
    """Tokens routed to each expert (columns) in each MoE layer (rows), e.g.
    `expert_load_heatmap(trace.load_matrix(), trace.moe_layers)`. z is the load matrix as given."""
    z = _array(load_matrix)
    if z.ndim != 2:
        raise ValueError(f"load_matrix must be [layers, experts], got shape {z.shape}")
    n_rows, n_experts = z.shape
    layers = list(range(n_rows)) if layers is None else [int(i) for i in layers]
    if len(layers) != n_rows:
        raise ValueError(f"{len(layers)} layer labels for {n_rows} rows of load_matrix")
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_experts)), y=[f"layer {i}" for i in layers], colorscale="Blues",
        colorbar=dict(title="tokens"), texttemplate="%{z}" if z.size <= 512 else None,
        hovertemplate="%{y}, expert %{x}: %{z} tokens<extra></extra>"))
    fig.update_xaxes(**_expert_axis(n_experts))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title or "Expert load: tokens routed to each expert, per MoE layer",
                  "expert", "MoE layer", height=max(260, 110 + 36 * n_rows))


def expert_load_bar(load, *, layer: int | None = None, title: str | None = None) -> go.Figure:
    """Tokens per expert for one layer (`trace.load(layer)`), one bar per expert in its colour,
    with a dashed line at the mean (perfect balance); the title gives max/mean and CV."""
    load_np = _array(load).astype(float)
    if load_np.ndim != 1:  # a [layers, e] matrix would be drawn as `layers` experts
        raise ValueError(f"load must be one layer's tokens per expert [experts] (trace.load(layer)), got shape "
                         f"{load_np.shape}; for [layers, experts] use expert_load_heatmap")
    bad = load_np[~(load_np >= 0) | ~np.isfinite(load_np)]
    if bad.size:  # a negative count used to be drawn and summed ("-1 token copies")
        raise ValueError(f"load holds {bad[0]:g}: expected token counts per expert, finite and >= 0")
    n_experts = len(load_np)
    stats = load_stats(torch.as_tensor(load_np))
    colours = expert_colours(n_experts)
    fig = go.Figure(go.Bar(x=list(range(n_experts)), y=load_np, marker_color=colours,
                           hovertemplate="expert %{x}: %{y} tokens<extra></extra>", name="load"))
    if stats["tokens"]:
        _hline(fig, float(load_np.mean()), "perfect balance")
    where = f"layer {layer}: " if layer is not None else ""
    auto = (f"Expert load, {where}{stats['tokens']} token copies, max/mean {stats['max_over_mean']:.2f}, "
            f"CV {stats['cv']:.2f}")
    fig.update_xaxes(**_expert_axis(n_experts))
    return _style(fig, title or auto, "expert", "tokens routed", height=320, showlegend=False)


def _token_hover(i: int, token: str, chosen, gates, scores, position, layer, max_listed: int) -> str:
    lines = [f"token {i}" + (f" (position {position})" if position is not None else "") + f": {token}"]
    if layer is not None:
        lines[0] = f"layer {layer}, " + lines[0]
    picks = [f"E{e}" + (f" (gate {g:.2f})" if g is not None else "") for e, g in zip(chosen, gates)]
    lines.append("chosen: " + ", ".join(picks))
    if scores is not None:
        order = np.argsort(-scores, kind="stable")[:max_listed]
        listed = ", ".join(f"E{j} {scores[j]:.2f}" + ("*" if j in chosen else "") for j in order)
        more = " ..." if len(scores) > max_listed else ""
        lines.append(f"router score sigmoid(logit): {listed}{more}")
    return "\n".join(lines)


def _routing_inputs(tokens, expert_ids, n_experts, gates, logits):
    ids = _array(expert_ids).astype(int)
    ids = ids[:, None] if ids.ndim == 1 else ids
    if len(tokens) != len(ids):
        raise ValueError(f"{len(tokens)} tokens but {len(ids)} rows of expert_ids")
    if n_experts is None:
        n_experts = max(int(ids.max()) + 1, 1) if ids.size else 1
    else:
        check_int("n_experts", n_experts, 1)
    # an id >= n_experts drew another expert's colour (or failed with IndexError); -1 took the last colour
    _check_ids("expert_ids", ids, n_experts, "expert ids", f"n_experts={n_experts}")
    if gates is not None and _array(gates).size != ids.size:
        raise ValueError(f"gates has shape {_array(gates).shape}: expected one gate per entry of expert_ids "
                         f"{ids.shape} (trace.gates(layer))")
    g = _array(gates).astype(float).reshape(ids.shape) if gates is not None else None
    scores = 1.0 / (1.0 + np.exp(-_array(logits).astype(float))) if logits is not None else None
    return ids, n_experts, g, scores


def token_expert_colouring(tokens: list[str], expert_ids, layer: int | None = None, *,
                           n_experts: int | None = None, gates=None, logits=None, positions=None,
                           width: int = 16) -> go.Figure:
    """The text, token by token, each cell coloured by its top-1 expert (rows of `width` tokens).
    expert_ids [n, k] or [n] (`trace.expert_ids(layer)`); optional gates [n, k] and router
    logits [n, e] go into the hover text. z holds the top-1 expert ids, row-major, None-padded."""
    check_int("width", width, 1)
    ids, n_experts, g, scores = _routing_inputs(tokens, expert_ids, n_experts, gates, logits)
    pos = _array(positions).tolist() if positions is not None else [None] * len(tokens)
    rows = max(1, math.ceil(len(tokens) / width))
    z = [[None] * width for _ in range(rows)]
    text = [[""] * width for _ in range(rows)]
    hover = [[""] * width for _ in range(rows)]
    for i, tok in enumerate(tokens):
        r, c = divmod(i, width)
        chosen = ids[i].tolist()
        z[r][c] = chosen[0]
        short = tok if len(tok) <= 6 else tok[:5] + "…"  # the hover has the whole token
        text[r][c] = html.escape(short.replace(" ", "␣"), quote=False)
        hover[r][c] = html.escape(_token_hover(
            i, tok, chosen, g[i].tolist() if g is not None else [None] * len(chosen),
            scores[i] if scores is not None else None, pos[i], layer, 8), quote=False).replace("\n", "<br>")
    colours = expert_colours(n_experts)
    ticks = list(range(0, n_experts, math.ceil(n_experts / max(8, 34 * rows // 14))))  # ~14 px apart
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", textfont=dict(size=14), customdata=hover,
        hovertemplate="%{customdata}<extra></extra>", colorscale=_discrete_colourscale(colours),
        zmin=-0.5, zmax=n_experts - 0.5, xgap=2, ygap=2,
        colorbar=dict(title="expert", tickvals=ticks, ticktext=[f"E{j}" for j in ticks])))
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(rows)),
                     ticktext=[str(r * width) for r in range(rows)], showgrid=False, zeroline=False)
    where = f" in layer {layer}" if layer is not None else ""
    return _style(fig, f"Which expert each token went to{where} (colour = top-1 expert)",
                  None, "token index", height=max(220, 110 + 34 * rows))


def token_expert_html(tokens: list[str], expert_ids, *, n_experts: int | None = None, gates=None,
                      logits=None, positions=None, layer: int | None = None,
                      max_listed: int = 8) -> str:
    """The same token view as an HTML string (for `ipywidgets.HTML` or `IPython.display.HTML`):
    a legend of expert colours, then one coloured span per token whose hover title lists the
    chosen experts with their gates and, given logits [n, e], the router score sigmoid(logit) of
    up to `max_listed` experts (best first; * marks the chosen ones)."""
    ids, n_experts, g, scores = _routing_inputs(tokens, expert_ids, n_experts, gates, logits)
    pos = _array(positions).tolist() if positions is not None else [None] * len(tokens)
    colours = expert_colours(n_experts)
    chip = ("<span style='background:{bg};color:{fg};padding:1px 5px;margin:1px;border-radius:3px;"
            "white-space:pre;display:inline-block' title='{title}'>{text}</span>")
    legend = "".join(chip.format(bg=c, fg=text_colour(c), title=f"expert {j}", text=f"E{j}")
                     for j, c in enumerate(colours))
    spans = []
    for i, tok in enumerate(tokens):
        chosen = ids[i].tolist()
        hover = _token_hover(i, tok, chosen, g[i].tolist() if g is not None else [None] * len(chosen),
                             scores[i] if scores is not None else None, pos[i], layer, max_listed)
        bg = colours[chosen[0]]
        spans.append(chip.format(bg=bg, fg=text_colour(bg), title=html.escape(hover, quote=True),
                                 text=html.escape(tok, quote=False)))
    where = f"layer {layer}: " if layer is not None else ""
    return ("<div style='font-family:monospace;line-height:1.9'>"
            f"<div><b>{where}colour = top-1 expert</b> (hover a token for its router scores) "
            f"{legend}</div><div>{''.join(spans)}</div></div>")


def router_score_histogram(scores, expert_ids=None, *, n_experts: int | None = None,
                           layer: int | None = None, label: str = "router logit",
                           nbins: int = 40) -> go.Figure:
    """Overlaid histograms of router scores, one per expert in its colour.
    scores [n, e] with one column per expert (`trace.logits(layer)`), or scores [n, k] of the
    chosen slots with `expert_ids` [n, k] (`trace.gates(layer)`, `trace.expert_ids(layer)`,
    label="sigmoid gate"). All traces share the same bins."""
    check_int("nbins", nbins, 1)
    s = _array(scores).astype(float)
    if s.ndim == 1:
        s = s[:, None]
    if expert_ids is None:
        n_experts = s.shape[1]
        per_expert = [s[:, j] for j in range(n_experts)]
    else:
        ids = _array(expert_ids).astype(int)
        if ids.size != s.size:
            raise ValueError(f"expert_ids has shape {ids.shape}: expected one expert id per score, "
                             f"the shape of scores {s.shape}")
        ids = ids.reshape(s.shape)
        if n_experts is None:
            n_experts = max(int(ids.max()) + 1, 1) if ids.size else 1
        else:
            check_int("n_experts", n_experts, 1)
        # an id >= n_experts was left out of every histogram; a negative one too
        _check_ids("expert_ids", ids, n_experts, "expert ids", f"n_experts={n_experts}")
        per_expert = [s[ids == j] for j in range(n_experts)]
    lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 1.0)
    size = (hi - lo) / nbins if hi > lo else 1.0
    bins = dict(start=lo, end=hi + size, size=size)
    colours = expert_colours(n_experts)
    fig = go.Figure([go.Histogram(x=v, name=f"E{j}", marker_color=colours[j], opacity=0.6, xbins=bins)
                     for j, v in enumerate(per_expert)])
    where = f", layer {layer}" if layer is not None else ""
    return _style(fig, f"Distribution of the {label} per expert{where}", label, "tokens",
                  barmode="overlay", height=360, legend_title_text="expert")


def domain_expert_preference(expert_ids, domain_labels, n_experts: int, domain_names=None, *,
                             layer: int | None = None) -> go.Figure:
    """Fraction of each domain's token copies that went to each expert (rows sum to 1).
    expert_ids [n, k] or [n]; domain_labels [n] as ints indexing `domain_names`, or as strings
    (then the domains are `domain_names` or the labels in order of first appearance)."""
    check_int("n_experts", n_experts, 1)
    ids = _array(expert_ids).astype(int)
    ids = ids[:, None] if ids.ndim == 1 else ids
    _check_ids("expert_ids", ids, n_experts, "expert ids", f"n_experts={n_experts}")
    labels = list(domain_labels.tolist() if hasattr(domain_labels, "tolist") else domain_labels)
    if len(labels) != len(ids):
        raise ValueError(f"{len(labels)} domain labels but {len(ids)} rows of expert_ids")
    if labels and isinstance(labels[0], str):
        names = list(domain_names) if domain_names is not None else list(dict.fromkeys(labels))
        unknown = [x for x in dict.fromkeys(labels) if x not in names]
        if unknown:
            raise ValueError(f"domain_labels holds {unknown[0]!r}: not one of domain_names {names}")
        codes = np.array([names.index(x) for x in labels], dtype=int)
    else:
        codes = np.array(labels, dtype=int)
        n_domains = max(int(codes.max()) + 1, 0) if codes.size else 0
        names = list(domain_names) if domain_names is not None else [f"domain {d}" for d in range(n_domains)]
        # a negative code was counted into the last row
        _check_ids("domain_labels", codes, len(names), "domain codes", f"{len(names)} domain names")
    counts = np.zeros((len(names), n_experts))
    for slot in range(ids.shape[1]):
        np.add.at(counts, (codes, ids[:, slot]), 1)
    totals = counts.sum(1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig = go.Figure(go.Heatmap(
        z=frac, x=list(range(n_experts)), y=names, customdata=counts, colorscale="Viridis",
        zmin=0, colorbar=dict(title="share", tickformat=".0%"),
        texttemplate="%{z:.0%}" if frac.size <= 256 else None,
        hovertemplate="%{y} -> expert %{x}: %{z:.1%} (%{customdata:.0f} tokens)<extra></extra>"))
    fig.update_xaxes(**_expert_axis(n_experts))
    fig.update_yaxes(autorange="reversed")
    where = f", layer {layer}" if layer is not None else ""
    return _style(fig, f"Share of each domain's tokens per expert{where} (uniform = {1 / n_experts:.0%})",
                  "expert", "domain", height=max(260, 120 + 40 * len(names)))


# ------------------------------------------------------------------------------ attention
def attention_mask_figure(cfg: Llama4Config | TextConfig, seq_len: int) -> go.Figure:
    """Two masks side by side from `attention.attention_mask`: a RoPE layer (chunked causal with
    cfg.attention_chunk_size) and a NoPE layer (full causal). z[q][s] = 1 where query q may
    attend to key s; rows are queries, top to bottom."""
    _check_cfg(cfg)
    check_int("seq_len", seq_len, 1)  # -3 failed inside torch.arange, 2.5 was drawn as 3 positions
    t = _text_cfg(cfg)
    pos = torch.arange(seq_len)
    rope = [i for i in range(t.num_hidden_layers) if t.uses_rope(i)]
    nope = [i for i in range(t.num_hidden_layers) if not t.uses_rope(i)]
    chunk = t.attention_chunk_size
    if not rope:
        rope_title = "RoPE layers: none in this config"
    elif chunk is None:
        rope_title = f"RoPE layers {_layers_text(rope)}: causal, no chunking"
    else:
        rope_title = f"RoPE layers {_layers_text(rope)}: chunked causal, chunk {chunk}"
    nope_title = f"NoPE layers {_layers_text(nope)}: full causal" if nope else "NoPE layers: none in this config"
    fig = make_subplots(rows=1, cols=2, subplot_titles=[rope_title, nope_title], horizontal_spacing=0.08)
    for col, mask in ((1, attention_mask(pos, pos, chunk)), (2, attention_mask(pos, pos, None))):
        fig.add_trace(go.Heatmap(z=mask.int().numpy(), colorscale=MASK_COLOURS, zmin=0, zmax=1,
                                 showscale=False, xgap=1 if seq_len <= 64 else 0,
                                 ygap=1 if seq_len <= 64 else 0,
                                 hovertemplate="query %{y}, key %{x}: allowed %{z}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="key position", row=1, col=col, constrain="domain")
        fig.update_yaxes(autorange="reversed", row=1, col=col,
                         scaleanchor="x" if col == 1 else "x2", constrain="domain")
    fig.update_yaxes(title_text="query position", row=1, col=1)
    return _style(fig, f"Who may attend to whom over {seq_len} tokens (blue = allowed)", height=460)


def temperature_curve(cfg: Llama4Config | TextConfig, max_pos: int, *, n_points: int = 2000) -> go.Figure:
    """NoPE-layer query scale s(p) = 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1) for
    positions 0 .. max_pos - 1 (`attention.nope_temperature`); long ranges are sampled at
    `n_points` positions plus every step of the staircase when there are not too many."""
    _check_cfg(cfg)
    check_int("max_pos", max_pos, 1)
    check_int("n_points", n_points, 2)  # both ends of the range
    t = _text_cfg(cfg)
    if max_pos <= n_points:
        pos = np.arange(max_pos)
    else:
        pos = np.unique(np.linspace(0, max_pos - 1, n_points).round().astype(np.int64))
        steps = np.arange(t.floor_scale - 1, max_pos, t.floor_scale)
        if len(steps) <= n_points:
            pos = np.unique(np.concatenate([pos, steps, np.clip(steps - 1, 0, None)]))
    s = nope_temperature(torch.as_tensor(pos), t.floor_scale, t.attn_scale).numpy()
    fig = go.Figure(go.Scatter(x=pos, y=s, mode="lines", line_shape="hv", name="query scale",
                               hovertemplate="position %{x}: scale %{y:.4f}<extra></extra>"))
    if t.floor_scale - 1 < max_pos:
        fig.add_vline(x=t.floor_scale - 1, line_dash="dash", line_color="grey",
                      annotation_text=f"p = floor_scale - 1 = {t.floor_scale - 1}",
                      annotation_position="top left")
    note = "" if t.attn_temperature_tuning else " (tuning is off in this config: queries stay at 1)"
    title = (f"NoPE query temperature: floor_scale {t.floor_scale}, attn_scale {t.attn_scale:g}{note}")
    return _style(fig, title, "absolute position p", "query scale s(p)", height=340)


def rope_frequencies(cfg: Llama4Config | TextConfig, *, wavelength: bool = False) -> go.Figure:
    """The head_dim/2 rotary frequencies of `layers.rope_inv_freq` for this config against the same
    config with rope_type="default" (no llama3 scaling), on a log axis. wavelength=True plots
    2*pi / frequency in tokens instead, with the llama3 band limits orig/high and orig/low."""
    _check_cfg(cfg)
    t = _text_cfg(cfg)
    plain = rope_inv_freq(dataclasses.replace(t, rope_type="default")).numpy()
    scaled = rope_inv_freq(t).numpy()
    j = np.arange(len(plain))
    ys = (2 * np.pi / plain, 2 * np.pi / scaled) if wavelength else (plain, scaled)
    label = "wavelength (tokens)" if wavelength else "frequency (radians per token)"
    name = f"{t.rope_type} (factor {t.rope_factor:g})" if t.rope_type == "llama3" else "this config (default)"
    fig = go.Figure([
        go.Scatter(x=j, y=ys[0], mode="lines+markers", name="default, no scaling",
                   line=dict(color="grey", dash="dash")),
        go.Scatter(x=j, y=ys[1], mode="lines+markers", name=name, line=dict(color="#3b6fb6")),
    ])
    if wavelength and t.rope_type == "llama3":
        orig = t.rope_original_max_position_embeddings
        low, high = orig / t.rope_low_freq_factor, orig / t.rope_high_freq_factor
        _hline(fig, low, f"{low:g} = orig / low_freq_factor: longer waves stretched x{t.rope_factor:g}",
               log_y=True, colour="#d62728", dash="dot")
        if high != low:
            _hline(fig, high, f"{high:g} = orig / high_freq_factor: shorter waves kept", log_y=True,
                   colour="#2ca02c", dash="dot", anchor="right")
    fig.update_yaxes(type="log", exponentformat="power")
    note = "" if t.rope_type == "llama3" else " (rope_type 'default': no scaling in this config)"
    what = "wavelengths" if wavelength else "frequencies"
    return _style(fig, f"RoPE {what} per rotary pair, theta {t.rope_theta:g}{note}",
                  "rotary pair j", label, height=380)


# ------------------------------------------------------------------------------ size and memory
def param_breakdown(param_count: ParamCount | Llama4Config | TextConfig, *, log_y: bool = False,
                    title: str | None = None) -> go.Figure:
    """Total vs active parameters per component (grouped bars; components with no parameters are
    left out; the "text." prefix is dropped). Accepts a ParamCount or a config."""
    pc = _as_count(param_count)
    items = [(k.removeprefix("text."), t, a) for k, (t, a) in pc.components.items() if t > 0]
    names = [k for k, _, _ in items]
    fig = go.Figure([
        go.Bar(name=f"total ({human(pc.total)})", x=names, y=[t for _, t, _ in items],
               marker_color="#9db4d9", hovertemplate="%{x}: %{y:,} total<extra></extra>"),
        go.Bar(name=f"active per token ({human(pc.active)})", x=names, y=[a for _, _, a in items],
               marker_color="#d9534f", hovertemplate="%{x}: %{y:,} active<extra></extra>"),
    ])
    if log_y:
        fig.update_yaxes(type="log")
    auto = f"Parameters by component: {human(pc.total)} total, {human(pc.active)} active per token"
    return _style(fig, title or auto, "component", "parameters", barmode="group", height=400)


def _gib(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}" if v >= 0.1 else f"{v:.2g}"


def memory_by_format(param_counts: Mapping, gpu_gib: float = 80.0, *, formats=FORMATS,
                     log_y: bool = False) -> go.Figure:
    """Weight memory (GiB, `ParamCount.memory_gib`) per model at each number format, with a dashed
    line at one GPU's memory. param_counts: {name: ParamCount or config}. Weights only: the KV
    cache and activations come on top."""
    _check_mapping("param_counts", param_counts, "e.g. {'scout': configs.scout()}")
    check_real("gpu_gib", gpu_gib, low=0, low_open=log_y)  # 0 failed on a log axis ("math domain error")
    pcs = {name: _as_count(v) for name, v in param_counts.items()}
    names = list(pcs)
    fig = go.Figure([
        go.Bar(name=fmt, x=names, y=[pcs[n].memory_gib(fmt) for n in names],
               text=[_gib(pcs[n].memory_gib(fmt)) for n in names], textposition="outside",
               hovertemplate="%{x} in " + fmt + ": %{y:,.2f} GiB<extra></extra>")
        for fmt in formats])
    _hline(fig, gpu_gib, f"one {gpu_gib:g} GiB GPU", log_y=log_y, colour="black")
    if log_y:
        fig.update_yaxes(type="log")
    return _style(fig, "Weight memory by number format (weights only)", "model",
                  "weight memory (GiB)", barmode="group", height=400, legend_title_text="format")


# ------------------------------------------------------------------------------ training
def _series(history, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) from a mapping {"step": [...], key: [...]}, an object with those attributes,
    a list of records [{"step": s, key: v}, ...] or a plain list of values."""
    def field(name):
        if isinstance(history, Mapping):
            return history.get(name)
        value = getattr(history, name, None)
        return None if callable(value) else value

    values, steps = field(key), None
    if values is not None:
        steps = field("step")
        steps = field("steps") if steps is None else steps
    elif isinstance(history, Sequence) and history and isinstance(history[0], Mapping):
        values = [r[key] for r in history]
        steps = [r.get("step", i) for i, r in enumerate(history)]
    elif isinstance(history, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(history, str):
        values = history
    else:
        raise ValueError(f"cannot read {key!r} from a {type(history).__name__}: expected a mapping or "
                         f"an object with 'step' and {key!r}, a list of records, or a list of values")
    values = _array(values).astype(float).reshape(-1)
    steps = np.arange(len(values)) if steps is None else _array(steps).reshape(-1)
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values of {key!r}")
    return steps, values


def loss_curves(histories: Mapping, *, key: str = "loss", log_y: bool = False,
                title: str | None = None) -> go.Figure:
    """One line per run: `key` (default "loss") against step. histories: {name: history}, each a
    mapping with "step" and key lists, an object with .step and .<key>, a list of records, or a
    plain list of values."""
    _check_mapping("histories", histories, "{run name: history}, e.g. {'aux loss': history.to_dict()}")
    traces = []
    for name, h in histories.items():
        steps, values = _series(h, key)
        traces.append(go.Scatter(x=steps, y=values, mode="lines", name=str(name)))
    fig = go.Figure(traces)
    if log_y:
        fig.update_yaxes(type="log")
    return _style(fig, title or f"Training {key}", "step", key, height=360)


def _load_row(layer, layers, n_rows: int) -> int:
    """The row of axis 1 of loads [steps, layers, e] that `layer` names (see load_over_training)."""
    if not is_int(layer):
        raise TypeError(f"layer={layer!r}: must be an integer")
    if layers is None:
        if not 0 <= layer < n_rows:  # -1 used to pick the last row silently
            raise ValueError(f"layer={layer}: expected a row index in [0, {n_rows}) of loads; pass layers= "
                             "(e.g. trace.moe_layers) to name rows by model layer")
        return layer
    layers = [int(i) for i in layers]
    if len(layers) != n_rows:
        raise ValueError(f"{len(layers)} layers given for {n_rows} rows of loads")
    if layer not in layers:
        raise ValueError(f"layer={layer}: not one of the recorded layers {layers}")
    return layers.index(layer)


def load_over_training(loads, layer: int = 0, *, steps=None, layers=None, normalise: bool = True) -> go.Figure:
    """Each expert's share of the tokens (normalise=True) or token count, against training step,
    one line per expert in its colour, with a dashed line at perfect balance.
    loads: [steps, layers, e] (or a list of [layers, e] tensors) with `layer` picking the row, or
    [steps, e] for one layer. With `layers` (the model indices of axis 1, e.g. trace.moe_layers),
    `layer` is a model layer index; otherwise it is a row index."""
    a = _array(loads).astype(float)
    if a.ndim == 3:
        a = a[:, _load_row(layer, layers, a.shape[1])]
    elif a.ndim != 2:
        raise ValueError(f"loads must be [steps, layers, experts] or [steps, experts], got shape {a.shape}")
    elif layers is not None:  # nothing to pick from (`layer` then only names the layer in the title)
        raise ValueError(f"layers={layers!r}: loads of shape {a.shape} is one layer's [steps, experts], with no "
                         "layer axis to pick from; pass [steps, layers, experts] to choose a layer")
    n_steps, n_experts = a.shape
    if n_experts == 0:
        raise ValueError(f"loads has no experts (shape {a.shape}): expected [steps, layers, experts] or "
                         "[steps, experts] with at least one expert")
    x = np.arange(n_steps) if steps is None else _array(steps).reshape(-1)
    _check_len("steps", len(x), n_steps, "row of loads")
    if normalise:
        totals = a.sum(1, keepdims=True)
        a = np.divide(a, totals, out=np.zeros_like(a), where=totals > 0)
    colours = expert_colours(n_experts)
    fig = go.Figure([go.Scatter(x=x, y=a[:, j], mode="lines", name=f"E{j}", line=dict(color=colours[j]))
                     for j in range(n_experts)])
    if n_steps:
        level = 1 / n_experts if normalise else float(a.mean())
        _hline(fig, level, "perfect balance")
    return _style(fig, f"Expert load during training, layer {layer}", "step",
                  "share of tokens" if normalise else "tokens routed", height=360,
                  legend_title_text="expert")
