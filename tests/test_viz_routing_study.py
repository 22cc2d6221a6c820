"""minillama4.viz.routing_study: the measures of notebook 02 on hand-made inputs with known
answers, and the figures and the snippet explorer on a tiny random model."""

import numpy as np
import pytest
import torch

import minillama4 as ml4
from minillama4.data import DOMAINS, TokenCorpus
from minillama4.moe import MoE
from minillama4.viz import routing_study as rs
from minillama4.viz.widgets import PLOTLY_MIME

TOK = ml4.ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return ml4.Llama4Text.random(ml4.configs.tiny(), seed=3)


def names(text: str) -> list[str]:
    return rs.class_names_of(rs.token_classes(TOK.encode(text)))


# ------------------------------------------------------------------------------ data
def test_token_classes():
    text = "def f(self, x1):\n    return x1 + 22\n"
    got = names(text)
    assert len(got) == len(text)
    assert got[:3] == ["keyword"] * 3 and got[3] == "space" and got[4] == "letter" and got[5] == "punctuation"
    assert got[6:10] == ["keyword"] * 4  # self
    assert got[13] == "digit" and got[16] == "newline"
    assert got[17:21] == ["indent"] * 4 and got[21:27] == ["keyword"] * 6  # return
    assert got[31] == "punctuation" and got[33:35] == ["digit", "digit"]
    # whole words only: "define" and "selfish" hold no keyword; a leading space of a row is "space"
    assert set(names("define selfish")) == {"letter", "space"}
    assert names("  x")[:2] == ["space", "space"]
    # special tokens and non-ASCII bytes are "other"; shapes are kept for [w, t]
    ids = torch.tensor([[TOK.eos_id] + TOK.encode("é1")])
    assert rs.class_names_of(rs.token_classes(ids)) == ["other", "other", "other", "digit"]
    assert rs.token_classes(ids).shape == ids.shape


def test_held_out_windows_and_snippets():
    segs = [("prose", "An English sentence that is long enough. " * 3), ("code", "def f(x):\n    return x\n" * 4),
            ("math", "1+2=3\n" * 12), ("code", "x = 1\n" * 12)]
    ids, dom = [], []
    for d, text in segs:
        piece = TOK.encode(text) + [TOK.eos_id]
        ids += piece
        dom += [DOMAINS.index(d)] * len(piece)
    corpus = TokenCorpus(torch.tensor(ids), torch.tensor(dom))
    w = rs.held_out_windows(corpus, seq_len=16)
    assert w.ids.shape == (len(ids) // 16, 16) and torch.equal(w.ids.flatten(), corpus.ids[:w.ids.numel()])
    assert torch.equal(w.domain.flatten(), corpus.domain[:w.ids.numel()])
    assert rs.held_out_windows(corpus, 16, max_windows=2).ids.shape == (2, 16)
    with pytest.raises(ValueError, match="too few"):
        rs.held_out_windows(corpus, seq_len=10_000)

    snippets = rs.document_snippets(corpus, per_domain=2, length=20, min_length=10)
    # the first prose document has no <|end_of_text|> before it in this stream, so it is skipped
    assert list(snippets) == ["code 1", "code 2", "math 1"]  # grouped by domain, in DOMAINS order
    assert snippets["code 1"][0] == TOK.eos_id and TOK.decode(snippets["code 1"][1:]) == segs[1][1][:20]
    assert TOK.decode(snippets["math 1"][1:]).startswith("1+2=3\n") and len(snippets["math 1"]) == 21


# ------------------------------------------------------------------------------ measures
def test_group_share():
    share = rs.group_share(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1]), 3, 4)
    assert torch.allclose(share, torch.tensor([[2 / 3, 1 / 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]))
    two_slots = rs.group_share(torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 0]), 1, 3)
    assert torch.allclose(two_slots, torch.tensor([[0.25, 0.5, 0.25]]))


def test_predictability():
    # the expert is the token id mod 2 for every token; the domain says nothing
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (1000,), generator=gen)
    domain = torch.randint(0, 3, (1000,), generator=gen)
    top1 = tokens % 2
    got = rs.predictability(top1, {"domain": domain, "token id": tokens, "both": (tokens, domain)})
    assert got["token id"] == 1.0 and got["both"] == 1.0
    assert abs(got["domain"] - 0.5) < 0.05 and 0.4 < got["no information"] < 0.6  # chance, up to noise
    # a key value never seen in the fitting half falls back to the busiest expert
    unseen = rs.predictability(torch.tensor([1, 1, 0, 1]), {"k": torch.tensor([0, 0, 1, 1])})
    assert unseen["k"] == 0.5 and unseen["no information"] == 0.5
    with pytest.raises(ValueError, match="values for"):
        rs.predictability(top1, {"short": tokens[:10]})


def test_repeat_rate():
    top1 = torch.tensor([0, 0, 0, 1, 1, 1])
    positions = torch.tensor([0, 1, 2, 0, 1, 2])  # two windows: the pair across the cut is skipped
    observed, chance = rs.repeat_rate(top1, positions)
    assert observed == 1.0 and chance == pytest.approx(0.5)
    top1 = torch.tensor([0, 0, 1, 1])
    positions = torch.arange(4)
    assert rs.repeat_rate(top1, positions)[0] == pytest.approx(2 / 3)
    assert rs.repeat_rate(top1, positions, mask=torch.tensor([1, 0, 1, 0]))[0] == 0.0  # only the pair (1, 2) counts


def test_context_shift():
    ids = torch.tensor([5] * 40 + [7] * 40)
    ctx = torch.tensor([0] * 20 + [1] * 20 + [0] * 20 + [1] * 20)
    same = torch.tensor([2] * 40 + [3] * 40)  # each token keeps its expert in both contexts
    assert rs.context_shift(same, ids, ctx, 2, 4) == 0.0
    moved = torch.tensor([0] * 20 + [1] * 20 + [3] * 40)  # token 5 changes expert, token 7 does not
    assert rs.context_shift(moved, ids, ctx, 2, 4) == pytest.approx(0.5)
    half = torch.tensor([0] * 20 + [0] * 10 + [1] * 10 + [3] * 40)  # token 5 half moved
    assert rs.context_shift(half, ids, ctx, 2, 4) == pytest.approx(0.25)
    assert np.isnan(rs.context_shift(same, ids, ctx, 2, 4, min_count=21))  # too few per context


def test_gate_variants():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    g1 = rs.gate_variants(logits, top_k=1)
    assert torch.allclose(g1["llama4"], torch.sigmoid(torch.tensor([[2.0], [3.0]])))
    assert torch.equal(g1["mixtral"], torch.ones(2, 1))  # softmax over one logit: always 1
    assert torch.allclose(g1["softmax"][:, 0], torch.softmax(logits, -1).amax(-1))
    g2 = rs.gate_variants(logits, top_k=2)
    assert torch.allclose(g2["mixtral"].sum(-1), torch.ones(2)) and g2["llama4"].shape == (2, 2)
    assert (g2["softmax"].sum(-1) < 1).all()  # no renormalisation


# ------------------------------------------------------------------------------ with a model
def test_trace_windows_and_same_token(model):
    ids = torch.tensor([TOK.encode("ab a b ab ba  aa")] * 3)
    trace = rs.trace_windows(model, ids, batch=2)
    assert trace.expert_ids(0).shape == (ids.numel(), 1) and torch.equal(trace.token_ids(), ids.flatten())
    assert trace.positions().tolist() == list(range(ids.shape[1])) * 3
    with ml4.RouterTrace(model) as single:
        model(ids[:1])
    assert torch.equal(trace.expert_ids(2)[:ids.shape[1]], single.expert_ids(2))
    contexts = torch.arange(3).repeat_interleave(ids.shape[1])
    share = rs.same_token_contexts(trace, 1, trace.token_ids(), contexts, ord("a"), 4)
    assert share.shape == (4, trace.n_experts)
    assert torch.allclose(share[:3].sum(1), torch.ones(3)) and share[3].sum() == 0
    assert torch.equal(share[0], share[1])  # the same text gives the same routing


def test_time_dispatch_agrees(model):
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(200, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    got = rs.time_dispatch(moe, x, repeats=2)
    assert got["max_abs_diff"] < 1e-5 * max(1.0, got["max_abs_value"]) and got["tokens"] == 200
    assert set(got["seconds"]) == {"reference", "fast"} and 1 <= got["experts_used"] <= model.cfg.num_local_experts


def test_moe_inputs_and_gating(model):
    ids = torch.tensor([TOK.encode("def f(x):\n    return x + 1\n")] * 2)
    x = rs.moe_inputs(model, ids, layer=1)
    assert x.shape == (ids.numel(), model.cfg.hidden_size)
    moe = model.model.layers[1].feed_forward
    with ml4.RouterTrace(model) as trace:
        model(ids)
    assert torch.equal(moe.route(x)[1], trace.expert_ids(1))  # the captured tokens route as traced
    with pytest.raises(ValueError, match="not an MoE layer"):
        rs.moe_inputs(model, ids, layer=99)

    got = rs.input_vs_output_gating(moe, x)
    assert torch.allclose(got["gate"], trace.gates(1)[:, 0])
    assert (got["relative_difference"] > 0).all() and (got["norm_ratio"] > 0).all()
    # token 0 by hand: E(s x) against s E(x)
    e, s0 = int(trace.expert_ids(1)[0, 0]), float(trace.gates(1)[0, 0])
    with torch.no_grad():
        plain = moe.experts.one(e, x[:1])
        gated_in, gated_out = moe.experts.one(e, x[:1] * s0), s0 * plain
    expected = float((gated_in - gated_out).norm() / gated_out.norm())
    assert float(got["relative_difference"][0]) == pytest.approx(expected, rel=1e-5)
    assert float(got["norm_ratio"][0]) == pytest.approx(float(gated_in.norm() / plain.norm()), rel=1e-5)


def test_figures():
    share = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    fig = rs.expert_share_heatmap(share, ["a", "b"], layer=2, what="token class", counts=[10, 3])
    assert np.allclose(fig.data[0].z, share.numpy()) and list(fig.data[0].y) == ["a (10)", "b (3)"]
    assert "layer 2" in fig.layout.title.text and "33%" in fig.layout.title.text
    with pytest.raises(ValueError, match="row names"):
        rs.expert_share_heatmap(share, ["a"])
    bars = rs.predictability_figure({0: {"no information": 0.2, "domain": 0.3},
                                     3: {"no information": 0.1, "domain": 0.5}})
    assert [b.name for b in bars.data] == ["no information", "domain"] and list(bars.data[1].y) == [0.3, 0.5]
    gates = rs.gate_variants(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)))
    hist = rs.gate_histogram(gates)
    assert [h.name for h in hist.data] == ["llama4", "mixtral", "softmax"] and len(hist.data[1].x) == 40
    assert all(sum(h.y) == 50 for h in hist.data) and hist.data[1].y[-1] == 50  # mixtral top-1: all at 1.0


def test_snippet_explorer(model):
    snippets = {"prose 1": TOK.encode("The cat sat."), "code 1": TOK.encode("def f(x):\n    return x")}
    ex = rs.snippet_explorer(model, snippets, TOK)
    assert ex.text.options == ("prose 1", "code 1") and ex.layer.value == 0
    n_experts = model.cfg.num_local_experts
    assert ex.html.value.count("title=") == len(snippets["prose 1"]) + n_experts  # tokens + legend chips
    assert sum(ex.figure.data[0].y) == len(snippets["prose 1"])
    ex.text.value, ex.layer.value = "code 1", 3
    assert "layer 3" in ex.html.value and "return" not in ex.html.value  # one span per byte
    assert sum(ex.figure.data[0].y) == len(snippets["code 1"]) and "code 1" in ex.figure.layout.title.text
    (out,) = ex.output.outputs
    assert out["data"][PLOTLY_MIME]["data"][0]["type"] == "bar"
    # the colouring is the trace of the snippet alone, layer 3
    with ml4.RouterTrace(model) as trace:
        model(torch.tensor([snippets["code 1"]]))
    assert list(ex.figure.data[0].y) == trace.load(3).tolist()
    with pytest.raises(ValueError, match="no snippets"):
        rs.snippet_explorer(model, {}, TOK)


def test_measures_refuse_ids_outside_their_range():
    with pytest.raises(ValueError, match=r"groups holds 5: expected group ids in \[0, 2\) \(n_groups=2\)"):
        rs.group_share(torch.zeros(10, 1, dtype=torch.long), torch.full((10,), 5), 2, 4)
    with pytest.raises(ValueError, match=r"expert_ids holds 7: expected expert ids in \[0, 4\) \(n_experts=4\)"):
        rs.group_share(torch.full((10, 1), 7), torch.zeros(10, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="3 groups but 10 rows of expert_ids"):
        rs.group_share(torch.zeros(10, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="n_groups=0: must be a positive integer"):
        rs.group_share(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, 4)
    with pytest.raises(ValueError, match=r"labels holds 99: expected indices into TOKEN_CLASSES in \[0, 8\)"):
        rs.class_names_of(torch.tensor([99]))
    assert rs.class_names_of(torch.tensor([0, 7])) == ["digit", "other"]
    logits = torch.rand(5, 4)
    with pytest.raises(ValueError, match="top_k=0: must be a positive integer"):
        rs.gate_variants(logits, top_k=0)  # returned empty gates
    with pytest.raises(ValueError, match=r"top_k=9: must be at most the number of experts, 4 \(logits of shape \(5, 4\)\)"):
        rs.gate_variants(logits, top_k=9)
    with pytest.raises(ValueError, match="nbins=0: must be a positive integer"):
        rs.gate_histogram({"a": torch.rand(5)}, nbins=0)
