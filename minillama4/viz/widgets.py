"""ipywidgets explorers for the course notebooks: sliders and dropdowns that redraw figures.

    ex = viz.config_explorer(ml4.configs.scout())
    ex                      # as a cell's last expression (or display(ex.ui)) shows the controls
    ex.experts.value = 128  # what a learner's drag does; ex.figure and ex.params follow

Each function returns a small dataclass: `.ui` is the ipywidgets container, the controls are
attributes, and the current figures and HTML are kept on it, so tests set `.value`s and read them.

How figures reach JupyterLab 4: each figure is written into an `ipywidgets.Output` as one
display_data output carrying plotly's JSON mimetype (application/vnd.plotly.v1+json). The
jupyterlab-plotly renderer that ships inside the plotly package draws it, in the page and inside
Output widgets alike. This needs neither `go.FigureWidget` (which plotly >= 6 builds on anywidget)
nor any classic-notebook API, and it works the same from a kernel callback as in a test.
Sliders use continuous_update=False: a figure is redrawn when the slider is released.
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field

import ipywidgets as widgets
import plotly.graph_objects as go

from ..checks import check_int, check_real, check_type
from ..config import Llama4Config, TextConfig
from ..params import ParamCount, count_params
from ..trace import RouterTrace
from .plots import (FORMATS, attention_mask_figure, expert_load_bar, human, param_breakdown,
                    memory_by_format, temperature_curve, token_expert_html)

PLOTLY_MIME = "application/vnd.plotly.v1+json"


def show_figure(output: widgets.Output, fig: go.Figure) -> None:
    """Replace what `output` shows with `fig` (plotly mimetype, with a text fallback)."""
    title = fig.layout.title.text or "plotly figure"
    output.outputs = ({"output_type": "display_data", "metadata": {},
                       "data": {PLOTLY_MIME: json.loads(fig.to_json()), "text/plain": f"<Figure: {title}>"}},)


class _Explorer:
    """Shows `.ui` when the explorer object is a cell's last expression."""

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: display .ui for the controls and figures>"


def _slider(description: str, value: int, lo: int, hi: int, step: int = 1) -> widgets.IntSlider:
    return widgets.IntSlider(value=min(max(value, lo), hi), min=lo, max=hi, step=step,
                             description=description, continuous_update=False,
                             style={"description_width": "initial"},
                             layout=widgets.Layout(width="420px"))


# ------------------------------------------------------------------------------ config explorer
@dataclass(repr=False, eq=False)
class ConfigExplorer(_Explorer):
    ui: widgets.VBox  # the sliders, the table and both plots
    experts: widgets.IntSlider  # num_local_experts
    top_k: widgets.IntSlider  # num_experts_per_tok
    interleave: widgets.IntSlider  # interleave_moe_layer_step (1 = every layer MoE)
    hidden: widgets.IntSlider  # hidden_size
    layers: widgets.IntSlider  # num_hidden_layers
    table: widgets.HTML  # totals and memory per format, or the ValueError of an invalid combination
    output: widgets.Output  # shows `figure`
    memory_output: widgets.Output  # shows `memory_figure`
    base: Llama4Config | TextConfig  # the config the sliders start from
    base_params: ParamCount  # count_params(base)
    gpu_gib: float  # the GPU memory the table's "(fits)" compares with
    config: Llama4Config | TextConfig | None = None  # None while the sliders are invalid
    params: ParamCount | None = None  # count_params(config)
    error: str | None = None  # the ValueError's message while the sliders are invalid
    figure: go.Figure | None = None  # total vs active per component (last valid config)
    memory_figure: go.Figure | None = None  # base vs this config at bf16 / fp8 / int4


def _with_text(base: Llama4Config | TextConfig, **changes):
    # moe_layers and no_rope_layers are derived again from the step and interval (and so from
    # the new depth): an explicit list from the base config would not follow the sliders.
    changes.update(moe_layers=None, no_rope_layers=None)
    if isinstance(base, Llama4Config):
        return base.replace_text(**changes)
    return dataclasses.replace(base, **changes)


def _params_table(rows: dict[str, ParamCount], gpu_gib: float) -> str:
    head = "".join(f"<th style='padding:2px 10px'>{html.escape(n)}</th>" for n in rows)
    lines = [("total parameters", lambda pc: human(pc.total)),
             ("active per token", lambda pc: human(pc.active)),
             ("active / total", lambda pc: f"{pc.active / pc.total:.1%}")]
    lines += [(f"weights in {fmt}", lambda pc, fmt=fmt: f"{pc.memory_gib(fmt):,.1f} GiB"
               + (" (fits)" if pc.memory_gib(fmt) <= gpu_gib else "")) for fmt in FORMATS]
    body = "".join(f"<tr><td style='padding:2px 10px'>{label}</td>"
                   + "".join(f"<td style='padding:2px 10px;text-align:right'>{fn(pc)}</td>" for pc in rows.values())
                   + "</tr>" for label, fn in lines)
    return (f"<table><tr><th></th>{head}</tr>{body}</table>"
            f"<small>(fits) = the weights alone fit in one {gpu_gib:g} GiB GPU</small>")


def _refresh_config(ex: ConfigExplorer) -> None:
    try:
        cfg = _with_text(ex.base, num_local_experts=ex.experts.value, num_experts_per_tok=ex.top_k.value,
                         interleave_moe_layer_step=ex.interleave.value, hidden_size=ex.hidden.value,
                         num_hidden_layers=ex.layers.value)
    except ValueError as e:
        ex.config, ex.params, ex.error = None, None, str(e)
        ex.table.value = f"<div style='color:#b00020'><b>Invalid combination:</b> {html.escape(str(e))}</div>"
        ex.output.outputs, ex.memory_output.outputs = (), ()
        return
    ex.config, ex.params, ex.error = cfg, count_params(cfg), None
    base_name = getattr(ex.base, "name", "base")
    ex.table.value = _params_table({f"base ({base_name})": ex.base_params, "this config": ex.params}, ex.gpu_gib)
    ex.figure = param_breakdown(ex.params)
    ex.memory_figure = memory_by_format({f"base ({base_name})": ex.base_params, "this config": ex.params},
                                        ex.gpu_gib)
    show_figure(ex.output, ex.figure)
    show_figure(ex.memory_output, ex.memory_figure)


def config_explorer(base_cfg: Llama4Config | TextConfig, gpu_gib: float = 80.0) -> ConfigExplorer:
    """Sliders for routed experts, top-k, MoE interleave step, hidden width and depth on top of
    `base_cfg`, showing total vs active parameters by component and weight memory at bf16 / fp8 /
    int4 next to the base config. An invalid combination (say top-k > experts) shows the config's
    ValueError instead of the figures. MoE and NoPE layers are derived from the step and interval."""
    check_type("base_cfg", base_cfg, (Llama4Config, TextConfig), "e.g. configs.scout() or configs.get('scout')")
    check_real("gpu_gib", gpu_gib, low=0, low_open=True)
    t = base_cfg.text if isinstance(base_cfg, Llama4Config) else base_cfg
    h_step = max(1, t.hidden_size // 16)
    experts = _slider("routed experts", t.num_local_experts, 1, max(256, t.num_local_experts))
    top_k = _slider("top-k", t.num_experts_per_tok, 1, max(8, t.num_experts_per_tok))
    interleave = _slider("MoE every n-th layer", t.interleave_moe_layer_step, 1, max(4, t.interleave_moe_layer_step))
    hidden = _slider("hidden width d", t.hidden_size, 4 * h_step, 64 * h_step, h_step)
    layers = _slider("layers", t.num_hidden_layers, 1, max(16, 2 * t.num_hidden_layers))
    table, output, memory_output = widgets.HTML(), widgets.Output(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([widgets.VBox([experts, top_k, interleave]), widgets.VBox([hidden, layers])]),
                       table, output, memory_output])
    ex = ConfigExplorer(ui, experts, top_k, interleave, hidden, layers, table, output, memory_output,
                        base_cfg, count_params(base_cfg), gpu_gib)
    for control in (experts, top_k, interleave, hidden, layers):
        control.observe(lambda _change: _refresh_config(ex), names="value")
    _refresh_config(ex)
    return ex


# ------------------------------------------------------------------------------ routing explorer
@dataclass(repr=False, eq=False)
class RoutingExplorer(_Explorer):
    ui: widgets.VBox  # the layer control, the coloured tokens and the plot
    layer: widgets.Dropdown  # the MoE layer shown
    html: widgets.HTML  # token colouring (token_expert_html)
    output: widgets.Output  # shows `figure`
    trace: object  # the RouterTrace of one forward
    tokens: list[str] = field(default_factory=list)  # one printable string per traced token
    figure: go.Figure | None = None  # load bar of the chosen layer


def _refresh_routing(ex: RoutingExplorer) -> None:
    layer, trace = ex.layer.value, ex.trace
    ex.html.value = token_expert_html(ex.tokens, trace.expert_ids(layer), n_experts=trace.n_experts,
                                      gates=trace.gates(layer), logits=trace.logits(layer),
                                      positions=trace.positions(), layer=layer)
    ex.figure = expert_load_bar(trace.load(layer), layer=layer)
    show_figure(ex.output, ex.figure)


def routing_explorer(trace, tokenizer=None) -> RoutingExplorer:
    """A dropdown over the trace's MoE layers: the traced text coloured by each token's top-1
    expert (hover for gates and router scores) and that layer's load per expert.
    tokenizer: anything with token_strings(ids) (ByteTokenizer, HFTokenizer); None shows ids."""
    check_type("trace", trace, RouterTrace, "record one first: `with RouterTrace(model) as trace: model(ids)`")
    if not trace.moe_layers:
        raise ValueError("the trace has no MoE layers to show")
    ids = trace.token_ids().tolist()
    tokens = tokenizer.token_strings(ids) if tokenizer is not None else [str(i) for i in ids]
    layer = widgets.Dropdown(options=[(f"layer {i}", i) for i in trace.moe_layers],
                             value=trace.moe_layers[0], description="MoE layer")
    html_view, output = widgets.HTML(), widgets.Output()
    ex = RoutingExplorer(widgets.VBox([layer, html_view, output]), layer, html_view, output, trace, tokens)
    layer.observe(lambda _change: _refresh_routing(ex), names="value")
    _refresh_routing(ex)
    return ex


# ------------------------------------------------------------------------------ mask explorer
@dataclass(repr=False, eq=False)
class MaskExplorer(_Explorer):
    ui: widgets.VBox  # the sliders and both plots
    chunk: widgets.IntSlider  # attention_chunk_size; 0 = no chunking
    seq_len: widgets.IntSlider  # tokens shown
    floor_scale: widgets.IntSlider  # NoPE temperature: positions per step of the log
    attn_scale: widgets.FloatSlider  # NoPE temperature: the log's coefficient
    mask_output: widgets.Output  # shows `mask_figure`
    temperature_output: widgets.Output  # shows `temperature_figure`
    base: Llama4Config | TextConfig  # the config the sliders start from
    config: TextConfig | None = None  # base text config with the sliders' values
    mask_figure: go.Figure | None = None  # which keys each query sees, chunked and NoPE layers
    temperature_figure: go.Figure | None = None  # the NoPE query scale against position


def _refresh_masks(ex: MaskExplorer) -> None:
    t = ex.base.text if isinstance(ex.base, Llama4Config) else ex.base
    ex.config = dataclasses.replace(t, attention_chunk_size=ex.chunk.value or None,
                                    floor_scale=ex.floor_scale.value, attn_scale=ex.attn_scale.value)
    ex.mask_figure = attention_mask_figure(ex.config, ex.seq_len.value)
    ex.temperature_figure = temperature_curve(ex.config, ex.seq_len.value)
    show_figure(ex.mask_output, ex.mask_figure)
    show_figure(ex.temperature_output, ex.temperature_figure)


def mask_explorer(cfg: Llama4Config | TextConfig, max_len: int = 256) -> MaskExplorer:
    """Sliders for the chunk size (0 = none), sequence length, floor_scale and attn_scale: the
    RoPE (chunked) and NoPE (full causal) masks and the NoPE query temperature over the sequence
    redraw. Sliders stop at `max_len` tokens, so Scout's 8,192 shows as `max_len`."""
    check_type("cfg", cfg, (Llama4Config, TextConfig))
    check_int("max_len", max_len, 2)  # the sequence-length slider starts at 2 tokens
    t = cfg.text if isinstance(cfg, Llama4Config) else cfg
    chunk0 = t.attention_chunk_size or 0
    chunk = _slider("chunk size (0 = none)", chunk0, 0, max_len)
    seq_len = _slider("sequence length", min(3 * chunk0, max_len) if chunk0 else 64, 2, max_len)
    floor_scale = _slider("floor_scale", t.floor_scale, 1, max_len)
    attn_scale = widgets.FloatSlider(value=t.attn_scale, min=0.0, max=1.0, step=0.01, description="attn_scale",
                                     continuous_update=False, style={"description_width": "initial"},
                                     layout=widgets.Layout(width="420px"))
    mask_output, temperature_output = widgets.Output(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([widgets.VBox([chunk, seq_len]), widgets.VBox([floor_scale, attn_scale])]),
                       mask_output, temperature_output])
    ex = MaskExplorer(ui, chunk, seq_len, floor_scale, attn_scale, mask_output, temperature_output, cfg)
    for control in (chunk, seq_len, floor_scale, attn_scale):
        control.observe(lambda _change: _refresh_masks(ex), names="value")
    _refresh_masks(ex)
    return ex
