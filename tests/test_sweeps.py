"""Balancing sweeps (minillama4.train.sweeps) on the tiny preset: few steps, fixed seeds."""

import json

import pytest
import torch

from minillama4.balance import dropped_fraction
from minillama4.data import load_corpus
from minillama4.train.loop import History
from minillama4.train.sweeps import (BalancingRun, SweepSetup, compact_history, corpus_fingerprint, default_runs,
                                     dropped_fractions, load_sweep,
                                     mean_imbalance, record_loads, run_balancing, run_method, run_sweep,
                                     sweep_index)

SETUP = SweepSetup(preset="tiny", chars_per_domain=20_000, steps=12, batch_size=4, seq_len=32, every=5,
                   load_every=4, tail=3, eval_batches=2)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(seed=0, chars_per_domain=20_000)


def test_run_names_and_default_runs():
    assert BalancingRun().name == "none"
    assert BalancingRun(switch_aux=0.01, z_loss=1e-3).name == "switch_aux=0.01+z_loss=0.001"
    runs = default_runs()
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) == 11
    assert names[:5] == ["none", "switch_aux=0.01", "z_loss=0.001", "switch_aux=0.01+z_loss=0.001",
                         "bias_update_rate=0.01"]
    assert SETUP.train_config(BalancingRun(bias_update_rate=0.1)).bias_update_rate == 0.1


def test_record_shapes_windows_and_json(corpus):
    record, hist = run_balancing(BalancingRun(bias_update_rate=0.01), SETUP, corpus, history=True)
    assert record["name"] == "bias_update_rate=0.01" and record["bias_update_rate"] == 0.01
    assert record["steps_run"] == 12 and record["step"] == [4, 9, 11]  # windows of 5, the last short
    assert record["load_step"] == [3, 7, 11]
    assert record["loss"][0] == pytest.approx(sum(hist.loss[:5]) / 5, abs=1e-4)
    assert record["loss"][2] == pytest.approx(sum(hist.loss[10:]) / 2, abs=1e-4)
    mm = hist.max_over_mean()
    assert torch.tensor(record["max_over_mean"][1]) == pytest.approx(mm[5:10].mean(0), abs=1e-3)
    loads = record_loads(record)
    assert loads.shape == (3, 4, 4) and (loads.sum(-1) == 4 * 4 * 32).all()  # 4 steps x 128 tokens
    assert torch.equal(record_loads(record, "tail_load"), hist.loads()[-3:])
    assert record["tokens_per_step"] == 128 and record["n_experts"] == 4 and record["moe_layers"] == [0, 1, 2, 3]
    assert torch.tensor(record["final_bias"]) == pytest.approx(hist.bias[-1], abs=1e-4)
    assert record["val_loss"] == pytest.approx(hist.val_loss[-1], abs=1e-4)
    assert json.loads(json.dumps(record)) == record  # plain JSON


def test_short_run_repeats_the_start_of_the_full_run(corpus):
    full = run_balancing(BalancingRun(), SETUP, corpus)
    short = run_balancing(BalancingRun(), SETUP, corpus, max_steps=5)
    assert short["steps_run"] == 5 and short["final_bias"] is None
    assert short["loss"][0] == pytest.approx(full["loss"][0], abs=1e-4)  # same batches, same schedule
    assert short["load"][0] == full["load"][0]


def test_dropped_fractions_matches_balance_per_step():
    loads = torch.tensor([[[8, 0, 0, 0], [2, 2, 2, 2]], [[4, 4, 0, 0], [3, 1, 2, 2]]])  # [s=2, L=2, e=4]
    out = dropped_fractions(loads, (1.0, 2.0))
    assert out.shape == (2, 2)
    # factor 1: capacity 2 per expert; layer 0 drops 6/8 then 4/8, layer 1 drops 0 then 1/8
    assert out[0].tolist() == pytest.approx([(6 / 8 + 4 / 8) / 2, (0 + 1 / 8) / 2])
    assert out[1, 0].item() == pytest.approx((dropped_fraction(loads[0, 0], 2.0) + dropped_fraction(loads[1, 0], 2.0)) / 2)
    assert out[1, 1].item() == 0.0


def test_mean_imbalance_averages_steps():
    loads = torch.tensor([[[4, 0]], [[2, 2]]])  # one layer, two steps
    (layer,) = mean_imbalance(loads)
    assert layer["max_over_mean"] == pytest.approx((2.0 + 1.0) / 2)
    assert layer["entropy_frac"] == pytest.approx((0.0 + 1.0) / 2)
    assert layer["cv"] == pytest.approx((1.0 + 0.0) / 2)


def test_methods_and_index():
    runs = {r.name: {**r.overrides(), "name": r.name} for r in default_runs()}
    assert run_method(runs["none"]) == ("none", 0.0)
    assert run_method(runs["bias_update_rate=0.1"]) == ("bias_update_rate", 0.1)
    assert run_method(runs["switch_aux=0.01+z_loss=0.001"]) == ("combined", 0.0)
    index = sweep_index({"runs": runs})
    assert list(index["switch_aux"]) == [0.0, 0.001, 0.01, 0.1]  # "none" is coefficient 0
    assert index["switch_aux"][0.0] == "none" and index["z_loss"][0.01] == "z_loss=0.01"
    assert list(index["bias_update_rate"]) == [0.0, 0.001, 0.01, 0.1]


def test_run_sweep_saves_and_resumes(tmp_path, corpus, capsys):
    path = tmp_path / "sweep.json"
    setup = SweepSetup(**{**SETUP.__dict__, "steps": 3, "eval_batches": 0})
    first = run_sweep([BalancingRun()], setup, path)
    assert list(first["runs"]) == ["none"] and first["runs"]["none"]["val_loss"] is None
    saved = load_sweep(path)
    assert saved == json.loads(json.dumps(first)) and saved["setup"]["steps"] == 3
    assert saved["meta"]["corpus"] == corpus_fingerprint(corpus) and saved["meta"]["threads"] >= 1
    again = run_sweep([BalancingRun(), BalancingRun(z_loss=1e-3)], setup, path)
    assert list(again["runs"]) == ["none", "z_loss=0.001"]
    assert again["runs"]["none"] == saved["runs"]["none"]  # resumed, not repeated
    assert "z_loss=0.001" in capsys.readouterr().out


def test_corpus_fingerprint_tells_corpora_apart(corpus):
    train_data, val_data = corpus
    fp = corpus_fingerprint(corpus)
    assert fp.startswith(f"{len(train_data)}+{len(val_data)}:") and len(fp.split(":")[1]) == 32
    assert corpus_fingerprint(load_corpus(seed=0, chars_per_domain=20_000)) == fp  # deterministic
    assert corpus_fingerprint(load_corpus(seed=1, chars_per_domain=20_000)) != fp


def test_bad_setups_runs_and_empty_loads_are_refused():
    with pytest.raises(ValueError, match="tail=0: must be a positive integer"):
        SweepSetup(tail=0)
    with pytest.raises(ValueError, match="preset='huge': expected one of"):
        SweepSetup(preset="huge")
    with pytest.raises(ValueError, match=r"preset='scout': expected one of \('tiny', 'small', 'tiny_multimodal'\)"):
        SweepSetup(preset="scout")  # a sweep would build and train full Scout
    with pytest.raises(ValueError, match="switch_aux=nan: must be a finite number >= 0"):
        BalancingRun(switch_aux=float("nan"))
    with pytest.raises(ValueError, match="max_steps=0: must be a positive integer"):
        run_balancing(BalancingRun(), SETUP, max_steps=0)
    with pytest.raises(TypeError, match="corpus must be a \\(train, val\\) pair"):
        run_balancing(BalancingRun(), SETUP, corpus=torch.arange(10), max_steps=1)
    with pytest.raises(ValueError, match="history has 0 steps"):
        compact_history(History(moe_layers=[0]))
    empty = torch.zeros(0, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="loads has shape \\(0, 4, 4\\)"):
        dropped_fractions(empty)
    with pytest.raises(ValueError, match="loads has shape \\(0, 4, 4\\)"):
        mean_imbalance(empty)
    with pytest.raises(ValueError, match="factors is empty"):
        dropped_fractions(torch.ones(1, 1, 4), ())


def test_run_sweep_never_replaces_another_sweep(tmp_path):
    setup = SweepSetup(**{**SETUP.__dict__, "steps": 2, "eval_batches": 0})
    path = tmp_path / "sweep.json"
    run_sweep([BalancingRun()], setup, path, verbose=False)
    saved = path.read_text()
    other = SweepSetup(**{**setup.__dict__, "steps": 3})
    refusal = "holds another sweep \\(1 run\\(s\\) saved; steps=2 there, 3 here\\).*another path"
    with pytest.raises(ValueError, match=refusal):
        run_sweep([BalancingRun(z_loss=1e-3)], other, path, verbose=False)
    assert path.read_text() == saved  # kept as it was
    not_a_sweep = tmp_path / "notes.json"
    not_a_sweep.write_text("my notes")
    with pytest.raises(ValueError, match="exists but holds no saved sweep"):
        run_sweep([BalancingRun()], setup, not_a_sweep, verbose=False)
    assert not_a_sweep.read_text() == "my notes"


def test_run_sweep_refuses_a_path_it_cannot_write_before_any_run(tmp_path, monkeypatch):
    """It trained the first run, then failed in mkdir (the run's minutes lost)."""
    from minillama4.train import sweeps

    monkeypatch.setattr(sweeps, "run_balancing", lambda *a, **k: pytest.fail("a run started before the path was checked"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"sweep\.json': cannot be written \('.*afile' is not a folder\)"):
        run_sweep([BalancingRun()], SETUP, tmp_path / "afile" / "deeper" / "sweep.json", verbose=False)
    with pytest.raises(ValueError, match=r"is a folder: pass a file path such as"):
        run_sweep([BalancingRun()], SETUP, tmp_path, verbose=False)
