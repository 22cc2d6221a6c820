"""Figures and a widget for early fusion (notebook 04): how an image becomes tokens, and what a
trained model does with them.

    from minillama4.viz import fusion
    fusion.images_figure(images, captions)            # a few images of the shapes data set
    fusion.tiles_figure(pixel_values, (1, 2))         # tiles (+ thumbnail) as the model gets them
    fusion.pixel_shuffle_figure(image, vision_cfg)    # 6x6 patches -> 3x3 tokens, coloured by token
    fusion.token_layout_figure(tokenizer.token_strings(ids))
    fusion.attention_grid_figure(image, maps.to_image(layer)[:, 0], ...)   # attention over the patches
    fusion.modality_routing_figure(trace)             # experts chosen by image vs text tokens
    fusion.attribute_accuracy_figure({...}, chance)
    fusion.fusion_explorer(model)                     # sliders: draw a shape, see answers + attention

Images are drawn as PNG data URIs (encoded here with zlib, no Pillow), so a figure with many
images stays small in the notebook. Pure builders: the same inputs give the same figure.

Axes: c colour channels, y x pixel rows / columns, L layers, h heads, e experts, n tokens,
side = tokens along one side of a tile's token grid.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import shapes as sh
from ..attention_maps import record_attention
from ..config import VisionConfig
from ..model import Llama4
from ..vision import pixel_shuffle
from ..checks import check_int, check_type, is_int
from .plots import _array, _check_len, _style, expert_colours
from .widgets import _Explorer, _slider, show_figure

KIND_COLOURS = {"text": "#dbe7f6", "marker": "#f6d8a8", "patch": "#b9e3c6", "answer": "#f4c7d0"}
MARKERS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
SHORT = {"<|begin_of_text|>": "BOS", "<|image_start|>": "img_start", "<|image_end|>": "img_end",
         "<|image|>": "image", "<|tile_x_separator|>": "tile_x", "<|tile_y_separator|>": "tile_y",
         "<|patch|>": "patch", "<|eot|>": "EOT", "<|finetune_right_pad|>": "pad"}
ATTENTION_SCALE = "Magma"


# ------------------------------------------------------------------------------ images
def png_uri(image) -> str:
    """uint8 image [c, y, x] (or [y, x, c] numpy) -> a 'data:image/png;base64,...' URI."""
    a = _array(image)
    # a tensor is [c, y, x] (torch's layout); an array is [y, x, c] unless only its first axis can
    # be the channels ([3, y, 3] used to be read as a 3-row picture even when it came as a tensor)
    channels_first = isinstance(image, torch.Tensor) or (a.ndim == 3 and a.shape[-1] not in (1, 3))
    if a.ndim == 3 and channels_first and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    # a 4-channel image was written as RGB with its bytes misread (a garbled picture), a 2-D one failed
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"image has shape {tuple(_array(image).shape)}: expected an RGB or one-channel "
                         "image [c, y, x] or [y, x, c] with c 1 or 3 and at least one pixel")
    a = np.ascontiguousarray(np.clip(a, 0, 255).astype(np.uint8))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def tile_to_uint8(tile: torch.Tensor) -> torch.Tensor:
    """A normalised tile [c, S, S] ((x / 255 - 0.5) / 0.5) back to uint8 pixels."""
    return ((tile.float() * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)


def _image_trace(image) -> go.Image:
    return go.Image(source=png_uri(image), hoverinfo="skip")


def _hide_axes(fig: go.Figure) -> None:
    """Image panels: no ticks or grid, y pointing down (row 0 at the top), square pixels."""
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    for name in fig.layout:
        if name.startswith("yaxis"):
            fig.layout[name].scaleanchor = "x" + name[len("yaxis"):]


def _grid_lines(fig: go.Figure, size: int, step: int, row=None, col=None, colour="rgba(255,255,255,0.6)",
                width: float = 1.0) -> None:
    for k in range(0, size + 1, step):
        for kw in (dict(x0=k - 0.5, x1=k - 0.5, y0=-0.5, y1=size - 0.5),
                   dict(y0=k - 0.5, y1=k - 0.5, x0=-0.5, x1=size - 0.5)):
            fig.add_shape(type="line", line=dict(color=colour, width=width), row=row, col=col, **kw)


def images_figure(images, captions: list[str] | None = None, *, columns: int = 4,
                  title: str = "The shapes data set") -> go.Figure:
    """A grid of uint8 images [n, c, y, x] with an optional caption above each."""
    check_int("columns", columns, 1)
    images = list(images)
    if not images:
        raise ValueError("images is empty: expected at least one image [c, y, x]")
    if captions is not None:  # fewer captions used to leave the last images unlabelled
        _check_len("captions", len(captions), len(images), "image")
    rows = math.ceil(len(images) / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=captions, horizontal_spacing=0.02,
                        vertical_spacing=0.08 if captions else 0.02)
    for i, im in enumerate(images):
        fig.add_trace(_image_trace(im), row=i // columns + 1, col=i % columns + 1)
    _hide_axes(fig)
    fig.update_annotations(font_size=12)
    return _style(fig, title, height=60 + 210 * rows, width=200 * columns + 60)


def tiles_figure(pixel_values: torch.Tensor, grid: tuple[int, int], *, title: str | None = None) -> go.Figure:
    """The tiles the model gets for one image (pixel_values [n, c, S, S], normalised), labelled
    by their place in the rows x cols grid; a last extra tile is the global thumbnail."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(is_int(g) and g >= 1 for g in grid)):
        raise ValueError(f"grid={grid!r}: expected (rows, cols) of positive integers, as image.preprocess returns")
    rows, cols = grid
    n = pixel_values.shape[0]
    if n not in (rows * cols, rows * cols + 1):  # the tiles were labelled with the wrong places
        raise ValueError(f"pixel_values holds {n} tiles for grid={tuple(grid)}: expected {rows * cols} tiles, "
                         f"or {rows * cols + 1} with the thumbnail")
    names = [f"tile row {i // cols}, col {i % cols}" for i in range(rows * cols)]
    if n > rows * cols:
        names.append("thumbnail (whole image)")
    fig = make_subplots(rows=1, cols=n, subplot_titles=names, horizontal_spacing=0.03)
    for i in range(n):
        fig.add_trace(_image_trace(tile_to_uint8(pixel_values[i])), row=1, col=i + 1)
    _hide_axes(fig)
    side = pixel_values.shape[-1]
    return _style(fig, title or f"{n} tile{'s' if n > 1 else ''} of {side} x {side} px, in prompt order",
                  height=300, width=260 * n + 60)


# ------------------------------------------------------------------------------ pixel shuffle
def shuffle_groups(cfg: VisionConfig) -> torch.Tensor:
    """[tokens_per_tile, r * r]: which patches (row-major index on the patch grid) pixel shuffle
    merges into each token, in the order their channels are concatenated. Computed by running
    minillama4.vision.pixel_shuffle on the patch indices themselves."""
    side = cfg.image_size // cfg.patch_size
    idx = torch.arange(side * side, dtype=torch.float64).reshape(1, side * side, 1)
    return pixel_shuffle(idx, cfg.pixel_shuffle_ratio)[0].round().long()


def pixel_shuffle_figure(image, cfg: VisionConfig) -> go.Figure:
    """Left: the tile cut into patch_size patches (numbered, tinted by the token they end up in).
    Right: after the pixel shuffle, each r x r block of patches is one token of r^2 times the
    channels (numbered; the patches it holds listed on hover)."""
    groups = shuffle_groups(cfg)
    side, p = cfg.image_size // cfg.patch_size, cfg.patch_size
    r = round(1 / cfg.pixel_shuffle_ratio)
    token_of = torch.empty(side * side, dtype=torch.long)
    for j, members in enumerate(groups):
        token_of[members] = j
    w, t = cfg.hidden_size, groups.shape[0]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.06, subplot_titles=[
        f"before: {side} x {side} = {side * side} patches of {p} px, {w} channels each",
        f"after: {t} tokens ({r}x{r} patches each), {w * r * r} channels each"])
    colours = expert_colours(t)
    for col in (1, 2):
        fig.add_trace(_image_trace(image), row=1, col=col)
    # left: a tint per destination token, patch numbers
    tint = np.array([[token_of[y * side + x].item() for x in range(side)] for y in range(side)], dtype=float)
    scale = [[j / max(t - 1, 1), c] for j, c in enumerate(colours)]
    fig.add_trace(go.Heatmap(z=tint, x0=p / 2 - 0.5, dx=p, y0=p / 2 - 0.5, dy=p, colorscale=scale, opacity=0.35,
                             showscale=False, hovertemplate="patch %{text}<extra></extra>",
                             text=np.arange(side * side).reshape(side, side),
                             texttemplate="%{text}", textfont=dict(color="white", size=10)), row=1, col=1)
    _grid_lines(fig, cfg.image_size, p, row=1, col=1)
    # right: token grid, token numbers, member patches on hover
    tside = side // r
    members = np.array([", ".join(map(str, g.tolist())) for g in groups]).reshape(tside, tside)
    fig.add_trace(go.Heatmap(z=np.arange(t, dtype=float).reshape(tside, tside), x0=r * p / 2 - 0.5, dx=r * p,
                             y0=r * p / 2 - 0.5, dy=r * p, colorscale=scale, opacity=0.35, showscale=False,
                             text=np.arange(t).reshape(tside, tside), customdata=members,
                             texttemplate="token %{text}", textfont=dict(color="white", size=12),
                             hovertemplate="token %{text}: patches %{customdata}<extra></extra>"), row=1, col=2)
    _grid_lines(fig, cfg.image_size, r * p, row=1, col=2, width=2)
    _hide_axes(fig)
    return _style(fig, "Pixel shuffle: neighbouring patches merge into one token", height=430, width=860)


# ------------------------------------------------------------------------------ token layout
def token_kind(token: str) -> str:
    """'patch', 'marker' (image structure tokens) or 'text'."""
    if token == "<|patch|>":
        return "patch"
    return "marker" if token in MARKERS else "text"


def token_layout_figure(tokens: list[str], *, per_row: int = 16, answer_from: int | None = None,
                        title: str | None = None) -> go.Figure:
    """The token sequence as a grid of boxes, read left to right then down, coloured by kind:
    text, image markers (<|image_start|>, <|image|>, separators, <|image_end|>), <|patch|> slots
    (replaced by image features), and answer tokens (from index `answer_from`)."""
    check_int("per_row", per_row, 1)
    kinds = [token_kind(t) for t in tokens]
    if answer_from is not None:
        kinds = [k if i < answer_from else "answer" for i, k in enumerate(kinds)]
    order = list(KIND_COLOURS)
    n, rows = len(tokens), math.ceil(len(tokens) / per_row)
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    hover = np.full((rows, per_row), "", dtype=object)
    for i, (tk, kind) in enumerate(zip(tokens, kinds)):
        r, c = divmod(i, per_row)
        z[r, c] = order.index(kind)
        text[r, c] = SHORT.get(tk, tk if tk != " " else "␣")
        hover[r, c] = f"position {i}: {html.escape(tk)} ({kind})"
    scale = []
    for j, kind in enumerate(order):
        scale += [[j / len(order), KIND_COLOURS[kind]], [(j + 1) / len(order), KIND_COLOURS[kind]]]
    fig = go.Figure(go.Heatmap(z=z, text=text, customdata=hover, texttemplate="%{text}", colorscale=scale,
                               zmin=-0.5, zmax=len(order) - 0.5, showscale=False, xgap=2, ygap=2,
                               hovertemplate="%{customdata}<extra></extra>", textfont=dict(size=11)))
    for kind in order:  # legend entries
        if kind in kinds:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=kind,
                                     marker=dict(size=12, symbol="square", color=KIND_COLOURS[kind])))
    fig.update_yaxes(autorange="reversed", tickvals=list(range(rows)),
                     ticktext=[f"{r * per_row}" for r in range(rows)], title="first position")
    fig.update_xaxes(showticklabels=False, showgrid=False)
    counts = {k: kinds.count(k) for k in order if k in kinds}
    return _style(fig, title or f"{n} tokens: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
                  height=90 + 42 * rows, width=60 + 62 * per_row, legend=dict(orientation="h", y=-0.15))


# ------------------------------------------------------------------------------ attention
def _attention_heatmap(weights: np.ndarray, cell: float, zmax: float, showscale: bool, opacity: float) -> go.Heatmap:
    return go.Heatmap(z=weights, x0=cell / 2 - 0.5, dx=cell, y0=cell / 2 - 0.5, dy=cell, zmin=0, zmax=zmax,
                      colorscale=ATTENTION_SCALE, opacity=opacity, showscale=showscale,
                      colorbar=dict(title="weight", len=0.8) if showscale else None,
                      hovertemplate="token row %{y}, col %{x}: %{z:.3f}<extra></extra>",
                      text=np.round(weights, 2), texttemplate="%{text:.2f}", textfont=dict(size=9, color="white"))


def attention_grid_figure(image, weights, *, row_labels: list[str] | None = None,
                          col_labels: list[str] | None = None, underlay: bool = True,
                          highlight: tuple[int, int] | None = None,
                          title: str = "Text-to-image attention") -> go.Figure:
    """Attention over the image tokens: weights [rows, cols, side, side] (e.g. layers x heads,
    each the weight one query puts on each image token of one tile), one panel per (row, col),
    all on one colour scale, in the image's pixel coordinates (token cells of image_size / side px).
    underlay=True draws every panel over the image; underlay=False draws the image once, in an
    extra first column, and the panels as plain heatmaps (a much smaller figure). `highlight`
    outlines one token cell (row, col) in every panel, e.g. the one holding the object."""
    w = _array(weights).astype(float)
    if w.ndim == 2:
        w = w[None, None]
    if w.ndim != 4:
        raise ValueError(f"weights must be [rows, cols, side, side], got shape {w.shape}")
    nr, nc, side, _ = w.shape
    size = _array(image).shape[-1]
    cell, first = size / side, 1 if underlay else 2
    titles = []
    for r in range(nr):
        if not underlay:
            titles.append("image" if r == 0 else "")
        titles += [f"{row_labels[r] if row_labels else ''} {col_labels[c] if col_labels else ''}".strip()
                   for c in range(nc)]
    fig = make_subplots(rows=nr, cols=nc + first - 1, subplot_titles=titles, horizontal_spacing=0.015,
                        vertical_spacing=0.06)
    zmax = float(w.max()) if w.size else 1.0
    if not underlay:
        fig.add_trace(_image_trace(image), row=1, col=1)
    for r in range(nr):
        for c in range(nc):
            if underlay:
                fig.add_trace(_image_trace(image), row=r + 1, col=c + 1)
            fig.add_trace(_attention_heatmap(w[r, c], cell, zmax, r == 0 and c == nc - 1, 0.6 if underlay else 1.0),
                          row=r + 1, col=c + first)
    _hide_axes(fig)
    for name in fig.layout:  # every panel spans the image, whether it holds the image or not
        if name.startswith("xaxis"):
            fig.layout[name].update(range=[-0.5, size - 0.5], autorange=False)
        elif name.startswith("yaxis"):
            fig.layout[name].update(range=[size - 0.5, -0.5], autorange=False)  # row 0 at the top
    if highlight is not None:
        hr, hc = highlight
        for r in range(nr):
            for c in range(nc + first - 1):
                if underlay or c > 0 or r == 0:
                    fig.add_shape(type="rect", x0=hc * cell - 0.5, x1=(hc + 1) * cell - 0.5, y0=hr * cell - 0.5,
                                  y1=(hr + 1) * cell - 0.5, line=dict(color="#00e5ff", width=2), row=r + 1, col=c + 1)
    fig.update_annotations(font_size=11)
    return _style(fig, title, height=80 + 190 * nr, width=40 + 175 * (nc + first - 1) + 80)


def object_attention_figure(share, *, uniform: float, title: str | None = None) -> go.Figure:
    """share [L, h]: the mean fraction of a query's image attention that lands on the image token
    holding the object (a heatmap per layer and head), against `uniform` (spreading evenly)."""
    s = _array(share).astype(float)
    fig = go.Figure(go.Heatmap(z=s, x=[f"head {j}" for j in range(s.shape[1])],
                               y=[f"layer {i}" for i in range(s.shape[0])],
                               colorscale="Blues", zmin=0, zmax=1, text=np.round(s, 2), texttemplate="%{text:.2f}",
                               colorbar=dict(title="share")))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title or f"Share of image attention on the object's token (uniform = {uniform:.2f})",
                  height=320, width=560)


# ------------------------------------------------------------------------------ routing, accuracy
def modality_routing_figure(trace, *, title: str | None = None) -> go.Figure:
    """One panel per MoE layer: the share of image tokens and of text tokens sent to each expert."""
    image_load, text_load = (a.float() for a in sh.modality_loads(trace))
    layers, e = trace.moe_layers, image_load.shape[1]
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {i}" for i in layers], shared_yaxes=True)
    for j, layer in enumerate(layers):
        for name, load, colour in (("image tokens", image_load[j], "#2ca02c"),
                                   ("text tokens", text_load[j], "#1f77b4")):
            share = (load / load.sum().clamp(min=1)).numpy()
            fig.add_trace(go.Bar(x=[f"E{k}" for k in range(e)], y=share, name=name, marker_color=colour,
                                 showlegend=j == 0, legendgroup=name,
                                 hovertemplate=f"{name}, layer {layer}, %{{x}}: %{{y:.2f}}<extra></extra>"),
                          row=1, col=j + 1)
    fig.update_yaxes(title_text="share of tokens", row=1, col=1, range=[0, 1])
    n_img, n_txt = int(trace.is_image().sum()), int((~trace.is_image()).sum())
    return _style(fig, title or f"Which experts image and text tokens go to ({n_img} image, {n_txt} text tokens)",
                  height=340, width=220 * len(layers) + 120, barmode="group")


def attribute_accuracy_figure(accuracy: Mapping[str, Mapping[str, float]], chance: Mapping[str, float], *,
                              title: str = "Accuracy per attribute") -> go.Figure:
    """Grouped bars: accuracy[group][attribute] (e.g. group = "seen pairs", "held-out pairs"),
    with each attribute's chance level as a dashed black line across its group of bars."""
    check_type("chance", chance, Mapping, "{attribute: chance level}, e.g. {a: ShapesConfig().chance(a) ...}")
    check_type("accuracy", accuracy, Mapping, "{group: {attribute: accuracy}}")
    if not chance:
        raise ValueError("chance is empty: expected {attribute: chance level} for every attribute to draw")
    attrs = list(chance)
    for name, acc in accuracy.items():  # an attribute missing from chance was left out of the figure
        extra = [a for a in acc if a not in chance]
        if extra:
            raise ValueError(f"accuracy[{name!r}] has attributes {extra} that chance lacks (chance has {attrs})")
    fig = go.Figure([go.Bar(x=attrs, y=[acc.get(a, float("nan")) for a in attrs], name=name,
                            text=[f"{acc.get(a, float('nan')):.0%}" for a in attrs], textposition="outside")
                     for name, acc in accuracy.items()])
    for i, a in enumerate(attrs):
        fig.add_shape(type="line", x0=i - 0.45, x1=i + 0.45, y0=chance[a], y1=chance[a],
                      line=dict(color="black", dash="dash", width=2))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="chance", line=dict(color="black", dash="dash")))
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    return _style(fig, title, "attribute", "exact answers", height=380, barmode="group")


def confusion_figure(matrix, options: list[str], *, title: str = "Confusion") -> go.Figure:
    """A confusion matrix [options, options (+1 'other')] as a heatmap: row = truth, column = answer."""
    m = _array(matrix)
    n = len(options)
    if m.ndim != 2 or m.shape[0] != n or m.shape[1] not in (n, n + 1):
        raise ValueError(f"matrix has shape {m.shape}: expected [{n}, {n}] or [{n}, {n + 1}] "
                         f"for {n} options (rows = truth, columns = answer, + 'other')")
    cols = list(options) + (["other"] if m.shape[1] > len(options) else [])
    fig = go.Figure(go.Heatmap(z=m, x=cols, y=list(options), colorscale="Blues", text=m, texttemplate="%{text}",
                               colorbar=dict(title="count")))
    fig.update_yaxes(autorange="reversed", title="truth")
    fig.update_xaxes(title="model's answer")
    return _style(fig, title, height=340, width=520)


# ------------------------------------------------------------------------------ widget
@dataclass(repr=False, eq=False)
class FusionExplorer(_Explorer):
    ui: widgets.VBox  # the controls, the answer table and the attention plot
    colour: widgets.Dropdown  # the drawn shape's colour
    shape: widgets.Dropdown  # the drawn shape's kind
    x: widgets.IntSlider  # the shape's centre column in pixels
    y: widgets.IntSlider  # the shape's centre row in pixels
    size: widgets.IntSlider  # the shape's size in pixels
    question: widgets.Dropdown  # the question whose attention is shown
    layer: widgets.Dropdown  # the decoder layer whose attention is shown
    answers: widgets.HTML  # the model's answers to every question, against the truth
    output: widgets.Output  # shows `figure`
    model: object  # the trained image+text model (Llama4)
    shapes_cfg: object  # shapes.ShapesConfig: image size, colours and shapes it was trained on
    questions: tuple  # the questions answered in the table
    max_new_tokens: int  # longest answer decoded
    image: torch.Tensor | None = None  # the drawn image [c, y, x] uint8
    said: dict | None = None  # question -> the model's answer
    figure: go.Figure | None = None  # attention of the question's last token, per head + mean


def _refresh_fusion(ex: FusionExplorer) -> None:
    cfg = ex.shapes_cfg
    scene = sh.Scene(ex.colour.value, ex.shape.value, ex.x.value, ex.y.value, ex.size.value)
    ex.image = sh.draw(scene, cfg, seed=0)
    px = sh.pixel_values(ex.image[None], ex.model.config.vision)
    ex.said = {q: sh.ask(ex.model, px, q, ex.max_new_tokens)[0] for q in ex.questions}
    rows = "".join(
        f"<tr><td><code>{html.escape(sh.QUESTIONS[q])}</code></td><td><b>{html.escape(a)}</b></td>"
        f"<td>{html.escape(scene.answer(q, cfg))}</td><td>{'✅' if a == scene.answer(q, cfg) else '❌'}</td></tr>"
        for q, a in ex.said.items())
    ex.answers.value = ("<table><tr><th>question</th><th>model</th><th>truth</th><th></th></tr>" + rows + "</table>")
    ids = torch.tensor([sh.prompt_ids(ex.question.value, ex.model.config.vision)])
    layer = ex.layer.value
    maps = record_attention(ex.model, ids, pixel_values=px, layers=[layer])
    grid = maps.to_image(layer)[:, 0]  # [h, side, side], the one tile
    weights = torch.cat([grid, grid.mean(0, keepdim=True)])[None]
    ex.figure = attention_grid_figure(
        ex.image, weights, col_labels=[f"head {j}" for j in range(grid.shape[0])] + ["mean"],
        title=f"Layer {layer}: attention of the last token of {sh.QUESTIONS[ex.question.value]!r} "
              f"over the image tokens "
              f"(image share {float(weights[0, -1].sum()):.0%})")
    show_figure(ex.output, ex.figure)


def fusion_explorer(model, shapes_cfg=None, questions=None, max_new_tokens: int = 30) -> FusionExplorer:
    """Draw a scene with dropdowns and sliders (colour, shape, centre x / y, size); see the
    model's greedy answers to `questions` (default: all of shapes.QUESTIONS) and, for the chosen
    question and layer, the attention of the question's last token over the image tokens, per
    head and averaged."""
    check_type("model", model, Llama4, "a multimodal model, e.g. the one this notebook trains on shapes")
    cfg = shapes_cfg or sh.ShapesConfig()
    questions = tuple(questions or sh.QUESTIONS)
    colour = widgets.Dropdown(options=list(cfg.colours), value=cfg.colours[0], description="colour")
    shape = widgets.Dropdown(options=list(cfg.shapes), value=cfg.shapes[0], description="shape")
    x0, y0 = sh.cell_centre("top left", cfg)
    x = _slider("centre x (px)", x0, 0, cfg.image_size - 1)
    y = _slider("centre y (px)", y0, 0, cfg.image_size - 1)
    size = _slider("size (px)", (cfg.min_size + cfg.max_size) // 2, 6, cfg.cell)
    question = widgets.Dropdown(options=[(sh.QUESTIONS[q], q) for q in questions], value=questions[0],
                                description="attention of")
    n_layers = model.config.text.num_hidden_layers
    layer = widgets.Dropdown(options=[(f"layer {i}", i) for i in range(n_layers)], value=n_layers - 1,
                             description="layer")
    answers, output = widgets.HTML(), widgets.Output()
    ui = widgets.VBox([widgets.HBox([widgets.VBox([colour, shape, question, layer]), widgets.VBox([x, y, size])]),
                       answers, output])
    ex = FusionExplorer(ui, colour, shape, x, y, size, question, layer, answers, output, model, cfg, questions,
                        max_new_tokens)
    for control in (colour, shape, x, y, size, question, layer):
        control.observe(lambda _change: _refresh_fusion(ex), names="value")
    _refresh_fusion(ex)
    return ex
