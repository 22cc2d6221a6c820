"""The `minillama4` command line, called in-process through main(argv)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import minillama4
from minillama4.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_params_scout_json_exact(capsys):
    code, out, _ = run(capsys, "params", "scout", "--json")
    d = json.loads(out)
    assert code == 0
    assert d["total"] == 108_641_793_536 == d["published_total"]
    assert d["text_total"] == 107_769_861_120
    assert d["vision_total"] == 871_932_416
    assert d["total"] == sum(c["total"] for c in d["components"].values())
    assert set(d["memory_gib"]) == {"bf16", "fp8", "int4"}


def test_params_maverick_json_exact(capsys):
    code, out, _ = run(capsys, "params", "maverick", "--json")
    assert code == 0 and json.loads(out)["total"] == 401_583_781_376


def test_params_table(capsys):
    code, out, _ = run(capsys, "params", "scout")
    assert code == 0
    assert "108,641,793,536" in out and "bf16" in out and "int4" in out and "GiB" in out
    assert "exact match" in out and "text.routed_experts" in out


def test_params_behemoth_is_marked_illustrative(capsys):
    code, out, _ = run(capsys, "params", "behemoth")
    assert code == 0 and "illustrative" in out.lower()
    code, out, _ = run(capsys, "params", "behemoth", "--json")
    assert code == 0 and "illustrative" in json.loads(out)["note"].lower()


def _routing_rows(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer")) + 2
    return [line.split() for line in lines[start:] if line.strip()]


def test_generate_preset(capsys):
    code, out, err = run(capsys, "generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "5")
    assert code == 0, err
    assert "RANDOM" in out and "gibberish" in out
    rows = _routing_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]  # tiny: every layer is MoE
    assert all(int(r[1]) > 0 for r in rows)


def test_generate_deterministic_with_seed(capsys):
    argv = ["generate", "--preset", "tiny", "--prompt", "hello", "--max-new-tokens", "6",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    first = run(capsys, *argv)
    assert first[0] == 0
    assert run(capsys, *argv) == first


def test_generate_prints_what_the_library_generates(capsys):
    """The CLI's sampled text and routing counts are those of a direct library call with the same
    preset, seed, temperature and top-p (so no flag can be silently dropped)."""
    argv = ["generate", "--preset", "tiny", "--prompt", "hello", "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    from minillama4.cli import _printable
    from minillama4.tokenizer import load_tokenizer

    model = minillama4.Llama4Text.random(minillama4.configs.tiny(), seed=7).eval()
    tok = load_tokenizer(None)
    ids = tok.encode("hello", bos=True)
    with minillama4.RouterTrace(model) as trace:
        new = model.generate(torch.tensor([ids]), 6, temperature=0.8, top_p=0.9, seed=7,
                             stop_tokens=model.cfg.eos_token_id)[0, len(ids):].tolist()
    lines = out.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("generated"))) + 1] == _printable(tok.decode(new))
    assert [int(r[1]) for r in _routing_rows(out)] == [s["tokens"] for s in trace.summary()]
    greedy = run(capsys, "generate", "--preset", "tiny", "--prompt", "hello", "--max-new-tokens", "6", "--seed", "7")
    assert greedy[1] != out  # temperature, top-p and seed reached the sampler


def test_trace_prints_the_routers_choices(capsys):
    code, out, err = run(capsys, "trace", "--preset", "tiny", "--prompt", "abc")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("pos"))
    printed = [[int(x) for x in line.split()[2:]] for line in lines[header + 2:] if line.strip()]
    model = minillama4.Llama4Text.random(minillama4.configs.tiny(), seed=0).eval()
    from minillama4.tokenizer import load_tokenizer

    with minillama4.RouterTrace(model) as trace, torch.no_grad():
        model(torch.tensor([load_tokenizer(None).encode("abc", bos=True)]))
    expected = torch.stack([trace.expert_ids(layer=i)[:, 0] for i in trace.moe_layers], dim=1)
    assert printed == expected.tolist()


def test_trace_one_row_per_token(capsys):
    code, out, err = run(capsys, "trace", "--preset", "tiny", "--prompt", "abc")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("pos"))
    assert lines[header].split() == ["pos", "token", "L0", "L1", "L2", "L3"]
    rows = [line.split() for line in lines[header + 2:] if line.strip()]
    assert [r[:2] for r in rows] == [["0", "<|begin_of_text|>"], ["1", "a"], ["2", "b"], ["3", "c"]]
    assert all(0 <= int(x) < 4 for r in rows for x in r[2:])


def test_trace_layers(capsys):
    code, out, _ = run(capsys, "trace", "--preset", "tiny", "--prompt", "abc", "--layers", "1,3")
    header = next(line for line in out.splitlines() if line.startswith("pos"))
    assert code == 0 and header.split() == ["pos", "token", "L1", "L3"]
    code, _, err = run(capsys, "trace", "--preset", "tiny", "--prompt", "abc", "--layers", "9")
    assert code == 2 and err.startswith("error:")


def test_checkpoint(capsys, tmp_path):
    minillama4.Llama4Text.random(minillama4.configs.tiny()).save_pretrained(tmp_path)
    code, out, err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "hi",
                         "--max-new-tokens", "3")
    assert code == 0, err
    assert "checkpoint" in out and len(_routing_rows(out)) == 4
    # same weights as the preset with seed 0, so the same routing
    code, preset_out, _ = run(capsys, "generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "3")
    assert _routing_rows(out) == _routing_rows(preset_out)
    code, out, err = run(capsys, "trace", "--checkpoint", str(tmp_path), "--prompt", "hi", "--dtype", "bf16")
    assert code == 0, err


@pytest.mark.parametrize("argv", [
    ["params", "nope"],
    ["generate", "--preset", "nope", "--prompt", "x"],
    ["generate", "--preset", "scout", "--prompt", "x"],  # far too big for random weights
    ["generate", "--checkpoint", "/definitely/not/here", "--prompt", "x"],
    ["generate", "--preset", "tiny", "--prompt", ""],
    ["trace", "--preset", "tiny", "--prompt", ""],
    ["generate", "--preset", "tiny", "--prompt", "x", "--top-p", "0"],  # ValueError from the library
    ["generate", "--prompt", "x"],  # neither --preset nor --checkpoint
    ["generate", "--preset", "tiny", "--prompt", "x", "--seed", str(2**70)],  # torch seeds are < 2**63
    [],
])
def test_bad_input_exits_2_with_one_line_error(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_checkpoint_without_tokenizer_json_must_read_the_byte_tokenizer(capsys, tmp_path):
    """Without tokenizer.json the CLI falls back to the course's byte tokenizer; for a model trained
    on another vocabulary (here bos 1, 320 ids) that printed nonsense and exited 0."""
    from helpers import small_text

    minillama4.Llama4Text.random(small_text()).save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no tokenizer.json, and its model was not trained on the course's byte tokenizer (config: " \
           "bos_token_id 1, vocab_size 320; byte tokenizer: 256, 272)" in err


def test_empty_checkpoint_dir(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert code == 2 and err.startswith("error:") and "config.json" in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_doctor(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nbval", None)  # import fails: must be reported, not raised
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert "OK       torch:" in out and "python" in out
    assert "MISSING  nbval" in out
    for name in ("einops", "safetensors", "numpy", "jupyterlab", "ipywidgets", "plotly", "pytest",
                 "transformers", "jupyterlab_widgets", "cuda", "ram", "torch threads"):
        assert name in out


def test_bench_forwards_all_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("minillama4.bench")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "minillama4.bench", fake)
    assert main(["bench", "--help", "--steps", "3", "extra"]) == 0
    assert seen == [["--help", "--steps", "3", "extra"]]


def test_import_does_not_pull_optional_packages():
    code = ("import minillama4.cli, sys; bad = [m for m in ('transformers', 'plotly', 'ipywidgets', "
            "'jupyterlab') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_help_returns_instead_of_raising(capsys, monkeypatch):
    def fake_main(argv=None):
        raise SystemExit(0)

    monkeypatch.setitem(sys.modules, "minillama4.bench", types.SimpleNamespace(main=fake_main))
    assert main(["bench", "--help"]) == 0


def test_bench_missing_module_is_an_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "minillama4.bench", None)
    code, _, err = run(capsys, "bench")
    assert code == 2 and err.startswith("error:") and "bench" in err


@pytest.mark.parametrize("argv, says", [
    (["--preset", "tiny", "--threads", "0"], "--threads 0: must be >= 1"),
    (["--preset", "tiny", "--tokens", "0"], "--tokens 0: must be >= 1"),
    (["--preset", "tiny", "--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--preset", "tiny", "--device", "gpu"], "device='gpu'"),
    (["--preset", "tiny", "--json", "/definitely/not/here/x.json"], "cannot write there"),
    (["--preset", "scout"], "short by"),  # 405 GiB of fp32 weights: refused before building anything
    (["scout", "--int4", "--contexts", "128,x", "--device", "cpu"], "--contexts"),
])
def test_bench_refuses_bad_arguments_before_running(capsys, monkeypatch, argv, says):
    """Each used to run (minutes) and then fail, exit 2 with no message, or be OOM-killed."""
    import minillama4.plan

    monkeypatch.setattr(minillama4.plan, "available_bytes", lambda device="cpu": 16 * 2**30)  # any machine
    code, out, err = run(capsys, "bench", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1
