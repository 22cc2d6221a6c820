"""Figures and the explorer of the load-balancing study (minillama4.viz.balance_study), on small
hand-made sweep records: no training."""

import json

import pytest
import torch

pytest.importorskip("plotly")
pytest.importorskip("ipywidgets")

from minillama4.train.sweeps import BalancingRun, default_runs  # noqa: E402
from minillama4.viz.balance_study import (balance_explorer, dropped_fraction_bars, final_load_heatmap,  # noqa: E402
                                          max_over_mean_curves, run_label)

PLOTLY_MIME = "application/vnd.plotly.v1+json"
LAYERS, E = [0, 1], 4


def record(run: BalancingRun, skew: float, seed: int = 0) -> dict:
    """A record with the sweeps.compact_history keys: expert 0 gets `skew` times the others' load."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([skew] + [1.0] * (E - 1))
    loads = torch.stack([torch.stack([torch.multinomial(weights, 64, True, generator=g).bincount(minlength=E)
                                      for _ in LAYERS]) for _ in range(6)])  # [s=6, L, e], 64 tokens per step
    mm = loads.float().amax(-1) / loads.float().mean(-1)
    return {"name": run.name, **run.overrides(), "moe_layers": LAYERS, "n_experts": E, "tokens_per_step": 64,
            "steps_run": 6, "step": [1, 3, 5], "loss": [3.0, 2.5, 2.0 + 0.01 * skew],
            "switch_aux_loss": [1.0] * 3, "z_loss_value": [2.0] * 3,
            "max_over_mean": mm.reshape(3, 2, 2).mean(0).tolist(), "load_step": [2, 5],
            "load": loads.reshape(2, 3, 2, E).sum(1).tolist(), "tail_load": loads[-2:].tolist(),
            "final_bias": None, "val_loss": 2.0, "seconds": 1.0}


@pytest.fixture(scope="module")
def sweep():
    skews = {"none": 20.0, "switch_aux": 3.0, "z_loss": 15.0, "bias_update_rate": 1.0}
    runs = {}
    for i, run in enumerate(default_runs()):
        active = [k for k in ("switch_aux", "z_loss", "bias_update_rate") if getattr(run, k)]
        runs[run.name] = record(run, skews[active[0]] if len(active) == 1 else (skews["none"] if not active else 2.0),
                                seed=i)
    return {"setup": {}, "meta": {}, "runs": runs}


def test_run_labels():
    assert run_label(BalancingRun().overrides()) == "no balancing"
    assert run_label(BalancingRun(switch_aux=0.01, z_loss=1e-3).overrides()) == "Switch α=0.01 + z-loss c_z=0.001"
    assert run_label(BalancingRun(bias_update_rate=0.1).overrides()) == "bias γ=0.1"


def test_max_over_mean_curves_per_layer_and_mean(sweep):
    runs = sweep["runs"]
    pair = {"none": runs["none"], "bias": runs["bias_update_rate=0.01"]}
    fig = max_over_mean_curves(pair)
    assert [t.name for t in fig.data] == ["none", "bias"]
    assert list(fig.data[0].x) == [1, 3, 5]
    assert list(fig.data[0].y) == pytest.approx(torch.tensor(runs["none"]["max_over_mean"]).mean(1).tolist())
    fig1 = max_over_mean_curves(pair, layer=1, log_y=False)
    assert list(fig1.data[1].y) == pytest.approx([row[1] for row in runs["bias_update_rate=0.01"]["max_over_mean"]])
    assert "layer 1" in fig1.layout.title.text and fig.layout.yaxis.type == "log"


def test_dropped_fraction_bars_in_percent():
    fig = dropped_fraction_bars({"a": [0.5, 0.25, 0.0], "b": [0.1, 0.0, 0.0]})
    assert len(fig.data) == 3 and fig.data[1].name == "capacity factor 1.25"
    assert list(fig.data[0].y) == pytest.approx([50.0, 10.0]) and list(fig.data[0].x) == ["a", "b"]
    assert fig.data[0].text[0] == "50.0%"
    # a row of the wrong length was reshaped across runs (or failed to reshape) instead of named
    with pytest.raises(ValueError, match=r"table\['b'\] has 2 entries, expected 3 \(one per capacity factor"):
        dropped_fraction_bars({"a": [0.5, 0.25, 0.0], "b": [0.1, 0.0]})
    with pytest.raises(ValueError, match="table is empty"):
        dropped_fraction_bars({})
    with pytest.raises(TypeError, match="table must be a Mapping, got list"):
        dropped_fraction_bars([0.5, 0.25, 0.0])


def test_final_load_heatmap_rows_are_shares(sweep):
    runs = sweep["runs"]
    fig = final_load_heatmap({"none": runs["none"], "bias": runs["bias_update_rate=0.01"]}, layer=1)
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (2, E) and torch.allclose(z.sum(1), torch.ones(2, dtype=z.dtype))
    tail = torch.tensor(runs["none"]["tail_load"])[:, 1].sum(0).double()
    assert torch.allclose(z[0], tail / tail.sum())
    assert list(fig.data[0].y) == ["none", "bias"]


def test_explorer_follows_the_controls(sweep):
    ex = balance_explorer(sweep)
    assert ex.method.value == "switch_aux" and ex.coefficient.value == 0.01 and ex.run_name == "switch_aux=0.01"
    assert [v for _, v in ex.coefficient.options] == [0.0, 0.001, 0.01, 0.1]
    assert "Switch α=0.01" in ex.load_figure.layout.title.text and "layer 0" in ex.load_figure.layout.title.text
    assert [t.name for t in ex.loss_figure.data] == ["no balancing", "Switch α=0.01"]
    assert len(ex.curves_output.outputs) == 2 and PLOTLY_MIME in ex.load_output.outputs[0]["data"]
    json.dumps(ex.curves_output.outputs)  # plain JSON, as the notebook stores it

    ex.method.value = "bias_update_rate"  # the slider's options change and its value goes to the default
    assert ex.coefficient.value == 0.01 and ex.run_name == "bias_update_rate=0.01"
    ex.coefficient.value = 0.1
    assert ex.run_name == "bias_update_rate=0.1" and "bias γ=0.1" in ex.summary.value
    ex.layer.value = 1
    assert "layer 1" in ex.load_figure.layout.title.text and "layer 1" in ex.summary.value
    shares = torch.tensor([list(t.y) for t in ex.load_figure.data])  # [e, windows]
    assert torch.allclose(shares.sum(0), torch.ones(2, dtype=shares.dtype))

    ex.coefficient.value = 0.0  # coefficient 0 is the no-balancing run, shown alone
    assert ex.run_name == "none" and [t.name for t in ex.loss_figure.data] == ["no balancing"]
    assert "(no balancing" in ex.summary.value


def test_figures_name_bad_records_and_layers():
    rec = {"max_over_mean": [[1.0, 1.2]], "moe_layers": [0, 1], "step": [0], "loss": [3.0]}
    with pytest.raises(ValueError, match=r"layer=99: not an MoE layer of run 'r' \(its MoE layers: \[0, 1\]\)"):
        max_over_mean_curves({"r": rec}, 99)  # was "99 is not in list"
    with pytest.raises(ValueError, match=r"records\['r'\] lacks \['max_over_mean', 'moe_layers'\]: expected what "
                                         r"train.sweeps.run_balancing"):
        max_over_mean_curves({"r": {"step": [0]}})
    with pytest.raises(TypeError, match="records must be a Mapping, got list"):
        max_over_mean_curves([rec])
    assert list(max_over_mean_curves({"r": rec}, 1).data[0].y) == [1.2]
    with pytest.raises(ValueError, match=r"records\['r'\] lacks \['tail_load'\]"):
        final_load_heatmap({"r": rec}, 0)
    with pytest.raises(ValueError, match=r"sweep lacks \['runs'\]: expected what train.sweeps.run_sweep or "
                                         r"load_sweep returns \(got an empty dict\)"):
        balance_explorer({})
    with pytest.raises(TypeError, match="sweep must be a Mapping, got list"):
        balance_explorer([])
