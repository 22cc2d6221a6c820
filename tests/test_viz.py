"""minillama4.viz: figure builders checked on shapes and contents; widgets checked by setting
control values and reading the figures they expose (no browser, no kernel)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import minillama4 as ml4
from minillama4 import viz
from minillama4.attention import attention_mask, nope_temperature
from minillama4.layers import rope_inv_freq
from minillama4.viz.widgets import PLOTLY_MIME

TEXT = "The router picks <b>experts</b>\n"


@pytest.fixture(scope="module")
def traced():
    model = ml4.Llama4Text.random(ml4.configs.tiny(), seed=1)
    tok = ml4.ByteTokenizer()
    ids = torch.tensor([tok.encode(TEXT, bos=True)])
    with ml4.RouterTrace(model) as trace:
        model(ids)
    return trace, tok, tok.token_strings(trace.token_ids().tolist())


def shown(output):
    """The plotly JSON an Output widget holds (what JupyterLab draws)."""
    (out,) = output.outputs
    return out["data"][PLOTLY_MIME]


# ------------------------------------------------------------------------------ figures
def test_expert_colours():
    assert len(set(viz.expert_colours(4))) == 4 and len(set(viz.expert_colours(16))) == 16
    assert len(set(viz.expert_colours(128))) == 128
    assert viz.expert_colours(4) == viz.expert_colours(4)[:4]


def test_load_heatmap_and_bar(traced):
    trace, _, _ = traced
    lm = trace.load_matrix()
    fig = viz.expert_load_heatmap(lm, trace.moe_layers)
    assert len(fig.data) == 1 and np.array_equal(fig.data[0].z, lm.numpy())
    assert list(fig.data[0].y) == [f"layer {i}" for i in trace.moe_layers]
    assert fig.layout.xaxis.title.text == "expert" and fig.layout.yaxis.title.text == "MoE layer"
    with pytest.raises(ValueError, match="layer labels"):
        viz.expert_load_heatmap(lm, [0])

    bar = viz.expert_load_bar(trace.load(1), layer=1)
    assert list(bar.data[0].y) == trace.load(1).tolist()
    assert list(bar.data[0].marker.color) == viz.expert_colours(4)
    assert bar.layout.shapes[0].y0 == pytest.approx(trace.load(1).float().mean().item())
    assert "layer 1" in bar.layout.title.text and "max/mean" in bar.layout.title.text
    with pytest.raises(ValueError, match=r"load must be one layer's tokens per expert \[experts\].*\(2, 4\)"):
        viz.expert_load_bar(torch.ones(2, 4))  # drew 2 "experts"


def test_token_colouring_figure(traced):
    trace, _, tokens = traced
    ids = trace.expert_ids(0)
    fig = viz.token_expert_colouring(tokens, ids, 0, n_experts=4, gates=trace.gates(0),
                                     logits=trace.logits(0), width=8)
    z = [v for row in fig.data[0].z for v in row]
    assert len(fig.data[0].z) == -(-len(tokens) // 8) and len(fig.data[0].z[0]) == 8
    assert z[:len(tokens)] == ids[:, 0].tolist() and all(v is None for v in z[len(tokens):])
    text = [v for row in fig.data[0].text for v in row]
    assert text[0] == "&lt;|beg…" and text[1] == "T" and text[4] == "␣"  # long ones cut, spaces shown
    assert "&lt;|begin_of_text|&gt;" in fig.data[0].customdata[0][0]
    assert "gate" in fig.data[0].customdata[0][1] and "sigmoid(logit)" in fig.data[0].customdata[0][1]
    assert (fig.data[0].zmin, fig.data[0].zmax) == (-0.5, 3.5)
    assert "layer 0" in fig.layout.title.text


def test_token_html(traced):
    trace, _, tokens = traced
    ids, colours = trace.expert_ids(2), viz.expert_colours(4)
    page = viz.token_expert_html(tokens, ids, n_experts=4, gates=trace.gates(2), logits=trace.logits(2), layer=2)
    spans = page.split("<span ")[1 + 4:]  # after the 4-chip legend
    assert len(spans) == len(tokens)
    for span, e in zip(spans, ids[:, 0].tolist()):
        assert f"background:{colours[e]}" in span
    assert "&lt;b&gt;experts" not in page  # tokens are bytes: '<', 'b', '>' are separate spans
    assert ">&lt;<" in page and "<b>experts" not in page  # escaped, never live HTML
    assert "router score sigmoid(logit)" in page and "gate 0." in page
    # the hover lists every expert's sigmoid score, best first, the chosen one starred
    s = torch.sigmoid(trace.logits(2)[1])
    best = int(s.argmax())
    assert f"E{best} {s[best]:.2f}*" in spans[1]


def test_router_score_histogram(traced):
    trace, _, _ = traced
    n = len(trace.token_ids())
    fig = viz.router_score_histogram(trace.logits(0), layer=0)
    assert len(fig.data) == 4 and all(len(d.x) == n for d in fig.data)
    assert [d.marker.color for d in fig.data] == viz.expert_colours(4)
    assert len({(d.xbins.start, d.xbins.size) for d in fig.data}) == 1  # shared bins
    gates = viz.router_score_histogram(trace.gates(0), trace.expert_ids(0), n_experts=4, label="sigmoid gate")
    assert [len(d.x) for d in gates.data] == trace.load(0).tolist()
    assert gates.layout.xaxis.title.text == "sigmoid gate" and gates.layout.barmode == "overlay"


def test_domain_expert_preference():
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    fig = viz.domain_expert_preference(ids, [0, 0, 0, 0, 1, 1, 1, 1], 4, ["code", "prose"])
    z = np.asarray(fig.data[0].z)
    assert z.shape == (2, 4) and np.allclose(z.sum(1), 1)
    assert np.allclose(z, [[0.5, 0.25, 0.25, 0], [0, 0, 0.5, 0.5]])
    assert list(fig.data[0].y) == ["code", "prose"]
    by_name = viz.domain_expert_preference(ids[:, None], ["code"] * 4 + ["prose"] * 4, 4)
    assert np.allclose(by_name.data[0].z, z) and list(by_name.data[0].y) == ["code", "prose"]


def test_attention_mask_figure_shows_chunks():
    cfg = ml4.configs.tiny()  # chunk 32, layer 3 is NoPE
    fig = viz.attention_mask_figure(cfg, 70)
    rope, nope = (np.asarray(d.z) for d in fig.data)
    pos = torch.arange(70)
    assert np.array_equal(rope, attention_mask(pos, pos, 32).int().numpy())
    assert np.array_equal(nope, np.tril(np.ones((70, 70), dtype=int)))
    assert rope[40, 32] == 1 and rope[40, 31] == 0 and nope[40, 31] == 1  # the chunk boundary at 32
    titles = [a.text for a in fig.layout.annotations]
    assert fig.layout.yaxis.title.text == "query position" and fig.layout.xaxis2.title.text == "key position"
    assert "chunk 32" in titles[0] and "RoPE layers 0, 1, 2" in titles[0] and "NoPE layers 3" in titles[1]
    unchunked = viz.attention_mask_figure(cfg.replace_text(attention_chunk_size=None), 40)
    assert np.array_equal(unchunked.data[0].z, unchunked.data[1].z)


def test_temperature_and_rope_frequencies():
    cfg = ml4.configs.tiny()  # floor_scale 32
    fig = viz.temperature_curve(cfg, 100)
    x, y = np.asarray(fig.data[0].x), np.asarray(fig.data[0].y)
    assert len(x) == 100 and np.allclose(y, nope_temperature(torch.arange(100), 32, 0.1).numpy())
    assert y[30] == 1 and y[31] > 1 and fig.layout.shapes[0].x0 == 31
    assert fig.layout.xaxis.title.text == "absolute position p"
    long = viz.temperature_curve(ml4.configs.scout(), 1_000_000)
    assert len(long.data[0].x) < 5000 and 8191 in long.data[0].x and 8190 in long.data[0].x

    scout = ml4.configs.scout()
    rope = viz.rope_frequencies(scout)
    plain = rope_inv_freq(ml4.configs.maverick().text)  # same theta and head_dim, no scaling
    assert np.allclose(rope.data[0].y, plain.numpy()) and np.allclose(rope.data[1].y, rope_inv_freq(scout.text))
    assert np.isclose(rope.data[1].y[-1], plain[-1].item() / 16) and rope.data[1].y[0] == rope.data[0].y[0]
    assert rope.layout.yaxis.type == "log"
    mav = viz.rope_frequencies(ml4.configs.maverick(), wavelength=True)
    assert np.allclose(mav.data[0].y, mav.data[1].y) and "no scaling" in mav.layout.title.text


def test_param_breakdown_and_memory():
    pc = ml4.count_params(ml4.configs.scout())
    fig = viz.param_breakdown(pc)
    total, active = fig.data
    assert sum(total.y) == pc.total and sum(active.y) == pc.active
    assert "dense_mlps" not in total.x and "routed_experts" in total.x  # Scout has no dense layers
    assert "108.6B" in fig.layout.title.text and fig.layout.yaxis.title.text == "parameters"
    assert viz.param_breakdown(ml4.configs.scout()).to_json() == fig.to_json()  # config in, deterministic

    mem = viz.memory_by_format({"scout": pc, "maverick": ml4.configs.maverick()}, gpu_gib=80)
    assert [d.name for d in mem.data] == ["bf16", "fp8", "int4"]
    assert mem.data[0].y[0] == pytest.approx(pc.memory_gib("bf16")) and list(mem.data[2].x) == ["scout", "maverick"]
    assert mem.layout.shapes[0].y0 == 80 and mem.layout.yaxis.title.text == "weight memory (GiB)"


class History:
    def __init__(self):
        self.step, self.loss = [0, 10, 20], [5.0, 4.0, 3.5]

    def log(self, **kw):  # methods are not mistaken for series
        pass


def test_loss_curves_accepts_history_likes():
    fig = viz.loss_curves({
        "mapping": {"step": [0, 1, 2], "loss": [3.0, 2.0, 1.0]},
        "object": History(),
        "namespace": SimpleNamespace(step=[0, 5], loss=torch.tensor([2.0, 1.0])),
        "records": [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.25}],
        "values": [4.0, 3.0],
    })
    assert [d.name for d in fig.data] == ["mapping", "object", "namespace", "records", "values"]
    assert list(fig.data[1].x) == [0, 10, 20] and list(fig.data[1].y) == [5.0, 4.0, 3.5]
    assert list(fig.data[2].y) == [2.0, 1.0] and list(fig.data[3].x) == [3, 4] and list(fig.data[4].x) == [0, 1]
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "loss"
    aux = viz.loss_curves({"a": {"step": [0, 1], "loss": [1, 1], "aux_loss": [0.5, 0.25]}}, key="aux_loss")
    assert list(aux.data[0].y) == [0.5, 0.25]
    with pytest.raises(ValueError, match="2 steps but 3"):
        viz.loss_curves({"bad": {"step": [0, 1], "loss": [1, 2, 3]}})
    # one run passed bare failed as an AttributeError on .items(); no runs drew an empty figure
    with pytest.raises(TypeError, match=r"histories must be a Mapping, got list; \{run name: history\}"):
        viz.loss_curves([3.0, 2.0])
    with pytest.raises(ValueError, match="histories is empty"):
        viz.loss_curves({})
    with pytest.raises(ValueError, match="param_counts is empty"):
        viz.memory_by_format({})


def test_load_over_training():
    loads = torch.zeros(3, 2, 4)
    loads[:, 1] = torch.tensor([[8, 0, 0, 0], [4, 4, 0, 0], [2, 2, 2, 2]])
    fig = viz.load_over_training(loads, layer=3, layers=[1, 3], steps=[0, 50, 100])
    assert len(fig.data) == 4 and list(fig.data[0].x) == [0, 50, 100]
    assert list(fig.data[0].y) == [1.0, 0.5, 0.25] and list(fig.data[3].y) == [0, 0, 0.25]
    assert [d.line.color for d in fig.data] == viz.expert_colours(4) and fig.layout.shapes[0].y0 == 0.25
    counts = viz.load_over_training([loads[i, 1] for i in range(3)][:1] * 2, normalise=False)
    assert list(counts.data[0].y) == [8, 8]  # a list of [e] tensors reads as [steps, e]
    assert list(viz.load_over_training(loads, layer=1).data[0].y) == [1.0, 0.5, 0.25]  # a row index
    with pytest.raises(ValueError, match=r"layer=5: not one of the recorded layers \[1, 3\]"):
        viz.load_over_training(loads, layer=5, layers=[1, 3])
    for bad in (5, -1):  # -1 used to pick the last row silently
        with pytest.raises(ValueError, match=rf"layer={bad}: expected a row index in \[0, 2\)"):
            viz.load_over_training(loads, layer=bad)
    with pytest.raises(ValueError, match="3 layers given for 2 rows"):
        viz.load_over_training(loads, layer=3, layers=[1, 3, 5])


# ------------------------------------------------------------------------------ widgets
def test_config_explorer_follows_sliders():
    ex = viz.config_explorer(ml4.configs.scout())
    assert ex.params.total == 108_641_793_536
    assert shown(ex.output)["layout"]["title"]["text"] == ex.figure.layout.title.text
    before_total, before_fig = ex.params.total, ex.figure
    before_active = ex.params.active
    ex.experts.value = 128  # more experts: much more total; active grows only by the wider routers
    assert ex.params.total > before_total and ex.params.active - before_active == 48 * 5120 * (128 - 16)
    assert ex.figure is not before_fig and sum(ex.figure.data[0].y) == ex.params.total
    assert "785.1B" in shown(ex.output)["layout"]["title"]["text"]
    top1_active = ex.params.active
    ex.top_k.value = 2  # one more routed expert per token and layer
    assert ex.params.active - top1_active == 48 * 3 * 5120 * 8192 and ex.config.text.num_experts_per_tok == 2
    ex.interleave.value = 2  # MoE every other layer, like Maverick
    assert ex.config.text.moe_layers == list(range(1, 48, 2)) and "dense_mlps" in ex.figure.data[0].x
    assert ex.memory_figure.data[0].y[1] == pytest.approx(ex.params.memory_gib("bf16"))
    ex.layers.value = 24
    assert ex.config.text.num_hidden_layers == 24 and ex.config.text.moe_layers[-1] == 23
    assert "this config" in ex.table.value and "GiB" in ex.table.value

    ex.top_k.value = 8  # still valid with 128 experts
    good = ex.figure
    ex.experts.value = 4  # top-k 8 of 4 experts: the config's ValueError, not a crash
    assert ex.error and "top-k exceeds" in ex.error and "top-k exceeds" in ex.table.value
    assert ex.params is None and ex.output.outputs == () and ex.figure is good
    ex.top_k.value = 1  # valid again
    assert ex.error is None and ex.params.total < before_total and len(ex.output.outputs) == 1
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_config_explorer_on_text_config_hidden_width():
    ex = viz.config_explorer(ml4.configs.tiny().text)
    total = ex.params.total
    ex.hidden.value = ex.hidden.value * 2
    assert ex.config.hidden_size == 128 and ex.params.total > total


def test_routing_explorer_follows_layer(traced):
    trace, tok, tokens = traced
    ex = viz.routing_explorer(trace, tok)
    assert ex.layer.options == tuple((f"layer {i}", i) for i in trace.moe_layers)
    assert list(ex.figure.data[0].y) == trace.load(0).tolist()
    html0, fig0 = ex.html.value, ex.figure
    changed = next(i for i in trace.moe_layers[1:] if not torch.equal(trace.load(i), trace.load(0)))
    ex.layer.value = changed
    assert ex.figure is not fig0 and list(ex.figure.data[0].y) == trace.load(changed).tolist()
    assert ex.html.value != html0 and f"layer {changed}" in ex.html.value
    assert f"layer {changed}" in shown(ex.output)["layout"]["title"]["text"]
    assert ex.html.value.count("<span ") == len(tokens) + trace.n_experts
    assert viz.routing_explorer(trace).tokens[1] == str(trace.token_ids()[1].item())  # no tokenizer: ids
    with pytest.raises(TypeError, match="trace must be a RouterTrace, got Llama4Text; record one first"):
        viz.routing_explorer(trace.model)


def test_mask_explorer_follows_sliders():
    ex = viz.mask_explorer(ml4.configs.tiny())
    assert (ex.chunk.value, ex.seq_len.value, ex.floor_scale.value) == (32, 96, 32)
    pos = torch.arange(96)
    assert np.array_equal(ex.mask_figure.data[0].z, attention_mask(pos, pos, 32).int().numpy())
    ex.chunk.value = 8
    assert np.array_equal(ex.mask_figure.data[0].z, attention_mask(pos, pos, 8).int().numpy())
    assert "chunk 8" in shown(ex.mask_output)["layout"]["annotations"][0]["text"]
    ex.chunk.value = 0  # no chunking: RoPE mask = NoPE mask
    assert np.array_equal(ex.mask_figure.data[0].z, ex.mask_figure.data[1].z)
    ex.seq_len.value = 20
    assert np.asarray(ex.mask_figure.data[0].z).shape == (20, 20) and len(ex.temperature_figure.data[0].x) == 20
    y0 = np.asarray(ex.temperature_figure.data[0].y)
    ex.floor_scale.value = 4
    y1 = np.asarray(ex.temperature_figure.data[0].y)
    assert not np.array_equal(y0, y1) and np.allclose(y1, nope_temperature(torch.arange(20), 4, 0.1).numpy())
    ex.attn_scale.value = 0.5
    y2 = np.asarray(ex.temperature_figure.data[0].y)
    assert np.allclose(y2 - 1, 5 * (y1 - 1)) and ex.config.attn_scale == 0.5
    assert json.dumps(shown(ex.temperature_output))  # what the frontend receives is plain JSON


def test_mask_explorer_clamps_real_sizes():
    ex = viz.mask_explorer(ml4.configs.scout(), max_len=128)
    assert ex.chunk.value == 128 and ex.floor_scale.value == 128 and ex.seq_len.value == 128
    with pytest.raises(ValueError, match="max_len=0: must be an integer >= 2"):
        viz.mask_explorer(ml4.configs.scout(), max_len=0)


# ------------------------------------------------------------------------------ post-training figures
def test_posttrain_figures_refuse_empty_windows_and_fractions_outside_0_1():
    from minillama4.viz import posttrain as pv

    for bad in (0, -1):  # window 0 turned every point into NaN
        with pytest.raises(ValueError, match=f"window={bad}: must be a positive integer"):
            pv.smooth([1.0, 2.0], bad)
        with pytest.raises(ValueError, match=f"window={bad}"):
            pv.rl_curves({"step": [0], "reward": [1.0]}, window=bad)
    with pytest.raises(ValueError, match=r"drop_fraction=1.5: must be a finite number in \[0, 1\]"):
        pv.pruning_figure([0.9, 0.1], [1, 2], drop_fraction=1.5)
    with pytest.raises(ValueError, match="same length"):
        pv.pruning_figure([0.9, 0.1], [1], drop_fraction=0.5)
    assert len(pv.pruning_figure([0.9, 0.1], [1, 2], drop_fraction=1.0).data) == 4  # 2 boxes, kept, dropped


# ------------------------------------------------------------------------------ bad input, refused by name
def test_routing_figures_refuse_expert_ids_outside_n_experts():
    toks = ["a", "b", "c"]
    for bad, shown_id in ((torch.tensor([0, 5, 1]), 5), (torch.tensor([0, -1, 1]), -1)):  # wrong / last colour
        with pytest.raises(ValueError, match=rf"expert_ids holds {shown_id}: expected expert ids in \[0, 4\) "
                                             r"\(n_experts=4\)"):
            viz.token_expert_colouring(toks, bad, n_experts=4)
        with pytest.raises(ValueError, match=rf"expert_ids holds {shown_id}: expected expert ids in \[0, 4\)"):
            viz.token_expert_html(toks, bad, n_experts=4)
    with pytest.raises(ValueError, match=r"expert_ids holds -1: expected expert ids in \[0, 2\)"):
        viz.token_expert_html(toks, torch.tensor([0, -1, 1]))  # n_experts read from the ids
    with pytest.raises(ValueError, match="n_experts=0: must be a positive integer"):
        viz.token_expert_html(toks, torch.tensor([0, 0, 0]), n_experts=0)
    with pytest.raises(ValueError, match=r"gates has shape \(2,\): expected one gate per entry of expert_ids"):
        viz.token_expert_colouring(toks, torch.tensor([0, 1, 1]), gates=torch.ones(2))
    with pytest.raises(ValueError, match="width=0: must be a positive integer"):
        viz.token_expert_colouring(toks, torch.tensor([0, 1, 1]), width=0)
    ok = viz.token_expert_colouring(toks, torch.tensor([0, 3, 1]), n_experts=4)  # valid ids draw as before
    assert list(ok.data[0].z[0][:3]) == [0, 3, 1] and ok.data[0].zmax == 3.5

    scores = torch.rand(5, 1)
    ids = torch.tensor([[0], [1], [7], [1], [0]])  # the 7 used to be left out of every histogram
    with pytest.raises(ValueError, match=r"expert_ids holds 7: expected expert ids in \[0, 2\) \(n_experts=2\)"):
        viz.router_score_histogram(scores, ids, n_experts=2)
    with pytest.raises(ValueError, match=r"expert_ids has shape \(4, 1\): expected one expert id per score"):
        viz.router_score_histogram(scores, ids[:4])
    with pytest.raises(ValueError, match="nbins=0: must be a positive integer"):
        viz.router_score_histogram(torch.rand(5, 4), nbins=0)
    assert len(viz.router_score_histogram(scores, ids).data) == 8  # n_experts from the ids, as before


def test_domain_expert_preference_refuses_codes_it_cannot_place():
    with pytest.raises(ValueError, match=r"expert_ids holds 5: expected expert ids in \[0, 4\) \(n_experts=4\)"):
        viz.domain_expert_preference(torch.tensor([0, 5]), [0, 1], 4)
    with pytest.raises(ValueError, match="n_experts=0: must be a positive integer"):
        viz.domain_expert_preference(torch.zeros(0, dtype=torch.long), [], 0)
    with pytest.raises(ValueError, match=r"domain_labels holds -1: expected domain codes in \[0, 1\)"):
        viz.domain_expert_preference(torch.tensor([0, 1]), [0, -1], 4)  # was counted into the last row
    with pytest.raises(ValueError, match=r"domain_labels holds 3: expected domain codes in \[0, 2\) "
                                         r"\(2 domain names\)"):
        viz.domain_expert_preference(torch.tensor([0, 1]), [0, 3], 4, domain_names=["a", "b"])
    with pytest.raises(ValueError, match=r"domain_labels holds 'poetry': not one of domain_names \['prose', 'code'\]"):
        viz.domain_expert_preference(torch.tensor([0, 1]), ["prose", "poetry"], 4, domain_names=["prose", "code"])


def test_expert_load_bar_refuses_negative_counts():
    with pytest.raises(ValueError, match="load holds -3: expected token counts per expert, finite and >= 0"):
        viz.expert_load_bar(torch.tensor([-3.0, 1.0, 1.0]))  # was titled "-1 token copies"
    with pytest.raises(ValueError, match="load holds nan"):
        viz.expert_load_bar(torch.tensor([float("nan"), 1.0]))


def test_load_over_training_checks_steps_and_the_layer_axis():
    loads = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"steps has 2 entries, expected 3 \(one per row of loads\)"):
        viz.load_over_training(loads, steps=[0, 1])
    # one layer's [steps, e] loads may say which layer they are, for the title (nothing to pick)
    assert viz.load_over_training(loads, layer=5).layout.title.text == "Expert load during training, layer 5"
    with pytest.raises(ValueError, match=r"layers=\[1, 3\]: loads of shape \(3, 4\)"):
        viz.load_over_training(loads, layers=[1, 3])
    with pytest.raises(ValueError, match=r"loads has no experts \(shape \(3, 0\)\)"):
        viz.load_over_training(torch.ones(3, 0))
    assert viz.load_over_training(loads, steps=[0, 5, 10]).layout.title.text == "Expert load during training, layer 0"


def test_config_figures_refuse_a_name_for_a_config():
    cfg = ml4.configs.tiny()
    for fn in (lambda: viz.attention_mask_figure("tiny", 8), lambda: viz.rope_frequencies("tiny"),
               lambda: viz.temperature_curve("tiny", 8)):
        with pytest.raises(TypeError, match=r"cfg must be a Llama4Config or TextConfig, got str; e.g. configs.tiny\(\)"):
            fn()
    with pytest.raises(TypeError, match="base_cfg must be a Llama4Config or TextConfig, got str"):
        viz.config_explorer("tiny")
    from minillama4.viz import longctx as lviz
    with pytest.raises(TypeError, match="cfg must be a Llama4Config or TextConfig, got str"):
        lviz.kv_memory_explorer("tiny")
    with pytest.raises(ValueError, match="gpu_gib=-1: must be a finite number >= 0"):
        lviz.kv_memory_explorer(cfg, gpu_gib=-1)
    for bad in (0, -3):  # -3 failed in torch.arange
        with pytest.raises(ValueError, match=f"seq_len={bad}: must be a positive integer"):
            viz.attention_mask_figure(cfg, bad)
    with pytest.raises(TypeError, match="seq_len=2.5: must be a positive integer"):  # was drawn as 3 positions
        viz.attention_mask_figure(cfg, 2.5)
    with pytest.raises(ValueError, match="max_pos=0: must be a positive integer"):
        viz.temperature_curve(cfg, 0)
    with pytest.raises(ValueError, match="n_points=0: must be an integer >= 2"):
        viz.temperature_curve(cfg, 10**6, n_points=0)


def test_memory_by_format_needs_a_positive_gpu_size():
    cfg = ml4.configs.tiny()
    for bad in (0, -1):  # 0 with log_y failed with "math domain error"; -1 drew a line below zero
        with pytest.raises(ValueError, match=f"gpu_gib={bad}: must be a finite number > 0"):
            viz.memory_by_format({"t": cfg}, bad, log_y=True)
    with pytest.raises(TypeError, match="param_counts must be a Mapping, got list"):
        viz.memory_by_format([cfg])
    with pytest.raises(ValueError, match="gpu_gib=-5: must be a finite number > 0"):
        viz.config_explorer(cfg, gpu_gib=-5)


def test_longctx_training_curves_name_the_curves_it_has():
    from minillama4.viz import longctx as lviz

    results = {"config": {"train_len": 8}, "task": {"values": [1, 2]},
               "runs": {"irope": {"0": {"train_accuracy": [0.5, 0.75], "accuracy": {"8": 1.0}, "seconds": 1.0}}}}
    with pytest.raises(ValueError, match=r"key='bogus': expected one of \('train_accuracy',\)"):
        lviz.training_curves(results, key="bogus")
    assert list(lviz.training_curves(results).data[0].y) == [0.5, 0.75]


def test_posttrain_figures_name_missing_history_fields():
    from minillama4.viz import posttrain as pv

    for fn, pattern in ((pv.rl_curves, r"\['step', 'reward', .*\]: expected what train.rl.train_rl"),
                        (pv.dpo_curves, r"\['step', 'margin', .*\]: expected what train.dpo.train_dpo"),
                        (pv.curriculum_figure, r"\['active_levels'\]: expected what train.rl.train_rl")):
        with pytest.raises(ValueError, match=r"history lacks " + pattern + r".*\(got an empty dict\)"):
            fn({})  # was KeyError: 'step'
    with pytest.raises(ValueError, match=r"history lacks \['frac_filtered', 'kl'\]: expected what train.rl.train_rl"):
        pv.rl_curves(SimpleNamespace(step=[0], reward=[1.0], level_reward=[{}]))  # an object, not a dict
    with pytest.raises(ValueError, match=r"histories\['a'\] lacks \['step', 'eval_step', 'eval_accuracy', "
                                         r"'n_examples'\]: expected what train.sft.train_sft"):
        pv.sft_comparison({"a": {}})
    with pytest.raises(ValueError, match=r"answers\['SFT'\] has 1 entries, expected 2 \(one per question\)"):
        pv.completions_table(["1+1=", "2+2="], {"SFT": ["2"]}, ["2", "4"])  # the second row was left unmarked
    with pytest.raises(ValueError, match=r"expected has 1 entries, expected 2 \(one per question\)"):
        pv.completions_table(["1+1=", "2+2="], {"SFT": ["2", "4"]}, ["2"])
    table = pv.completions_table(["1+1=", "2+2="], {"SFT": ["2", "5"]}, ["2", "4"])
    assert list(table.data[0].cells.fill.color[2]) == ["#d8f0d8", "#f6d5d5"]
