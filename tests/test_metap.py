"""minillama4.train.metap (SP vs µP parameter groups, init, output multiplier, coordinate check,
LR sweep) and its figures in minillama4.viz.metap. Small widths, few steps, fixed seeds."""

import dataclasses
import math

import pytest
import torch

from minillama4.data import load_corpus
from minillama4.model import Llama4Text
from minillama4.train import metap
from minillama4.train.metap import (Parametrization, Readout, RunConfig, apply_parametrization, best_log2_lr,
                                    best_multiplier, build_model, coord_check, fold_output_multiplier, growth,
                                    loss_at_base_optimum, load_sweep, lr_sweep, mean_loss, merge_seeds,
                                    multiplier_search, optimum_drift, output_multiplier, param_groups, param_role,
                                    proxy_config, rules_at_width, run, save_sweep, scale_width, tensor_rules)

SIGMA = 0.02  # configs.tiny().text.initializer_range, inherited by proxy_config
MUP, SP = Parametrization("mup", base_width=32), Parametrization("sp", base_width=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is as fast, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(seed=0, chars_per_domain=20_000)


def roles(model):
    return {n: param_role(n, p) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ configs
def test_proxy_and_scale_width_keep_head_dim_and_scale_everything_else():
    cfg = proxy_config(128)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (128, 8, 4, 16)
    assert (cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers) == (256, 4, 2)
    assert cfg.moe_layers == [0, 1] and cfg.no_rope_layers == [1, 0]  # MoE everywhere, layer 1 is NoPE
    small = scale_width(cfg, 32)
    assert (small.hidden_size, small.num_attention_heads, small.num_key_value_heads, small.head_dim,
            small.intermediate_size) == (32, 2, 1, 16, 64)
    assert small.num_local_experts == 4 and small.vocab_size == cfg.vocab_size
    with pytest.raises(ValueError, match="num_key_value_heads"):
        scale_width(cfg, 16)  # 4 kv heads / 8 is not an integer
    with pytest.raises(ValueError, match="head_dim"):
        proxy_config(40)


# ------------------------------------------------------------------------------ roles and groups
def test_roles_moe_router_experts_and_shared_expert_are_hidden():
    r = roles(build_model(proxy_config(64), MUP))
    assert r["model.embed_tokens.weight"] == "input" and r["lm_head.weight"] == "output"
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.feed_forward.router.weight", "model.layers.0.feed_forward.experts.gate_up_proj",
                 "model.layers.0.feed_forward.experts.down_proj",
                 "model.layers.1.feed_forward.shared_expert.down_proj.weight"):
        assert r[name] == "hidden", name
    assert {n for n, role in r.items() if role == "vector"} == {n for n in r if n.endswith("norm.weight")}
    counts = {role: list(r.values()).count(role) for role in ("input", "hidden", "output", "vector")}
    # per layer: q k v o, router, gate_up, down, shared gate/up/down = 10 hidden; 2 norms (+ final norm)
    assert counts == {"input": 1, "hidden": 20, "output": 1, "vector": 5}


@pytest.mark.parametrize("width", [32, 64, 256])
def test_mup_learning_rates_scale_as_one_over_width(width):
    m = width / 32
    model = build_model(proxy_config(width), MUP)
    rules = {r.name: r for r in tensor_rules(model, MUP)}
    for r in rules.values():
        if r.role == "hidden":
            assert r.width_mult == m and r.lr_mult == pytest.approx(1 / m) and r.wd_mult == pytest.approx(m)
        else:
            assert r.lr_mult == 1.0
    # the expert down projection's fan-in is the expert width f = 2d: same multiplier
    assert rules["model.layers.0.feed_forward.experts.down_proj"].width_mult == m
    groups = param_groups(model, MUP, lr=1e-2, weight_decay=0.1)
    hidden = [g for g in groups if g["role"] == "hidden"]
    assert len(hidden) == 1 and hidden[0]["lr"] == pytest.approx(1e-2 / m)
    assert hidden[0]["weight_decay"] == pytest.approx(0.1 * m)  # lr * wd independent of width
    assert all(g["lr"] == pytest.approx(1e-2) for g in groups if g["role"] != "hidden")
    assert next(g for g in groups if g["role"] == "vector")["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # SP: one LR for everything, at any width
    sp_model = build_model(proxy_config(width), SP)
    assert all(g["lr"] == pytest.approx(1e-2) for g in param_groups(sp_model, SP, lr=1e-2))


def test_role_multipliers_are_applied():
    spec = Parametrization("mup", base_width=32, lr_mult={"output": 0.5}, init_mult={"input": 2.0})
    model = build_model(proxy_config(64), spec)
    rules = {r.role: r for r in tensor_rules(model, spec)}
    assert rules["output"].lr_mult == 0.5 and rules["hidden"].lr_mult == 0.5  # hidden: 1/m with m = 2
    assert rules["input"].init_std == pytest.approx(2 * SIGMA)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(2 * SIGMA, rel=0.05)
    with pytest.raises(ValueError, match="unknown roles"):
        Parametrization("mup", lr_mult={"attention": 2.0})
    with pytest.raises(ValueError, match="kind"):
        Parametrization("ntk")


# ------------------------------------------------------------------------------ init
def test_mup_at_base_width_is_exactly_the_standard_model():
    cfg = proxy_config(32)
    plain = Llama4Text.random(cfg, seed=3)
    sp, mup = build_model(cfg, SP, seed=3), build_model(cfg, MUP, seed=3)
    for (name, p), q, r in zip(plain.named_parameters(), sp.parameters(), mup.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name
    assert output_multiplier(mup, MUP) == 1.0
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(ids), mup(ids))
    assert all(r.lr_mult == 1.0 and r.width_mult == 1.0 for r in tensor_rules(mup, MUP))


def test_init_std_follows_the_rules_at_width_256():
    m = 256 / 32
    mup, sp = build_model(proxy_config(256), MUP, seed=0), build_model(proxy_config(256), SP, seed=0)
    for (name, p), q in zip(mup.named_parameters(), sp.parameters()):
        role = param_role(name, p)
        if role == "vector":
            assert torch.all(p == 1) and torch.all(q == 1)
            continue
        expected = SIGMA / math.sqrt(m) if role == "hidden" else SIGMA
        assert p.std().item() == pytest.approx(expected, rel=0.05), name
        assert q.std().item() == pytest.approx(SIGMA, rel=0.05), name
        assert abs(p.mean().item()) < 0.1 * expected
    # µP reuses SP's random draws, rescaled
    q_mup = mup.model.layers[0].self_attn.q_proj.weight
    q_sp = sp.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q_mup, q_sp / math.sqrt(m))
    rules = {r.name: r for r in tensor_rules(mup, MUP)}
    assert rules["model.layers.0.self_attn.q_proj.weight"].init_std == pytest.approx(SIGMA / math.sqrt(m))


def test_readout_zero_init():
    spec = Parametrization("mup", base_width=32, readout_zero_init=True)
    model = build_model(proxy_config(64), spec)
    assert torch.all(model.lm_head.weight == 0)
    assert torch.all(model(torch.tensor([[1, 2, 3]])) == 0)


# ------------------------------------------------------------------------------ output multiplier
def test_output_multiplier_scales_logits_by_base_over_width():
    cfg = proxy_config(128)
    sp, mup = build_model(cfg, SP, seed=1), build_model(cfg, MUP, seed=1)
    assert isinstance(mup.lm_head, Readout) and mup.lm_head.output_mult == pytest.approx(32 / 128)
    assert output_multiplier(sp, SP) == 1.0 and output_multiplier(mup, Parametrization("mup", 32, output_mult=2.0)) == 0.5
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    h = mup.model.norm(torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(mup.lm_head(h), 0.25 * (h @ mup.lm_head.weight.T), atol=1e-6)
    # the multiplier is a reparametrization: folding it into the weight gives the same logits
    before = mup(ids)
    fold_output_multiplier(mup)
    assert type(mup.lm_head) is torch.nn.Linear
    assert torch.allclose(mup(ids), before, atol=1e-6)
    assert set(mup.state_dict()) == set(sp.state_dict())  # checkpoint keys unchanged


def test_rules_at_width_needs_no_weights():
    rules = {r.name: r for r in rules_at_width(1024, MUP)}
    assert rules["model.layers.0.feed_forward.experts.gate_up_proj"].shape == (4, 1024, 4096)  # [e, d, 2f], f = 2d
    assert rules["model.layers.0.self_attn.o_proj.weight"].lr_mult == pytest.approx(32 / 1024)
    assert rules["model.embed_tokens.weight"].lr_mult == 1.0
    sp_rules = rules_at_width(1024, SP)
    assert all(r.lr_mult == 1.0 for r in sp_rules) and all(r.init_std in (0.0, SIGMA) for r in sp_rules)


def test_apply_parametrization_keeps_parameters_for_the_optimizer():
    model = Llama4Text.random(proxy_config(64), seed=0)
    head = model.lm_head.weight
    apply_parametrization(model, MUP)
    assert model.lm_head.weight is head
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in Llama4Text.random(proxy_config(64)).named_parameters()]


# ------------------------------------------------------------------------------ training
def test_run_lowers_the_loss_and_uses_group_learning_rates(corpus):
    train_data, val_data = corpus
    model = build_model(proxy_config(64), MUP)
    seen = []

    def spy(step, _model):
        seen.append(step)

    cfg = RunConfig(steps=25, batch_size=8, seq_len=32, warmup=3, eval_batches=2)
    r = run(model, MUP, train_data, 2**-6, cfg, val_data=val_data, on_step=spy)
    assert seen == list(range(25)) and len(r["loss"]) == 25 and not r["diverged"]
    assert sum(r["loss"][-5:]) / 5 < r["loss"][0] - 1.0
    assert r["val_loss"] < math.log(272)


def test_run_stops_a_diverging_model(corpus):
    train_data, val_data = corpus
    model = build_model(proxy_config(32), SP)
    r = run(model, SP, train_data, 8.0, RunConfig(steps=30, batch_size=4, seq_len=32, warmup=1,
                                                  diverged_loss=8.0, eval_batches=1), val_data=val_data)
    assert r["diverged"] and r["val_loss"] == math.inf and len(r["loss"]) < 30


def test_coordinate_check_sp_logits_grow_with_width_mup_stay_flat(corpus):
    """Notebook 06's check at two widths: 4 steps at LR 2^-6, two seeds. (Three steps at 2^-5 and one
    seed passed or failed with the corpus: µP's logit growth was 2.05 on Python 3.11's prose, SP's
    attention growth under 2.5 on 3.12's. Here: SP logits 3.5 / 3.8, attention 12 / 15; µP 0.9 / 1.0
    and 0.8 / 1.1 on 3.11 / 3.12.)"""
    coord = coord_check(widths=(32, 128), train_data=corpus[0], lr=2**-6, steps=4, seeds=(0, 1),
                        cfg=RunConfig(batch_size=8, seq_len=64))
    assert coord["activations"][0] == "embedding" and coord["activations"][-1] == "logits"
    assert "router 0" in coord["activations"] and "MoE 1" in coord["activations"]
    table = coord["l1"]["sp"]["logits"]
    assert len(table) == 4 and len(table[0]) == 2
    for kind in ("sp", "mup"):  # the same model at the base width
        assert coord["l1"][kind]["logits"][0][0] == pytest.approx(coord["l1"]["sp"]["logits"][0][0])
    sp, mup = growth(coord, "sp"), growth(coord, "mup")
    assert sp["logits"] > 2.5 and 0.4 < mup["logits"] < 1.6
    assert sp["attention 0"] > 2.5 and mup["attention 0"] < 1.6


# ------------------------------------------------------------------------------ sweep and cache
def test_lr_sweep_save_load_and_summaries(corpus, tmp_path):
    train_data, val_data = corpus
    cfg = RunConfig(steps=5, batch_size=4, seq_len=32, warmup=1, eval_batches=1, diverged_loss=8.0)
    sweep = lr_sweep(widths=(32, 64), log2_lrs=(-6, 3), kinds=("sp", "mup"), train_data=train_data,
                     val_data=val_data, cfg=cfg, multipliers={"init_mult": {"output": 2.0}}, progress=False)
    assert sweep["multipliers"] == {"init_mult": {"output": 2.0}} and sweep["config"]["steps"] == 5
    assert sweep["val_loss"]["sp"]["32"] == sweep["val_loss"]["mup"]["32"]  # base width: identical runs
    assert sweep["val_loss"]["sp"]["64"] != sweep["val_loss"]["mup"]["64"]
    assert len(sweep["curves"]["mup"]["64"]) == 2 and len(sweep["curves"]["mup"]["64"][0]) == 1  # every 5th step
    assert mean_loss(sweep, "sp", 64)[-1] == math.inf  # LR 2^3 diverges
    save_sweep(sweep, tmp_path / "sweep.json")
    back = load_sweep(tmp_path / "sweep.json")
    assert back["val_loss"]["sp"]["64"][-1] == [None]
    assert mean_loss(back, "sp", 64) == mean_loss(sweep, "sp", 64)
    for kind in ("sp", "mup"):
        assert best_log2_lr(back, kind, 32) == -6
        assert optimum_drift(back, kind) == best_log2_lr(back, kind, 64) - best_log2_lr(back, kind, 32)
        transfer = loss_at_base_optimum(back, kind)
        assert transfer[32] == min(mean_loss(back, kind, 32))
    # a second seed, run separately, joins the first
    other = lr_sweep(widths=(32, 64), log2_lrs=(-6, 3), seeds=(1,), train_data=train_data, val_data=val_data,
                     cfg=cfg, multipliers={"init_mult": {"output": 2.0}}, progress=False)
    both = merge_seeds(back, other)
    assert both["seeds"] == [0, 1] and len(both["val_loss"]["mup"]["64"][0]) == 2
    assert both["val_loss"]["mup"]["64"][0][1] == other["val_loss"]["mup"]["64"][0][0]
    assert mean_loss(both, "mup", 64)[-1] == math.inf
    with pytest.raises(ValueError, match="differ"):
        merge_seeds(back, {**other, "widths": [32]})


def test_multiplier_search_on_the_proxy(corpus):
    train_data, val_data = corpus
    cfg = RunConfig(steps=4, batch_size=4, seq_len=32, warmup=1, eval_batches=1)
    search = multiplier_search("output", mults=(1, 4), log2_lrs=(-8, -6), train_data=train_data, val_data=val_data,
                               cfg=cfg, progress=False)
    assert search["mults"] == [1, 4] and len(search["val_loss"]) == 2 and len(search["val_loss"][0]) == 2
    flat = {(m, lr): search["val_loss"][i][j] for i, m in enumerate((1, 4)) for j, lr in enumerate((-8, -6))}
    assert flat[best_multiplier(search)] == min(flat.values())
    with pytest.raises(ValueError, match="role"):
        multiplier_search("attention", train_data=train_data, val_data=val_data, cfg=cfg)


# ------------------------------------------------------------------------------ refused settings
def test_run_config_and_parametrization_refuse_bad_fields():
    with pytest.raises(ValueError, match="eval_batches=0: must be a positive integer"):
        RunConfig(eval_batches=0)  # scored every LR 0.0: the "best"
    with pytest.raises(ValueError, match="min_lr_ratio=nan"):
        RunConfig(min_lr_ratio=float("nan"))
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        RunConfig(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="steps=2.5"):
        RunConfig(steps=2.5)
    RunConfig(**{**dataclasses.asdict(RunConfig()), "betas": [0.9, 0.95]})  # as the cached JSON stores it
    with pytest.raises(ValueError, match=r"lr_mult\['output'\]=nan"):
        Parametrization(lr_mult={"output": float("nan")})
    with pytest.raises(TypeError, match="base_width=32.0"):
        Parametrization(base_width=32.0)


def test_sweeps_check_every_setting_before_the_first_run(corpus, monkeypatch):
    train_data, val_data = corpus

    def no_training(*args, **kwargs):
        raise AssertionError("a run started before every setting was checked")

    monkeypatch.setattr(metap, "run", no_training)
    good = dict(widths=(32, 64), train_data=train_data, val_data=val_data, progress=False)
    for bad, error, match in [(dict(widths=(32, 40)), ValueError, "width 40 must be a multiple of head_dim"),
                              (dict(widths=(32, 32)), ValueError, "repeated"),
                              (dict(kinds=("sp", "MuP")), ValueError, r"kinds\[1\]='MuP': expected one of"),
                              (dict(log2_lrs=(-6, float("nan"))), ValueError, r"log2_lrs\[1\]=nan"),
                              (dict(seeds=(0, 1.5)), TypeError, r"seeds\[1\]=1.5"),
                              (dict(multipliers={"init_mul": {"output": 2}}), ValueError, "unknown fields"),
                              (dict(val_data=None), ValueError, "lr_sweep needs val_data"),
                              (dict(val_data=val_data.ids[:10]), ValueError, "val_data has 10 tokens")]:
        with pytest.raises(error, match=match):
            lr_sweep(**{**good, **bad})
    with pytest.raises(ValueError, match="multiplier_search needs val_data"):
        multiplier_search(train_data=train_data, progress=False)
    with pytest.raises(ValueError, match=r"mults\[1\]=-4"):
        multiplier_search(mults=(1, -4), train_data=train_data, val_data=val_data, progress=False)
    with pytest.raises(ValueError, match="width 40"):
        coord_check(widths=(32, 40), train_data=train_data)
    with pytest.raises(ValueError, match="coord_check needs train_data"):
        coord_check(widths=(32,))
    with pytest.raises(ValueError, match="lr=0"):
        coord_check(widths=(32,), train_data=train_data, lr=0)


def test_run_refuses_bad_arguments_before_training(corpus):
    train_data, val_data = corpus
    model = build_model(proxy_config(32), MUP)
    with pytest.raises(ValueError, match="lr=nan"):
        run(model, MUP, train_data, float("nan"))
    with pytest.raises(TypeError, match="train_data must be a TokenCorpus or Tensor"):
        run(model, MUP, None, 1e-3)
    with pytest.raises(TypeError, match="spec must be a Parametrization"):
        run(model, "mup", train_data, 1e-3)


def test_no_best_without_a_finite_loss():
    with pytest.raises(ValueError, match="no best multiplier"):
        best_multiplier({"mults": [1, 4], "log2_lrs": [-8, -6], "val_loss": [[None, None], [None, None]]})
    s = _fake_sweep()
    s["val_loss"]["sp"]["64"] = [[None]] * 5  # every LR diverged at this width
    with pytest.raises(ValueError, match="sp at width 64: no learning rate has a finite"):
        best_log2_lr(s, "sp", 64)


def _fake_sweep():
    lrs = [-10, -9, -8, -7, -6]
    def bowl(centre):
        return [[2.5 + 0.1 * (x - centre) ** 2] for x in lrs]
    return {"widths": [32, 64, 128], "log2_lrs": lrs, "kinds": ["sp", "mup"], "seeds": [0],
            "val_loss": {"sp": {"32": bowl(-7), "64": bowl(-8), "128": bowl(-9)[:-1] + [[None]]},
                         "mup": {"32": bowl(-7), "64": bowl(-7), "128": bowl(-7)}}}


def test_summaries_on_a_known_sweep():
    s = _fake_sweep()
    assert [best_log2_lr(s, "sp", w) for w in (32, 64, 128)] == [-7, -8, -9]
    assert optimum_drift(s, "sp") == -2 and optimum_drift(s, "mup") == 0
    assert loss_at_base_optimum(s, "sp")[128] == pytest.approx(2.9) and loss_at_base_optimum(s, "mup")[128] == 2.5


# ------------------------------------------------------------------------------ figures and widget
def test_figures():
    pytest.importorskip("plotly")
    from minillama4.viz.metap import (coord_check_figure, lr_sweep_figure, multiplier_search_figure, optimum_figure,
                                      scaling_rules_figure)

    s = _fake_sweep()
    fig = lr_sweep_figure(s)
    # per column: a line and a best-LR dot per width, plus one x-marker trace for sp d=128 (diverged)
    assert len(fig.data) == 2 * 3 * 2 + 1
    dots = [t for t in fig.data if t.mode == "markers" and t.marker.size == 13]
    assert [d.x[0] for d in dots] == [-7, -8, -9, -7, -7, -7]
    assert list(optimum_figure(s).data[0].y) == [-7, -8, -9]

    coord = {"widths": [32, 64], "kinds": ["sp", "mup"], "lr": 0.01, "activations": ["embedding", "logits"],
             "l1": {k: {"embedding": [[1, 1], [1, 1], [1, 1]], "logits": [[1, 2], [1, 4], [1, 8]]}
                    for k in ("sp", "mup")}}
    fig = coord_check_figure(coord)
    assert len(fig.data) == 2 * 3 * 2  # kinds x steps (0, 1, 2) x activations
    assert list(fig.data[-1].y) == [1, 8]

    rules = {kind: {w: tensor_rules(build_model(proxy_config(w), Parametrization(kind, 32)), Parametrization(kind, 32))
                    for w in (32, 64)} for kind in ("sp", "mup")}
    fig = scaling_rules_figure(rules)
    hidden_lr = next(t for t in fig.data if t.name == "hidden (µP)" and t.xaxis == "x")
    assert list(hidden_lr.y) == [1.0, 0.5]

    search = {"role": "output", "what": "init_mult", "mults": [1, 4], "log2_lrs": [-8, -7, -6], "width": 32,
              "val_loss": [[3.0, 2.9, 2.8], [2.7, 2.5, None]]}
    fig = multiplier_search_figure(search)
    assert list(fig.data[1].x) == [-7] and list(fig.data[1].y) == ["x4"]  # the star on the best cell
    assert math.isnan(fig.data[0].z[1][2])  # a diverged run is a gap


def test_figures_refuse_empty_input_and_skip_widths_without_a_best():
    pytest.importorskip("plotly")
    from minillama4.viz.metap import coord_check_figure, lr_sweep_figure, multiplier_search_figure, optimum_figure

    with pytest.raises(ValueError, match=r"coord lacks \['widths', 'kinds'.*metap.coord_check"):
        coord_check_figure({})
    with pytest.raises(ValueError, match="sweep lacks"):
        lr_sweep_figure({})
    with pytest.raises(TypeError, match="search must be a Mapping"):
        multiplier_search_figure([])
    search = {"role": "output", "what": "init_mult", "mults": [1], "log2_lrs": [-8], "width": 32, "val_loss": [[None]]}
    with pytest.raises(ValueError, match="no run has a finite"):
        multiplier_search_figure(search)
    s = _fake_sweep()
    s["val_loss"]["sp"]["64"] = [[None]] * 5  # every LR diverged: no best-LR dot, an x at each LR
    fig = lr_sweep_figure(s)
    assert len([t for t in fig.data if t.mode == "markers" and t.marker.size == 13]) == 5
    assert list(optimum_figure(s).data[0].y) == [-7, None, -9]
    from minillama4.viz.metap import sweep_explorer

    assert "diverged" in sweep_explorer(s).table.value


def test_sweep_explorer_widget():
    pytest.importorskip("ipywidgets")
    from minillama4.viz.metap import sweep_explorer
    from minillama4.viz.widgets import PLOTLY_MIME

    ex = sweep_explorer(_fake_sweep())
    assert ex.kind.value == "both" and len(ex.figure.layout.annotations) == 2  # two subplot titles
    assert "2^-9" in ex.table.value
    ex.kind.value = "mup"
    ex.widths[2].value = False
    lines = [t for t in ex.figure.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["d = 32", "d = 64"]
    (shown,) = ex.output.outputs
    assert PLOTLY_MIME in shown["data"] and "2^-9" not in ex.table.value
    for box in ex.widths:
        box.value = False
    assert ex.figure is None and "Tick" in ex.table.value
