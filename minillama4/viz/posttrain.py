"""Figures and widgets for the post-training notebook (07): pass rate by difficulty, judge
pruning, SFT / RL / DPO curves, sample completions, and explorers over precomputed variants.

    from minillama4.viz import posttrain as pv
    pv.pass_rate_by_level({"base": base_rates, "SFT": sft_rates})      # grouped bars per level
    pv.rl_curves(rl_history)                                          # reward, filtered, KL, levels
    pv.dpo_curves(dpo_history)                                        # margins and accuracies
    pv.variant_explorer({"drop fraction": [0.0, 0.5]}, build)         # a slider over cached runs

Histories may be the dataclasses of minillama4.train.sft / rl / dpo or their `to_dict()` (as
stored in JSON, where level keys are strings). Pure functions: same inputs, same figure.

Axes: levels are the task's difficulty levels (digits + carries).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..checks import check_int, check_real, check_type
from .plots import _check_fields, _check_len, _check_mapping, _style
from .widgets import _Explorer, show_figure

STAGE_COLOURS = {"base": "#7f7f7f", "base (raw a+b=)": "#7f7f7f", "base (chat)": "#c7c7c7", "SFT": "#1f77b4",
                 "RL": "#2ca02c", "DPO": "#d62728"}
_FALLBACK = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"]


def stage_colour(name: str, i: int = 0) -> str:
    return STAGE_COLOURS.get(name, _FALLBACK[i % len(_FALLBACK)])


def _get(history, key):
    return history[key] if isinstance(history, Mapping) else getattr(history, key)


def _levels(rates: Mapping) -> dict[int, float]:
    """{level: value} with int keys (JSON gives strings)."""
    return {int(k): float(v) for k, v in rates.items()}


def smooth(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Trailing moving average (NaNs ignored), same length as values."""
    check_int("window", window, 1)  # window 0 averaged empty slices: every point NaN
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    for i in range(len(x)):
        w = x[max(0, i - window + 1): i + 1]
        w = w[~np.isnan(w)]
        out[i] = w.mean() if len(w) else np.nan
    return out


# ------------------------------------------------------------------------------ pass rates
def pass_rate_by_level(rates: Mapping[str, Mapping], *, title: str = "Pass rate by difficulty level",
                       counts: Mapping | None = None) -> go.Figure:
    """Grouped bars: one group per level, one bar per model (stage), height = greedy pass rate.
    rates: {stage name: {level: pass rate}}; counts: optional {level: problems per level}."""
    _check_mapping("rates", rates, "{stage name: {level: pass rate}}, e.g. {'SFT': evaluation.pass_rate}")
    fig = go.Figure()
    for i, (name, r) in enumerate(rates.items()):
        check_type(f"rates[{name!r}]", r, Mapping, "{level: pass rate}")
        r = _levels(r)
        levels = sorted(r)
        fig.add_bar(x=[str(lv) for lv in levels], y=[r[lv] for lv in levels], name=name,
                    marker_color=stage_colour(name, i), text=[f"{r[lv]:.0%}" for lv in levels],
                    textposition="outside", textfont=dict(size=9),
                    hovertemplate=f"{html.escape(name)}<br>level %{{x}}: %{{y:.0%}}<extra></extra>")
    x_title = "difficulty level (digits + carries)"
    if counts:
        values = list(dict(counts).values())
        per_level = values[0] if len(set(values)) == 1 else ", ".join(map(str, values))
        x_title += f"; {per_level} problems per level"
    return _style(fig, title, x_title, "pass rate (greedy)", barmode="group",
                  yaxis=dict(range=[0, 1.12], tickformat=".0%"), legend=dict(orientation="h", y=-0.2))


def pruning_figure(scores, levels, drop_fraction: float, *, title: str | None = None) -> go.Figure:
    """Left: the judge's p_solve per example by level (box plots) and the cut above which examples
    are dropped; right: kept vs dropped examples per level."""
    check_real("drop_fraction", drop_fraction, 0, 1)
    scores, levels = np.asarray(scores, dtype=float), np.asarray(levels)
    if scores.ndim != 1 or scores.shape != levels.shape:
        raise ValueError(f"scores and levels must be two lists of the same length, one entry per example; got "
                         f"shapes {scores.shape} and {levels.shape}")
    n_drop = round(drop_fraction * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    dropped = np.zeros(len(scores), dtype=bool)
    dropped[order[:n_drop]] = True
    cut = float(scores[order[n_drop - 1]]) if n_drop else None
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=("judge score: P(base model answers right)", "examples kept per level"))
    for lv in sorted(set(levels.tolist())):
        sel = levels == lv
        fig.add_box(y=scores[sel], name=str(lv), marker_color="#1f77b4", boxpoints=False, showlegend=False,
                    row=1, col=1)
    if cut is not None:
        fig.add_hline(y=cut, line_dash="dash", line_color="#d62728", row=1, col=1,
                      annotation_text=f"dropped above {cut:.2f}", annotation_position="top left")
    lvs = sorted(set(levels.tolist()))
    fig.add_bar(x=[str(lv) for lv in lvs], y=[int(((levels == lv) & ~dropped).sum()) for lv in lvs], name="kept",
                marker_color="#1f77b4", row=1, col=2)
    fig.add_bar(x=[str(lv) for lv in lvs], y=[int(((levels == lv) & dropped).sum()) for lv in lvs],
                name="dropped (easy)", marker_color="#d62728", opacity=0.5, row=1, col=2)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="level", row=1, col=1)
    fig.update_xaxes(title_text="level", row=1, col=2)
    fig.update_yaxes(type="log", title_text="p_solve (log)", row=1, col=1)
    title = title or f"Judge pruning: the easiest {drop_fraction:.0%} of {len(scores)} SFT examples are dropped"
    return _style(fig, title, legend=dict(orientation="h", y=-0.2))


# ------------------------------------------------------------------------------ SFT
def sft_comparison(histories: Mapping[str, object], *,
                   title: str = "SFT: held-out accuracy against steps") -> go.Figure:
    """Held-out greedy accuracy (markers) against optimizer steps for each SFT run; the legend
    gives each run's examples and steps."""
    fig = go.Figure()
    for i, (name, h) in enumerate(histories.items()):
        _check_fields(f"histories[{name!r}]", h, ("step", "eval_step", "eval_accuracy", "n_examples"),
                      "train.sft.train_sft (an SFTHistory or its to_dict())")
        steps = [s + 1 for s in _get(h, "eval_step")]
        acc = _get(h, "eval_accuracy")
        label = f"{name}: {_get(h, 'n_examples')} examples, {len(_get(h, 'step'))} steps"
        fig.add_scatter(x=steps, y=acc, mode="lines+markers", name=label, line=dict(color=_FALLBACK[i % 6]),
                        hovertemplate="step %{x}: %{y:.1%}<extra></extra>")
    return _style(fig, title, "optimizer steps", "held-out accuracy (greedy)", yaxis=dict(tickformat=".0%"),
                  legend=dict(orientation="h", y=-0.25))


def sft_variants_figure(variants: Mapping, *, title: str = "SFT on judge-pruned data") -> go.Figure:
    """variants {drop fraction: history}: final held-out accuracy (bars) and steps used (line)."""
    fracs = sorted(variants, key=float)
    acc = [_get(variants[f], "eval_accuracy")[-1] for f in fracs]
    steps = [len(_get(variants[f], "step")) for f in fracs]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    labels = [f"{float(f):.0%}" for f in fracs]
    fig.add_bar(x=labels, y=acc, name="held-out accuracy", marker_color="#1f77b4",
                text=[f"{a:.0%}" for a in acc], textposition="outside")
    fig.add_scatter(x=labels, y=steps, name="SFT steps", mode="lines+markers", line=dict(color="#ff7f0e"),
                    secondary_y=True)
    fig.update_yaxes(title_text="held-out accuracy", tickformat=".0%", range=[0, 1.1], secondary_y=False)
    fig.update_yaxes(title_text="optimizer steps", rangemode="tozero", secondary_y=True)
    return _style(fig, title, "fraction of SFT data dropped as easy", legend=dict(orientation="h", y=-0.2))


# ------------------------------------------------------------------------------ RL
def rl_curves(history, *, window: int = 5, title: str = "Online RL (GRPO)") -> go.Figure:
    """Four panels against RL steps: mean sampled reward; reward per active level (smoothed);
    fraction of zero-advantage groups filtered out; k3 KL to the reference (per token)."""
    check_int("window", window, 1)
    _check_fields("history", history, ("step", "reward", "level_reward", "frac_filtered", "kl"),
                  "train.rl.train_rl (an RLHistory or its to_dict())")
    steps = np.asarray(_get(history, "step")) + 1
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "mean reward of the samples", "reward per level (levels the curriculum draws)",
        "fraction of prompt groups filtered (zero advantage)", "KL to the reference (k3, per token)"),
        vertical_spacing=0.14)
    reward = _get(history, "reward")
    fig.add_scatter(x=steps, y=reward, mode="lines", line=dict(color="#2ca02c", width=1), opacity=0.35,
                    name="reward", showlegend=False, row=1, col=1)
    fig.add_scatter(x=steps, y=smooth(reward, window), mode="lines", line=dict(color="#2ca02c"),
                    name=f"reward ({window}-step mean)", showlegend=False, row=1, col=1)
    per_level = _get(history, "level_reward")
    levels = sorted({int(k) for d in per_level for k in d})
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for j, lv in enumerate(levels):
        ys = [float(d.get(lv, d.get(str(lv), np.nan))) for d in per_level]
        fig.add_scatter(x=steps, y=smooth(ys, window), mode="lines", name=f"level {lv}",
                        line=dict(color=palette[(lv - 1) % len(palette)]), row=1, col=2, connectgaps=False)
    fig.add_scatter(x=steps, y=_get(history, "frac_filtered"), mode="lines", line=dict(color="#7f7f7f"),
                    showlegend=False, row=2, col=1)
    kl = np.asarray(_get(history, "kl"), dtype=float)
    fig.add_scatter(x=steps, y=kl, mode="lines", line=dict(color="#9467bd"), showlegend=False, row=2, col=2)
    for r, c in ((1, 1), (1, 2), (2, 1)):
        fig.update_yaxes(range=[0, 1.05], row=r, col=c)
    for c in (1, 2):
        fig.update_xaxes(title_text="RL step", row=2, col=c)
    return _style(fig, title, height=560, legend=dict(orientation="h", y=-0.15))


def curriculum_figure(history, *, title: str = "Curriculum: which levels RL draws prompts from") -> go.Figure:
    """A step x level grid: filled where the level was active (prompts drawn from it)."""
    _check_fields("history", history, ("active_levels",), "train.rl.train_rl (an RLHistory or its to_dict())")
    active = _get(history, "active_levels")
    levels = list(range(1, 1 + max(max(a) for a in active))) if active else []
    z = np.array([[1.0 if lv in a else 0.0 for a in active] for lv in levels])
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(1, len(active) + 1), y=[str(lv) for lv in levels],
                               colorscale=[[0, "#f1f1f1"], [1, "#2ca02c"]], showscale=False,
                               hovertemplate="step %{x}, level %{y}: %{z}<extra></extra>"))
    probe = history.get("probe") if isinstance(history, Mapping) else getattr(history, "probe", None)  # optional
    if probe:
        text = ", ".join(f"L{int(k)} {float(v):.0%}" for k, v in sorted(probe.items(), key=lambda kv: int(kv[0])))
        title += f"<br><sup>pass@1 probe before RL: {text}</sup>"
    return _style(fig, title, "RL step", "level", height=300)


def rl_variants_figure(variants: Mapping[str, object], *, window: int = 5,
                       title: str = "RL settings compared (held-out accuracy before -> after)") -> go.Figure:
    """Smoothed mean reward of several RL runs; the legend holds each run's held-out accuracy."""
    check_int("window", window, 1)
    fig = go.Figure()
    for i, (name, h) in enumerate(variants.items()):
        acc = _get(h, "eval_accuracy")
        label = f"{name}: {acc[0]:.1%} -> {acc[-1]:.1%}" if acc else name
        fig.add_scatter(x=np.asarray(_get(h, "step")) + 1, y=smooth(_get(h, "reward"), window), mode="lines",
                        name=label, line=dict(color=_FALLBACK[i % 6]))
    return _style(fig, title, "RL step", f"mean reward ({window}-step mean)", yaxis=dict(range=[0, 1]),
                  legend=dict(orientation="h", y=-0.25))


# ------------------------------------------------------------------------------ DPO
def dpo_curves(history, *, title: str = "DPO: implicit reward margins and accuracies") -> go.Figure:
    """Left: reward margin r(y_w) - r(y_l) on training batches and held-out pairs (and by pair
    kind); right: held-out reward accuracy and the policy's own preference accuracy."""
    _check_fields("history", history, ("step", "margin", "eval_step", "eval_margin", "eval_margin_by_kind",
                                       "eval_accuracy", "eval_preference"),
                  "train.dpo.train_dpo (a DPOHistory or its to_dict())")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("reward margin r(y_w) - r(y_l)", "held-out accuracies"))
    steps = np.asarray(_get(history, "step")) + 1
    fig.add_scatter(x=steps, y=_get(history, "margin"), mode="lines", name="train batch margin",
                    line=dict(color="#d62728", width=1), opacity=0.5, row=1, col=1)
    ev = np.asarray(_get(history, "eval_step")) + 1
    fig.add_scatter(x=ev, y=_get(history, "eval_margin"), mode="lines+markers", name="held-out margin",
                    line=dict(color="#d62728"), row=1, col=1)
    by_kind = _get(history, "eval_margin_by_kind")
    for kind, dash in (("wrong", "dot"), ("verbose", "dash")):
        ys = [d.get(kind, np.nan) for d in by_kind]
        if not all(np.isnan(ys)):
            fig.add_scatter(x=ev, y=ys, mode="lines", name=f"held-out margin, {kind} pairs",
                            line=dict(color="#d62728", dash=dash), row=1, col=1)
    fig.add_scatter(x=ev, y=_get(history, "eval_accuracy"), mode="lines+markers", name="reward accuracy (margin > 0)",
                    line=dict(color="#1f77b4"), row=1, col=2)
    fig.add_scatter(x=ev, y=_get(history, "eval_preference"), mode="lines+markers",
                    name="policy prefers y_w (log pi(y_w) > log pi(y_l))", line=dict(color="#2ca02c"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=2)
    for c in (1, 2):
        fig.update_xaxes(title_text="DPO step (0 = before)", row=1, col=c)
    return _style(fig, title, legend=dict(orientation="h", y=-0.25), height=420)


def dpo_variants_figure(variants: Mapping, *, title: str = "DPO beta: margin, accuracy and answers") -> go.Figure:
    """variants {beta: {"history": ..., "accuracy": chat accuracy, "verbose": verbose rate}}."""
    betas = sorted(variants, key=float)
    labels = [f"beta={float(b):g}" for b in betas]
    margin = [_get(variants[b]["history"], "eval_margin")[-1] for b in betas]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out reward margin", "greedy answers after DPO"))
    fig.add_bar(x=labels, y=margin, marker_color="#d62728", showlegend=False, row=1, col=1)
    fig.add_bar(x=labels, y=[variants[b]["accuracy"] for b in betas], name="accuracy", marker_color="#2ca02c",
                row=1, col=2)
    fig.add_bar(x=labels, y=[variants[b]["verbose"] for b in betas], name="verbose answers", marker_color="#7f7f7f",
                row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=2)
    return _style(fig, title, barmode="group", legend=dict(orientation="h", y=-0.2))


# ------------------------------------------------------------------------------ completions
def completions_table(questions: Sequence[str], answers: Mapping[str, Sequence[str]], expected: Sequence[str],
                      *, title: str = "Sample completions, stage by stage") -> go.Figure:
    """A table: one row per question, one column per stage; right answers green, wrong red
    (a verbose right answer is still green: the verifier accepts it)."""
    from ..train.posttrain_task import parse_answer

    _check_len("expected", len(expected), len(questions), "question")
    for name, col in answers.items():  # a short column was cut silently, leaving rows unmarked
        _check_len(f"answers[{name!r}]", len(col), len(questions), "question")
    header = ["question", "expected"] + list(answers)
    cells = [list(questions), list(expected)]
    fills = [["white"] * len(questions), ["white"] * len(questions)]
    for name, col in answers.items():
        cells.append([a if a else "(empty)" for a in col])
        fills.append(["#d8f0d8" if parse_answer(a or "") == e else "#f6d5d5" for a, e in zip(col, expected)])
    fig = go.Figure(go.Table(header=dict(values=header, fill_color="#e8e8e8", align="left"),
                             cells=dict(values=cells, fill_color=fills, align="left", height=24)))
    fig = _style(fig, title, height=110 + 26 * len(questions))
    return fig.update_layout(margin=dict(l=10, r=10, t=50, b=10))


# ------------------------------------------------------------------------------ explorers
class VariantExplorer(_Explorer):
    """Controls over precomputed runs; `build(**values)` returns the figure for a combination."""

    def __init__(self, options: Mapping[str, Sequence], build: Callable[..., go.Figure], note: Callable | None = None):
        _check_mapping("options", options, "{build's keyword argument: [its values]}")
        if not callable(build) or not (note is None or callable(note)):
            raise TypeError(f"build and note must be functions of the options' values, got "
                            f"{type(build).__name__} and {type(note).__name__}")
        self.controls = {}
        for name, values in options.items():
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):  # "ab" -> a, b
                raise TypeError(f"options[{name!r}] must be a list of the values to choose from (or any "
                                f"iterable of them), got {type(values).__name__}")
            values = list(values)
            if not values:
                raise ValueError(f"options[{name!r}] is empty: expected at least one value to choose")
            label = name.replace("_", " ")
            if all(isinstance(v, (int, float)) for v in values):
                ctl = widgets.SelectionSlider(options=values, value=values[0], description=label,
                                              continuous_update=False, style={"description_width": "initial"},
                                              layout=widgets.Layout(width="420px"))
            else:
                ctl = widgets.Dropdown(options=values, value=values[0], description=label,
                                       style={"description_width": "initial"})
            ctl.observe(lambda change: self.refresh(), names="value")
            self.controls[name] = ctl
        self.build, self.note = build, note
        self.output = widgets.Output()
        self.text = widgets.HTML()
        self.figure: go.Figure | None = None
        self.ui = widgets.VBox([widgets.HBox(list(self.controls.values())), self.text, self.output])
        self.refresh()

    def values(self) -> dict:
        return {name: ctl.value for name, ctl in self.controls.items()}

    def refresh(self) -> None:
        values = self.values()
        self.figure = self.build(**values)
        check_type("build(...)'s result", self.figure, go.Figure, "build must return a plotly Figure")
        self.text.value = self.note(**values) if self.note else ""
        show_figure(self.output, self.figure)


def variant_explorer(options: Mapping[str, Sequence], build: Callable[..., go.Figure],
                     note: Callable | None = None) -> VariantExplorer:
    """A slider (numbers) or dropdown (anything else) per option; moving one calls
    build(**current values) and shows the figure (and note(**values) as HTML above it).
    Option names are build's keyword arguments; the labels show them with spaces for "_"."""
    return VariantExplorer(options, build, note)
