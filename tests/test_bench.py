"""Smoke test of minillama4.bench at toy sizes: every measurement runs and returns sane numbers.

No timing assertions: speed is what the benchmark reports (docs/benchmarks.md), not what a test
checks. Needs transformers (a dev dependency), like the parity tests.
"""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from minillama4 import bench  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def models():
    return bench.build_models("tiny", seed=0)


def test_import_does_not_import_transformers():
    code = "import sys, minillama4.bench; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_agreement(models):
    ours, hf = models
    a = bench.check_agreement(ours, hf, tokens=16, new_tokens=4, prompt_tokens=4)
    assert a["max_abs_diff_fast"] < 1e-4
    assert a["max_abs_diff_reference"] < 1e-4
    assert a["greedy_same_tokens"]


def test_forward_decode_trace(models):
    ours, hf = models
    f = bench.bench_forward(ours, hf, tokens=16, warmup=0, repeats=1)
    assert set(f["results"]) == {"ours_fast", "ours_reference", "transformers"}
    assert all(r["tokens_per_s"] > 0 for r in f["results"].values())

    d = bench.bench_decode(ours, hf, new_tokens=4, prompt_tokens=4, warmup=0, repeats=1)
    for r in d["results"].values():
        assert r["end_to_end_tokens_per_s"] > 0 and r["generate_median_s"] > 0 and r["prefill_median_s"] > 0

    t = bench.bench_trace(ours, tokens=16, warmup=0, repeats=1)
    assert all(r["tokens_per_s"] > 0 for r in t["results"].values())
    assert ours.trace is None  # the trace was closed
    assert bench._dispatch_of(ours) == "fast"  # the benchmarks restore the dispatch


def test_main_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = bench.main(["--preset", "tiny", "--tokens", "16", "--new-tokens", "4", "--prompt-tokens", "4",
                     "--warmup", "0", "--repeats", "1", "--decode-repeats", "1", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "than transformers" in out and "machine:" in out and "RouterTrace active" in out
    r = json.loads(path.read_text())
    assert r["settings"]["preset"] == "tiny"
    assert r["agreement"]["max_abs_diff_fast"] < 1e-4
    assert r["forward"]["results"]["ours_fast"]["tokens_per_s"] > 0
    assert r["decode"]["results"]["transformers"]["end_to_end_tokens_per_s"] > 0


def test_main_without_transformers_says_how_to_install_it(monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(SystemExit, match=r"compares against Hugging Face transformers: pip install 'minillama4\[dev\]'"):
        bench.main(["--preset", "tiny"])


def test_ratio_phrase():
    assert bench.ratio_phrase(32.0, 10.0) == "ours is 3.2x faster than transformers"
    assert bench.ratio_phrase(10.0, 20.0) == "ours is 2.0x slower than transformers"


def test_scout_bench_dry_run_on_cpu_reports_every_decode_mode():
    """`minillama4 bench PRESET --int4` on the CPU at toy sizes: the same code scripts/gpu_check.sh
    runs on a GPU (where "graph" replaces "static")."""
    from minillama4 import bench_scout

    r = bench_scout.run("small", device="cpu", int4=True, which="all", contexts=(16, 40), prefill=32,
                        slice_layers=2, compare_hf=True, steps=3)
    assert [(d["context"], d["mode"]) for d in r["decode"]] == [(16, "eager"), (16, "static"), (40, "eager"), (40, "static")]
    assert all(d["tok_s"] > 0 and 0 < d["fraction_of_roofline"] for d in r["decode"])
    assert r["slice"]["decode_step"]["mode"] == "static" and r["slice"]["decode_step"]["tok_s"] > 0
    report = bench_scout.format_report(r)
    assert "( eager)" in report and "(static)" in report and "static step at context 16" in report


def test_scout_bench_profile_lists_where_a_static_step_spends_its_time():
    from minillama4 import bench_scout, configs, random_model

    model = random_model(configs.get("small"), quantize="int4", which="all")
    rows = bench_scout.kernel_profile(model, context=12, top=5)
    assert len(rows) == 6 and rows[-1]["kernel"] == "(all)"
    assert all(r["us_per_step"] > 0 and r["calls_per_step"] > 0 for r in rows)
    assert rows[-1]["us_per_step"] >= sum(r["us_per_step"] for r in rows[:-1])


def test_scout_bench_refuses_bad_flags_before_any_work():
    """The slice runs last: a slice deeper than the preset was refused only after every other part."""
    from minillama4 import bench_scout

    for argv, match in [(["small", "--device", "cpu", "--slice-layers", "9"], "--slice-layers 9: small has 4 layers"),
                        (["small", "--device", "cpu", "--prefill", "0"], "--prefill 0: must be >= 1"),
                        (["small", "--device", "cpu", "--contexts", "16,x"], "--contexts '16,x': expected comma")]:
        with pytest.raises(SystemExit, match=match):
            bench_scout.main(argv)
