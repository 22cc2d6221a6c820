"""Figures and a widget for notebook 06 (MetaP / µP): scaling rules, coordinate check, LR sweep.

    from minillama4.viz.metap import coord_check_figure, lr_sweep_figure, sweep_explorer
    coord_check_figure(coord)          # mean |activation| vs width, SP vs µP, a few training steps
    lr_sweep_figure(sweep)             # validation loss vs log2 LR, one line per width, optimum marked
    sweep_explorer(sweep).ui           # pick parametrization and widths

Inputs are the JSON-ready dicts of minillama4.train.metap (coord_check, lr_sweep, load_sweep)
and lists of its TensorRules. Pure functions: the same inputs give the same figure.

Axes: none of the code here uses einops patterns.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import ipywidgets as widgets
import plotly.colors as pcolors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..train.metap import NAMES, ROLES, best_log2_lr, loss_at_base_optimum, mean_loss
from .plots import _check_result, _style
from .widgets import _Explorer, show_figure

ROLE_COLOURS = {"input": "#1f77b4", "hidden": "#d62728", "output": "#2ca02c", "vector": "#7f7f7f"}


def width_colours(widths) -> dict[int, str]:
    """One colour per width, light (narrow) to dark (wide), as in the µP paper's plots."""
    n = len(widths)
    scale = pcolors.sample_colorscale("Viridis", [0.85 - 0.85 * i / max(1, n - 1) for i in range(n)])
    return {int(w): c for w, c in zip(widths, scale)}


def _best(sweep: dict, kind: str, width: int):
    """best_log2_lr, or None where every LR of that width diverged (nothing to mark)."""
    return best_log2_lr(sweep, kind, width) if any(map(math.isfinite, mean_loss(sweep, kind, width))) else None


def _activation_colour(name: str, names: list[str]) -> str:
    palette = pcolors.qualitative.Dark24
    return palette[names.index(name) % len(palette)]


# ------------------------------------------------------------------------------ the rules
def scaling_rules_figure(rules_by_width: dict) -> go.Figure:
    """Adam LR multiplier and init std of each role against width, SP as dashed lines.
    rules_by_width: {kind: {width: [TensorRule, ...]}} (one representative tensor per role)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Adam learning rate / base LR", "init std"),
                        horizontal_spacing=0.12)
    for kind, by_width in rules_by_width.items():
        widths = sorted(by_width)
        for role in ROLES:
            lr, std = [], []
            for w in widths:
                rule = next((r for r in by_width[w] if r.role == role), None)
                lr.append(rule.lr_mult if rule else None)
                std.append(rule.init_std if rule else None)
            if all(v is None for v in lr):
                continue
            dash = "dash" if kind == "sp" else "solid"
            label = f"{role} ({'SP' if kind == 'sp' else 'µP'})"
            common = dict(mode="lines+markers", line=dict(color=ROLE_COLOURS[role], dash=dash),
                          legendgroup=label, name=label)
            fig.add_trace(go.Scatter(x=widths, y=lr, **common), row=1, col=1)
            if role != "vector":  # norm gains start at 1: no std to show
                fig.add_trace(go.Scatter(x=widths, y=std, showlegend=False, **common), row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(type="log", dtick=math.log10(2), title_text="width d", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    return _style(fig, "Per-role scaling rules: µP (solid) vs standard (dashed)", height=380)


# ------------------------------------------------------------------------------ coordinate check
def coord_check_figure(coord: dict, steps=None, activations=None, *, title: str | None = None) -> go.Figure:
    """mup-style coordinate check: rows = parametrizations, columns = training steps (step 0 =
    at init), x = width (log), y = mean |x| (log), one line per activation. Flat lines: the
    activation's size does not depend on width. steps: which recorded steps (default first,
    second and last); activations: which names (default all)."""
    _check_result("coord", coord, ("widths", "kinds", "lr", "activations", "l1"), "metap.coord_check")
    kinds, widths = coord["kinds"], coord["widths"]
    n_steps = len(next(iter(coord["l1"][kinds[0]].values())))
    steps = sorted({s % n_steps for s in (steps if steps is not None else (0, 1, n_steps - 1))})
    names = activations or coord["activations"]
    fig = make_subplots(rows=len(kinds), cols=len(steps), shared_yaxes=True, shared_xaxes=True,
                        subplot_titles=[f"{NAMES[k]}, step {s}" + (" (init)" if s == 0 else "")
                                        for k in kinds for s in steps],
                        vertical_spacing=0.12, horizontal_spacing=0.04)
    for r, kind in enumerate(kinds, start=1):
        for c, step in enumerate(steps, start=1):
            for name in names:
                fig.add_trace(go.Scatter(
                    x=widths, y=coord["l1"][kind][name][step], mode="lines+markers", name=name,
                    legendgroup=name, showlegend=(r == 1 and c == 1),
                    line=dict(color=_activation_colour(name, coord["activations"])),
                    hovertemplate=f"{name}<br>width %{{x}}<br>mean |x| %{{y:.3g}}<extra></extra>"), row=r, col=c)
            fig.update_xaxes(type="log", tickvals=widths, row=r, col=c)
            fig.update_yaxes(type="log", row=r, col=c)
    for c in range(1, len(steps) + 1):
        fig.update_xaxes(title_text="width d", row=len(kinds), col=c)
    for r in range(1, len(kinds) + 1):
        fig.update_yaxes(title_text="mean |x|", row=r, col=1)
    auto = f"Coordinate check: activation size vs width after a few Adam steps (LR {coord['lr']:g})"
    return _style(fig, title or auto, height=330 * len(kinds) + 80, legend_title_text="activation")


# ------------------------------------------------------------------------------ LR sweep
def lr_sweep_figure(sweep: dict, kinds=None, widths=None, *, y_max: float | None = None,
                    title: str | None = None) -> go.Figure:
    """Validation loss against log2(learning rate), one column per parametrization, one line per
    width (light = narrow, dark = wide), each width's best LR marked with a large dot. Diverged
    runs (loss None / inf) are left out of the lines and marked with an x at the top."""
    _check_result("sweep", sweep, ("widths", "log2_lrs", "kinds", "val_loss"), "metap.lr_sweep or load_sweep")
    kinds = list(kinds or sweep["kinds"])
    widths = [int(w) for w in (widths or sweep["widths"])]
    colours = width_colours(sweep["widths"])
    x = sweep["log2_lrs"]
    finite = [v for k in kinds for w in widths for v in mean_loss(sweep, k, w) if math.isfinite(v)]
    lo = min(finite) if finite else 0.0
    top = y_max if y_max is not None else (min(max(finite), lo + 1.2) if finite else 1.0)
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[NAMES[k] for k in kinds])
    for c, kind in enumerate(kinds, start=1):
        for w in widths:
            y = mean_loss(sweep, kind, w)
            shown = [v if math.isfinite(v) else None for v in y]
            colour = colours[w]
            fig.add_trace(go.Scatter(x=x, y=shown, mode="lines+markers", name=f"d = {w}", legendgroup=str(w),
                                     showlegend=c == 1, line=dict(color=colour), marker=dict(size=5),
                                     hovertemplate=f"d = {w}<br>log2 LR %{{x}}<br>val loss %{{y:.3f}}<extra></extra>"),
                          row=1, col=c)
            best = _best(sweep, kind, w)
            if best is not None:
                fig.add_trace(go.Scatter(x=[best], y=[y[x.index(best)]], mode="markers", legendgroup=str(w),
                                         showlegend=False,
                                         marker=dict(size=13, color=colour, line=dict(color="black", width=1)),
                                         hovertemplate=f"d = {w}: best log2 LR %{{x}}<extra></extra>"), row=1, col=c)
            bad = [lr for lr, v in zip(x, y) if not math.isfinite(v)]
            if bad:
                fig.add_trace(go.Scatter(x=bad, y=[top] * len(bad), mode="markers", legendgroup=str(w),
                                         showlegend=False, marker=dict(symbol="x", size=9, color=colour),
                                         hovertemplate=f"d = {w}: diverged at log2 LR %{{x}}<extra></extra>"),
                              row=1, col=c)
        fig.update_xaxes(title_text="log2 learning rate", dtick=1, row=1, col=c)
    fig.update_yaxes(range=[lo - 0.05 * (top - lo), top + 0.05 * (top - lo)], title_text="validation loss (nats/token)",
                     row=1, col=1)
    auto = "Learning-rate sweep: big dot = best LR of each width"
    return _style(fig, title or auto, height=430, legend_title_text="width")


def optimum_figure(sweep: dict, kinds=None) -> go.Figure:
    """Best log2 LR against width, one line per parametrization: falling = the optimum drifts
    (it must be re-tuned at every width), flat = it transfers."""
    _check_result("sweep", sweep, ("widths", "log2_lrs", "kinds", "val_loss"), "metap.lr_sweep or load_sweep")
    kinds = list(kinds or sweep["kinds"])
    fig = go.Figure()
    for kind, colour in zip(kinds, ("#d62728", "#1f77b4", "#2ca02c")):
        fig.add_trace(go.Scatter(x=sweep["widths"], y=[_best(sweep, kind, w) for w in sweep["widths"]],
                                 mode="lines+markers", name=NAMES[kind], line=dict(color=colour), marker=dict(size=9)))
    fig.update_xaxes(type="log", tickvals=sweep["widths"])
    fig.update_yaxes(dtick=1)
    return _style(fig, "Where is the best learning rate?", "width d", "best log2 LR", height=340)


def multiplier_search_figure(search: dict) -> go.Figure:
    """Heatmap of the base-width validation loss over (per-role multiplier, log2 LR), the best cell
    marked with a star: the MetaP-style tuning step on the small proxy."""
    _check_result("search", search, ("role", "what", "mults", "log2_lrs", "width", "val_loss"),
                  "metap.multiplier_search")
    z = [[v if v is not None else float("nan") for v in row] for row in search["val_loss"]]
    rows = [f"x{m:g}" for m in search["mults"]]
    finite = [v for row in z for v in row if math.isfinite(v)]
    if not finite:
        raise ValueError("search: no run has a finite validation loss (all diverged or had no val_data): "
                         "nothing to draw")
    fig = go.Figure(go.Heatmap(z=z, x=search["log2_lrs"], y=rows, colorscale="Viridis_r",
                               zmin=min(finite), zmax=min(max(finite), min(finite) + 1.0),
                               colorbar=dict(title="val loss"), texttemplate="%{z:.2f}",
                               hovertemplate="multiplier %{y}, log2 LR %{x}: %{z:.3f}<extra></extra>"))
    best = min((v, i, j) for i, row in enumerate(z) for j, v in enumerate(row) if math.isfinite(v))
    fig.add_trace(go.Scatter(x=[search["log2_lrs"][best[2]]], y=[rows[best[1]]], mode="markers",
                             marker=dict(symbol="star", size=18, color="white", line=dict(color="black", width=1)),
                             showlegend=False, hoverinfo="skip"))
    what = "init std" if search["what"] == "init_mult" else "learning rate"
    fig.update_xaxes(dtick=1)
    return _style(fig, f"Tuning at the base width d = {search['width']}: {search['role']} {what} multiplier x LR "
                  "(star = best)", "log2 learning rate", f"{search['role']} {what} multiplier", height=340)


# ------------------------------------------------------------------------------ widget
@dataclass(repr=False, eq=False)
class SweepExplorer(_Explorer):
    ui: widgets.VBox  # the controls, the table and the plot
    kind: widgets.Dropdown  # "sp", "mup" or "both"
    widths: list  # one Checkbox per width
    table: widgets.HTML  # best LR per width and the loss at the base width's best LR
    output: widgets.Output  # shows `figure`
    sweep: dict  # metap.lr_sweep's result: validation loss per kind, width and log2 learning rate
    figure: go.Figure | None = None  # lr_sweep_figure: loss against log2(lr), one line per width


def _sweep_table(sweep: dict, kinds: list[str], widths: list[int]) -> str:
    head = "".join(f"<th style='padding:2px 10px'>d = {w}</th>" for w in widths)
    rows = []
    for kind in kinds:
        # a width where every LR diverged has no best LR: its cells say so
        transfer = loss_at_base_optimum(sweep, kind) if _best(sweep, kind, sweep["widths"][0]) is not None else {}
        best = {w: min(mean_loss(sweep, kind, w)) for w in widths}
        cells = "".join(f"<td style='padding:2px 10px;text-align:right'>"
                        f"{'diverged' if _best(sweep, kind, w) is None else f'2^{_best(sweep, kind, w)}'}</td>"
                        for w in widths)
        rows.append(f"<tr><td style='padding:2px 10px'>{html.escape(NAMES[kind])}: best LR</td>{cells}</tr>")
        lost = {w: transfer[w] - best[w] if w in transfer and math.isfinite(best[w]) else None for w in widths}
        cells = "".join(f"<td style='padding:2px 10px;text-align:right'>"
                        f"{'–' if lost[w] is None else f'{lost[w]:+.3f}'}</td>" for w in widths)
        rows.append(f"<tr><td style='padding:2px 10px'>loss lost by reusing d = {sweep['widths'][0]}'s best LR</td>"
                    f"{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _refresh_sweep(ex: SweepExplorer) -> None:
    kinds = list(ex.sweep["kinds"]) if ex.kind.value == "both" else [ex.kind.value]
    widths = [int(box.description.split()[-1]) for box in ex.widths if box.value]
    if not widths:
        ex.table.value = "<i>Tick at least one width.</i>"
        ex.output.outputs = ()
        ex.figure = None
        return
    ex.figure = lr_sweep_figure(ex.sweep, kinds, widths)
    ex.table.value = _sweep_table(ex.sweep, kinds, widths)
    show_figure(ex.output, ex.figure)


def sweep_explorer(sweep: dict) -> SweepExplorer:
    """A parametrization dropdown (SP, µP, both) and a checkbox per width: the loss-vs-LR curves
    of the chosen runs, and a table of each width's best LR and of how much loss reusing the
    narrowest width's best LR costs (0 = the tuned LR transferred perfectly)."""
    _check_result("sweep", sweep, ("widths", "log2_lrs", "kinds", "val_loss"), "metap.lr_sweep or load_sweep")
    options = [(NAMES[k], k) for k in sweep["kinds"]] + [("both, side by side", "both")]
    kind = widgets.Dropdown(options=options, value="both", description="parametrization",
                            style={"description_width": "initial"})
    boxes = [widgets.Checkbox(value=True, description=f"d = {w}", indent=False,
                              layout=widgets.Layout(width="90px")) for w in sweep["widths"]]
    table, output = widgets.HTML(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([kind, widgets.HBox(boxes)]), output, table])
    ex = SweepExplorer(ui, kind, boxes, table, output, sweep)
    for control in [kind, *boxes]:
        control.observe(lambda _change: _refresh_sweep(ex), names="value")
    _refresh_sweep(ex)
    return ex
