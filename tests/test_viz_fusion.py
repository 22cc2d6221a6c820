"""minillama4.viz.fusion: figure contents checked against the tensors they show; the widget
checked by setting control values and reading what it exposes."""

import base64
import re
import struct
import zlib

import numpy as np
import pytest
import torch

import minillama4 as ml4
from minillama4 import image, shapes
from minillama4.model import Llama4
from minillama4.viz import fusion
from minillama4.viz.widgets import PLOTLY_MIME

CFG = ml4.configs.tiny_multimodal()
VISION = CFG.vision
tok = ml4.ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return Llama4.random(CFG, seed=0)


def decode_png(uri: str) -> np.ndarray:
    """Our PNG data URI back to a uint8 array [y, x, 3] (no Pillow needed)."""
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", None, None
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()  # filter type 0
    return raw[:, 1:].reshape(h, w, 3)


def test_png_uri_round_trip_and_tiles():
    img = shapes.draw(shapes.Scene("red", "plus", 40, 30, 20), seed=0)
    assert np.array_equal(decode_png(fusion.png_uri(img)), img.permute(1, 2, 0).numpy())
    assert np.array_equal(decode_png(fusion.png_uri(img.permute(1, 2, 0).numpy())), img.permute(1, 2, 0).numpy())
    # a tensor [3, y, 3] is channels-first like every tensor (it was read as a 3-row picture)
    narrow = torch.randint(0, 256, (3, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(decode_png(fusion.png_uri(narrow)), narrow.permute(1, 2, 0).numpy())
    assert np.array_equal(decode_png(fusion.png_uri(narrow.numpy())), narrow.numpy())  # an array: [y, x, c]
    # RGBA bytes were written as RGB (a garbled picture); a 2-D array failed to unpack
    for bad in (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((0, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match=rf"image has shape {re.escape(str(bad.shape))}: expected an RGB"):
            fusion.png_uri(bad)
    px = shapes.pixel_values(img[None], VISION)
    assert fusion.tile_to_uint8(px[0]).equal(img)  # bf16 normalisation is exact for 0..255

    wide = torch.cat([img, img.flip(-1)], dim=-1)  # 84 x 168: 1 x 2 tiles + thumbnail
    tiles, grid = image.preprocess(wide, VISION)
    fig = fusion.tiles_figure(tiles, grid)
    assert grid == (1, 2) and len(fig.data) == 3
    assert [a.text for a in fig.layout.annotations] == ["tile row 0, col 0", "tile row 0, col 1",
                                                        "thumbnail (whole image)"]
    assert np.array_equal(decode_png(fig.data[0].source), img.permute(1, 2, 0).numpy())

    grid_fig = fusion.images_figure(torch.stack([img] * 5), [f"c{i}" for i in range(5)], columns=3)
    assert len(grid_fig.data) == 5 and [a.text for a in grid_fig.layout.annotations] == [f"c{i}" for i in range(5)]


def test_shuffle_groups_match_the_vision_tower():
    groups = fusion.shuffle_groups(VISION)
    assert groups.shape == (9, 4)
    assert groups[0].tolist() == [0, 1, 6, 7] and groups[4].tolist() == [14, 15, 20, 21]
    assert sorted(groups.flatten().tolist()) == list(range(36))
    feats = torch.randn(1, 36, 5)
    from minillama4.vision import pixel_shuffle

    shuffled = pixel_shuffle(feats, VISION.pixel_shuffle_ratio)
    for j, members in enumerate(groups):  # token j = its patches' channels, concatenated in order
        assert shuffled[0, j].equal(feats[0, members].reshape(-1))


def test_pixel_shuffle_figure():
    img = shapes.draw(shapes.Scene("green", "square", 42, 42, 20), seed=0)
    fig = fusion.pixel_shuffle_figure(img, VISION)
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == 2 and np.asarray(heat[0].z).shape == (6, 6) and np.asarray(heat[1].z).shape == (3, 3)
    assert heat[0].dx == 14 and heat[1].dx == 28
    # the tint of each patch is the token it ends up in
    assert np.asarray(heat[0].z)[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert np.asarray(heat[1].customdata)[0, 0] == "0, 1, 6, 7"
    assert "36 patches" in fig.layout.annotations[0].text and "256 channels" in fig.layout.annotations[1].text


def test_token_layout_figure():
    ids = shapes.prompt_ids("colour", VISION) + tok.encode("red<|eot|>")
    strings = tok.token_strings(ids)
    n_prompt = len(shapes.prompt_ids("colour", VISION))
    fig = fusion.token_layout_figure(strings, per_row=10, answer_from=n_prompt)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 10)
    kinds = list(fusion.KIND_COLOURS)
    assert np.asarray(fig.data[0].text)[0, :4].tolist() == ["BOS", "img_start", "image", "patch"]
    assert (z.flatten()[:len(ids)] == [kinds.index(k) for k in
            ["text", "marker", "marker"] + ["patch"] * 9 + ["marker"] + ["text"] * 7 + ["answer"] * 4]).all()
    assert np.isnan(z.flatten()[len(ids):]).all()
    assert "9 patch" in fig.layout.title.text and "4 answer" in fig.layout.title.text
    assert fusion.token_kind("<|tile_x_separator|>") == "marker" and fusion.token_kind("a") == "text"


def test_attention_figures():
    img = shapes.draw(shapes.Scene("blue", "circle", 70, 14, 20), seed=0)
    w = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    fig = fusion.attention_grid_figure(img, w, row_labels=["L0", "L1"], col_labels=["a", "b", "c"])
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == 6 and sum(d.type == "image" for d in fig.data) == 6
    assert np.allclose(heat[4].z, w[1, 1].numpy()) and heat[0].zmax == pytest.approx(float(w.max()))
    assert [a.text for a in fig.layout.annotations][:2] == ["L0 a", "L0 b"]
    assert sum(bool(d.showscale) for d in heat) == 1
    with pytest.raises(ValueError, match="weights"):
        fusion.attention_grid_figure(img, torch.rand(3, 3, 3))
    # the compact form: the image once, plain heatmaps, the object's cell outlined everywhere
    small = fusion.attention_grid_figure(img, w, col_labels=["a", "b", "c"], underlay=False, highlight=(0, 2))
    assert sum(d.type == "image" for d in small.data) == 1 and sum(d.type == "heatmap" for d in small.data) == 6
    assert len(small.to_json()) < len(fig.to_json()) / 3
    assert [a.text for a in small.layout.annotations][:4] == ["image", "a", "b", "c"]
    rects = [s for s in small.layout.shapes if s.type == "rect"]
    assert len(rects) == 7 and {(r.x0, r.x1, r.y0, r.y1) for r in rects} == {(55.5, 83.5, -0.5, 27.5)}
    assert small.layout.yaxis.range == (83.5, -0.5) and small.layout.yaxis8.range == (83.5, -0.5)
    obj = fusion.object_attention_figure(torch.rand(4, 4), uniform=1 / 9)
    assert np.asarray(obj.data[0].z).shape == (4, 4) and "0.11" in obj.layout.title.text


def test_routing_and_accuracy_figures(model):
    data = shapes.make_data(3, VISION, seed=0)
    ids = torch.tensor([shapes.prompt_ids("shape", VISION)] * 3)
    with ml4.RouterTrace(model) as trace:
        model(ids, pixel_values=data.pixels)
    img_load, txt_load = shapes.modality_loads(trace)
    assert img_load.shape == (len(trace.moe_layers), CFG.text.num_local_experts)
    assert (img_load.sum(1) == 27).all() and (txt_load.sum(1) == ids.numel() - 27).all()
    fig = fusion.modality_routing_figure(trace)
    bars = [d for d in fig.data if d.type == "bar"]
    assert len(bars) == 2 * len(trace.moe_layers)
    assert np.allclose(bars[0].y, (img_load[0] / 27).numpy())
    assert "27 image" in fig.layout.title.text

    acc = {"seen": {"colour": 0.9, "shape": 0.5, "position": 0.7}, "held out": {"colour": 0.8, "shape": 0.1}}
    chance = {a: shapes.ShapesConfig().chance(a) for a in shapes.ATTRIBUTES}
    fig = fusion.attribute_accuracy_figure(acc, chance)
    assert list(fig.data[0].y) == [0.9, 0.5, 0.7] and np.isnan(fig.data[1].y[2])
    assert [s.y0 for s in fig.layout.shapes] == pytest.approx(list(chance.values()))
    conf = fusion.confusion_figure(torch.tensor([[3, 1, 0], [0, 2, 2]]), ["a", "b"])
    assert list(conf.data[0].x) == ["a", "b", "other"]


def test_fusion_explorer(model):
    with pytest.raises(TypeError, match="model must be a Llama4, got Llama4Text; a multimodal model"):
        fusion.fusion_explorer(model.language_model)  # the text half has no image path
    ex = fusion.fusion_explorer(model, questions=("colour", "position", "caption"), max_new_tokens=6)
    assert list(ex.said) == ["colour", "position", "caption"] and all(len(a) <= 6 for a in ex.said.values())
    assert [o[1] for o in ex.question.options] == ["colour", "position", "caption"]
    assert ex.image.shape == (3, 84, 84)
    heat = [d for d in ex.figure.data if d.type == "heatmap"]
    assert len(heat) == CFG.text.num_attention_heads + 1  # heads + mean
    mean = np.asarray(heat[-1].z)
    assert np.allclose(mean, np.mean([np.asarray(h.z) for h in heat[:-1]], axis=0), atol=1e-6)
    shown = ex.output.outputs[0]["data"][PLOTLY_MIME]
    assert shown["layout"]["title"]["text"] == ex.figure.layout.title.text

    ex.colour.value, ex.x.value, ex.y.value = "blue", 70, 70  # bottom right
    assert "bottom right" in ex.answers.value and "<td>blue</td>" in ex.answers.value
    assert ex.image[2, 70, 70] > ex.image[0, 70, 70]  # blue pixel where the shape now is
    ex.layer.value, ex.question.value = 0, "position"
    assert "Layer 0" in ex.figure.layout.title.text and "where?" in ex.figure.layout.title.text


def test_fusion_figures_refuse_inputs_that_do_not_fit_together():
    img = shapes.draw(shapes.Scene("red", "plus", 40, 30, 20), seed=0)
    with pytest.raises(ValueError, match="images is empty: expected at least one image"):
        fusion.images_figure([])
    with pytest.raises(ValueError, match="columns=0: must be a positive integer"):
        fusion.images_figure([img], columns=0)
    with pytest.raises(ValueError, match=r"captions has 1 entries, expected 2 \(one per image\)"):
        fusion.images_figure([img, img], captions=["a"])  # the second image went unlabelled
    px = shapes.pixel_values(torch.stack([img, img]), VISION)
    with pytest.raises(ValueError, match=r"pixel_values holds 2 tiles for grid=\(3, 3\): expected 9 tiles, "
                                         "or 10 with the thumbnail"):
        fusion.tiles_figure(px, (3, 3))
    with pytest.raises(ValueError, match=r"grid=\(0, 2\): expected \(rows, cols\) of positive integers"):
        fusion.tiles_figure(px, (0, 2))
    assert len(fusion.tiles_figure(px, (1, 2)).data) == 2  # no thumbnail: still drawn
    with pytest.raises(ValueError, match="per_row=0: must be a positive integer"):
        fusion.token_layout_figure(["a"], per_row=0)
    with pytest.raises(ValueError, match=r"matrix has shape \(3, 3\): expected \[2, 2\] or \[2, 3\] for 2 options"):
        fusion.confusion_figure(torch.ones(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="chance is empty: expected {attribute: chance level}"):
        fusion.attribute_accuracy_figure({"m": {"colour": 0.5}}, {})  # was an empty figure
    with pytest.raises(ValueError, match=r"accuracy\['m'\] has attributes \['size'\] that chance lacks"):
        fusion.attribute_accuracy_figure({"m": {"colour": 0.5, "size": 0.2}}, {"colour": 0.25})
