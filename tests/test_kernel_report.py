"""The Triton kernels compile for an H100 (sm_90) on this GPU-less machine, without spilling
registers, and the word GEMV needs fewer instructions per weight byte than the byte one
(minillama4/kernel_report.py; the measured speeds are in docs/benchmarks.md)."""

import importlib.util

import pytest

pytest.importorskip("triton", reason="pip install triton (the dev extra installs it on Linux x86-64)")
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("this Triton has no NVIDIA backend", allow_module_level=True)

from minillama4 import kernel_report  # noqa: E402


@pytest.fixture(scope="module")
def reports():
    return kernel_report.gemv_reports(90) + kernel_report.fused_reports(90)


def test_every_kernel_compiles_for_sm90_without_spilling(reports):
    assert len(reports) > 20
    assert not [r.name for r in reports if r.spills]
    assert all(r.registers <= 255 and r.loop for r in reports)


def test_the_word_gemv_runs_fewer_instructions_per_byte(reports):
    words = [r for r in reports if r.name.startswith("w4a16 words")]
    byte_kernels = [r for r in reports if r.name.startswith("w4a16 bytes")]
    assert words and byte_kernels
    # no int-to-float conversions in the word kernel: nibbles become floats by a byte permute
    assert all(not any(i.startswith("I2F") for i in r.loop) for r in words)
    assert max(r.per_byte for r in words) < min(r.per_byte for r in byte_kernels)
    assert min(r.per_byte for r in words) < 9


def test_decode_attention_uses_tensor_cores_in_bf16(reports):
    attention = [r for r in reports if r.name.startswith("decode_attention ")]
    assert len(attention) == 2
    assert all(any(i.startswith("HMMA") for i in r.loop) for r in attention)


def test_the_report_prints_a_line_per_kernel(capsys, monkeypatch):
    monkeypatch.setattr(kernel_report, "gemv_reports", lambda arch: [])
    kernel_report.main(["--arch", "90"])
    out = capsys.readouterr().out
    assert "sm_90" in out and "decode_attention chunked" in out and "regs" in out
