"""Figures and a widget for the load-balancing study (notebook 03): records of
`minillama4.train.sweeps` in, plotly figures and an ipywidgets explorer out.

    from minillama4.train.sweeps import load_sweep
    from minillama4.viz.balance_study import balance_explorer, max_over_mean_curves, dropped_fraction_bars
    sweep = load_sweep("data/03_load_balancing/sweep.json")
    max_over_mean_curves({run_label(r): r for r in sweep["runs"].values()})
    balance_explorer(sweep)          # as a cell's last expression: method, coefficient and layer controls

A record is a mapping with "step", "loss", "max_over_mean" [s, L], "load_step", "load" [s, L, e],
"tail_load" [tail, L, e] and the coefficients (see sweeps.compact_history). Figures are pure: the
same records give the same figure. Widgets follow minillama4.viz.widgets (a dataclass with `.ui`,
figures written into Output widgets with show_figure).

Axes: s steps (or windows of steps), L MoE layers, e experts, f capacity factors.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..train.sweeps import (CAPACITY_FACTORS, METHOD_KEYS, dropped_fractions, record_loads,
                            sweep_index)
from ..checks import check_type
from .plots import _array, _check_len, _check_mapping, _check_result, _hline, _style, load_over_training, loss_curves
from .widgets import _Explorer, show_figure

METHOD_LABELS = {"switch_aux": "Switch auxiliary loss", "z_loss": "router z-loss",
                 "bias_update_rate": "aux-loss-free bias"}  # widget and legend names
SYMBOLS = {"switch_aux": "α", "z_loss": "c_z", "bias_update_rate": "γ"}  # the papers' coefficient letters
DEFAULT_COEFFICIENTS = {"switch_aux": 1e-2, "z_loss": 1e-3, "bias_update_rate": 1e-2}  # Switch, ST-MoE, ours


def run_label(record: Mapping) -> str:
    """"no balancing", "Switch α=0.01", "z-loss c_z=0.001", "Switch α=0.01 + z-loss c_z=0.001", "bias γ=0.01"."""
    short = {"switch_aux": "Switch", "z_loss": "z-loss", "bias_update_rate": "bias"}
    parts = [f"{short[k]} {SYMBOLS[k]}={record[k]:g}" for k in METHOD_KEYS if record.get(k)]
    return " + ".join(parts) or "no balancing"


RECORD_FROM = "train.sweeps.run_balancing (a record of sweep['runs'])"


def _layer_column(run, record: Mapping, layer) -> int:
    """The column of a record's [s, L] (or axis 1 of [s, L, e]) arrays that MoE layer `layer` is."""
    moe_layers = list(record["moe_layers"])
    if layer not in moe_layers:  # was "99 is not in list"
        raise ValueError(f"layer={layer!r}: not an MoE layer of run {run!r} (its MoE layers: {moe_layers})")
    return moe_layers.index(layer)


def max_over_mean_curves(records: Mapping, layer: int | None = None, *, log_y: bool = True,
                         title: str | None = None) -> go.Figure:
    """One line per run: the busiest expert's load / mean load against step (window means), for
    MoE layer `layer` (a model layer index) or, with None, the mean over MoE layers. A dashed
    line marks perfect balance (1). records: {legend name: record}."""
    check_type("records", records, Mapping, "e.g. {run_label(r): r for r in sweep['runs'].values()}")
    fig = go.Figure()
    for name, r in records.items():
        _check_result(f"records[{name!r}]", r, ("step", "max_over_mean", "moe_layers"), RECORD_FROM)
        mm = _array(r["max_over_mean"]).astype(float)  # [s, L]
        y = mm.mean(1) if layer is None else mm[:, _layer_column(name, r, layer)]
        fig.add_trace(go.Scatter(x=list(r["step"]), y=y, mode="lines", name=str(name)))
    if log_y:
        fig.update_yaxes(type="log")
    _hline(fig, 1.0, "perfect balance", log_y=log_y)
    where = "mean over MoE layers" if layer is None else f"layer {layer}"
    return _style(fig, title or f"Busiest expert's load / mean load ({where})", "step", "max / mean load",
                  height=360)


def dropped_fraction_bars(table: Mapping, factors: Sequence[float] = CAPACITY_FACTORS, *,
                          title: str | None = None) -> go.Figure:
    """Grouped bars: for each run (x) the fraction of token copies dropped at each capacity factor.
    table: {run name: [fraction per factor]} (fractions in 0..1, shown as percent)."""
    _check_mapping("table", table, "{run name: [dropped fraction per capacity factor]}, e.g. "
                                   "{name: dropped_fractions(record, factors)}")
    names = list(table)
    for n in names:  # a row of another length was reshaped into the wrong bars, or failed to reshape
        _check_len(f"table[{n!r}]", len(table[n]), len(factors), "capacity factor in factors")
    values = _array([list(map(float, table[n])) for n in names]).reshape(len(names), len(factors))
    x = [n.replace(" + ", " +<br>") for n in names]  # long combined names on two lines
    fig = go.Figure([go.Bar(x=x, y=100 * values[:, i], name=f"capacity factor {f:g}",
                            text=[f"{v:.1f}%" for v in 100 * values[:, i]], textposition="outside")
                     for i, f in enumerate(factors)])
    return _style(fig, title or "Token copies dropped at a fixed expert capacity", "run", "dropped (%)",
                  barmode="group", height=400, legend_title_text="capacity = factor × tokens / experts")


def final_load_heatmap(records: Mapping, layer: int, *, key: str = "tail_load", title: str | None = None) -> go.Figure:
    """Rows = runs, columns = experts: each expert's share of layer `layer`'s tokens, summed over the
    record's `key` rows (default: the last steps kept exactly). Dark cells are busy experts,
    white cells dead ones."""
    check_type("records", records, Mapping, "e.g. {run_label(r): r for r in sweep['runs'].values()}")
    if not records:
        raise ValueError("records is empty: expected {legend name: record} with at least one run")
    names = list(records)
    shares = []
    for name, r in records.items():
        _check_result(f"records[{name!r}]", r, ("moe_layers", key), RECORD_FROM)
        loads = record_loads(r, key)[:, _layer_column(name, r, layer)].sum(0).double()
        shares.append((loads / loads.sum()).numpy())
    z = np.stack(shares)
    n_experts = z.shape[1]
    fig = go.Figure(go.Heatmap(z=z, x=[f"E{j}" for j in range(n_experts)], y=names, colorscale="Blues",
                               zmin=0, zmax=max(float(z.max()), 2 / n_experts),
                               text=[[f"{v:.1%}" for v in row] for row in z], texttemplate="%{text}",
                               colorbar=dict(title="share")))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title or f"Share of layer {layer}'s tokens per expert, end of training (1/{n_experts} = "
                  f"{1 / n_experts:.1%} is balanced)", "expert", None, height=120 + 40 * len(names))


# ------------------------------------------------------------------------------ explorer
@dataclass(repr=False, eq=False)
class BalanceExplorer(_Explorer):
    ui: widgets.VBox  # the controls above the summary and both plots
    method: widgets.Dropdown  # switch_aux, z_loss or bias_update_rate
    coefficient: widgets.SelectionSlider  # the coefficients this sweep holds for that method (0 = none)
    layer: widgets.Dropdown  # the MoE layer shown
    summary: widgets.HTML  # final loss, max/mean and dropping of the chosen run vs no balancing
    load_output: widgets.Output  # shows load_figure
    curves_output: widgets.Output  # shows loss_figure and imbalance_figure
    sweep: dict  # the balancing sweep: {"runs": run name -> record} (train/sweeps.py)
    index: dict  # sweep_index(sweep): method -> coefficient -> run name
    run_name: str = ""  # the run shown
    load_figure: go.Figure | None = None  # tokens per expert in the chosen layer, chosen run vs none
    loss_figure: go.Figure | None = None  # training loss of both runs
    imbalance_figure: go.Figure | None = None  # max/mean expert load of both runs over training
    _updating: bool = False  # True while a method change refills the coefficient slider (no refresh)


def _coefficient_options(index: dict, method: str) -> list[tuple[str, float]]:
    return [("0 (off)" if c == 0 else f"{c:g}", c) for c in index[method]]


def _summary_html(chosen: Mapping, baseline: Mapping, layer: int, factor: float) -> str:
    def numbers(r):
        j = list(r["moe_layers"]).index(layer)
        drop = float(dropped_fractions(record_loads(r, "tail_load"), (factor,))[0, j])
        return r["loss"][-1], r["max_over_mean"][-1][j], drop

    (loss, mm, drop), (loss0, mm0, drop0) = numbers(chosen), numbers(baseline)
    return (f"<b>{html.escape(run_label(chosen))}</b>, end of training, layer {layer}: "
            f"training loss {loss:.3f} (no balancing {loss0:.3f}) · max/mean load {mm:.2f} ({mm0:.2f}) · "
            f"dropped at capacity factor {factor:g}: {drop:.1%} ({drop0:.1%})")


def _refresh_balance(ex: BalanceExplorer) -> None:
    if ex._updating:
        return
    runs = ex.sweep["runs"]
    ex.run_name = ex.index[ex.method.value][ex.coefficient.value]
    chosen, baseline, layer = runs[ex.run_name], runs[ex.index["none"][0.0]], ex.layer.value
    label = run_label(chosen)
    ex.load_figure = load_over_training(record_loads(chosen), layer, steps=chosen["load_step"],
                                        layers=chosen["moe_layers"])
    ex.load_figure.update_layout(title=f"Expert load during training, layer {layer}: {label}")
    pair = {"no balancing": baseline} if chosen is baseline else {"no balancing": baseline, label: chosen}
    ex.loss_figure = loss_curves(pair, title="Training loss (window means)")
    ex.imbalance_figure = max_over_mean_curves(pair, layer)
    ex.summary.value = _summary_html(chosen, baseline, layer, 1.25)
    show_figure(ex.load_output, ex.load_figure)
    _show_figures(ex.curves_output, [ex.imbalance_figure, ex.loss_figure])


def _show_figures(output: widgets.Output, figures: list[go.Figure]) -> None:
    """Like viz.show_figure, with several figures one below the other in one Output."""
    outputs = []
    for fig in figures:
        show_figure(output, fig)
        outputs += list(output.outputs)
    output.outputs = tuple(outputs)


def _on_method(ex: BalanceExplorer) -> None:
    ex._updating = True
    try:
        options = _coefficient_options(ex.index, ex.method.value)
        ex.coefficient.options = options
        values = [v for _, v in options]
        default = DEFAULT_COEFFICIENTS.get(ex.method.value)
        ex.coefficient.value = default if default in values else values[-1]
    finally:
        ex._updating = False
    _refresh_balance(ex)


def balance_explorer(sweep: dict) -> BalanceExplorer:
    """Pick a balancing method, one of the coefficients the sweep holds for it (0 = no balancing)
    and an MoE layer: the expert load over training, max/mean load and training loss against no
    balancing, and a one-line summary (incl. dropping at capacity factor 1.25) redraw. Nothing is
    trained: every view reads the cached records."""
    _check_result("sweep", sweep, ("runs",), "train.sweeps.run_sweep or load_sweep")
    index = sweep_index(sweep)
    methods = [m for m in METHOD_KEYS if m in index]
    if "none" not in index or not methods:
        raise ValueError("the sweep needs a 'none' run and at least one single-method run")
    first = methods[0]
    method = widgets.Dropdown(options=[(METHOD_LABELS[m] + f" ({SYMBOLS[m]})", m) for m in methods], value=first,
                              description="method", style={"description_width": "initial"})
    options = _coefficient_options(index, first)
    default = DEFAULT_COEFFICIENTS[first]
    coefficient = widgets.SelectionSlider(options=options,
                                          value=default if default in index[first] else options[-1][1],
                                          description="coefficient", continuous_update=False,
                                          style={"description_width": "initial"},
                                          layout=widgets.Layout(width="420px"))
    moe_layers = sweep["runs"][index["none"][0.0]]["moe_layers"]
    layer = widgets.Dropdown(options=[(f"layer {i}", i) for i in moe_layers], value=moe_layers[0],
                             description="MoE layer")
    summary, load_output, curves_output = widgets.HTML(), widgets.Output(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([method, coefficient, layer]), summary, load_output, curves_output])
    ex = BalanceExplorer(ui, method, coefficient, layer, summary, load_output, curves_output, sweep, index)
    method.observe(lambda _change: _on_method(ex), names="value")
    coefficient.observe(lambda _change: _refresh_balance(ex), names="value")
    layer.observe(lambda _change: _refresh_balance(ex), names="value")
    _refresh_balance(ex)
    return ex
