"""The Triton W4A16 expert kernel (minillama4.w4a16) on the CPU, under Triton's interpreter.

Triton decides at import time whether to compile or interpret, so without TRITON_INTERPRET=1
this module runs itself again in a subprocess with it set. On a GPU, tests/test_gpu.py checks the
compiled kernel in bf16.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import rel_err, small_text

import minillama4 as ml4

pytest.importorskip("triton", reason="pip install triton (the dev extra installs it on Linux x86-64)")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _version(module) -> tuple:
    return tuple(int(part) for part in module.__version__.split("+")[0].split(".")[:2])


def _interpreter_takes_run_time_loop_bounds() -> bool:
    """Triton 3.6's interpreter (the one torch 2.11 pins) turns a run-time loop bound, a one-element
    array, into a Python int with int(), which NumPy >= 2.4 refuses; Triton 3.7 squeezes it first.
    Every kernel here loops over a bound given at launch, so that interpreter runs none of them."""
    import numpy
    import triton

    return _version(triton) >= (3, 7) or _version(numpy) < (2, 4)


if not INTERPRETED:
    @pytest.mark.skipif(not _interpreter_takes_run_time_loop_bounds(),
                        reason="Triton < 3.7's interpreter cannot run loops with run-time bounds under "
                               "NumPy >= 2.4 (the kernels themselves compile: tests/test_kernel_report.py, "
                               "and run on a GPU: tests/test_gpu.py)")
    def test_under_the_triton_interpreter():
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]

    def test_the_tuner_splits_k_into_equal_parts_when_it_can():
        """Splits are snapped to a divisor of the trips, so that Scout's GEMVs take the unmasked path."""
        from minillama4 import w4a16

        assert w4a16._even_split(3, 40) == 4  # 40 groups: 3 splits -> 14, 14, 12 (masked); 4 -> 10 each
        assert w4a16._even_split(3, 64) == 4 and w4a16._even_split(6, 64) == 8 and w4a16._even_split(1, 7) == 1
        assert w4a16._even_split(5, 7) == 7  # 7 is nearer 5 than 1 is, by ratio
        x = torch.zeros(1, 5120)
        for block_n, groups, split, _ in w4a16._candidates(w4a16.WORD_TILES, 16384, lambda b: -(-40 // b), x,
                                                           lambda t: t[2]):
            per_split = w4a16._per_split(40, split, groups)
            assert w4a16._even(16384, block_n, 40, per_split, groups), (block_n, groups, split)

    def test_the_environment_chooses_the_fused_kernels():
        """MINILLAMA4_FUSED: all (unset, 1), none (0), the GPU-measured ones, or a list of names."""
        from minillama4 import fused

        assert fused._from_environment(None) == fused._from_environment("1") == set(fused.NAMES)
        assert fused._from_environment("0") == set()
        assert fused._from_environment("measured") == set(fused.MEASURED)
        assert fused._from_environment("rope, top_k_gates") == {"rope", "top_k_gates"}
        with pytest.raises(ValueError, match="unknown kernels \\['ropes'\\]"):
            fused._from_environment("ropes")
        code = "from minillama4 import fused; print(sorted(fused.KERNELS))"
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MINILLAMA4_FUSED": "0"},
                             capture_output=True, text=True)
        assert run.stdout.strip() == "[]", run.stderr[-2000:]

else:
    import collections
    from contextlib import contextmanager

    from minillama4 import fused, w4a16
    from minillama4.decode import DecodeStep, host_reads
    from minillama4.quant import dequantize_int4, quantize_int4, quantize_model

    @contextmanager
    def readable():
        """The model's readable code instead of the fused kernels (which the interpreter runs here)."""
        fused.ENABLED = False
        try:
            yield
        finally:
            fused.ENABLED = True

    def spy_on_kernels(monkeypatch) -> collections.Counter:
        """Count the calls of every fused kernel (fused.NAMES; linears_together is w4a16.linears_matmul),
        so a test can check they ran and did not silently fall back to the readable code."""
        calls = collections.Counter()

        def counted(module, attr, name):
            kernel = getattr(module, attr)

            def call(*args, **kwargs):
                calls[name] += 1
                return kernel(*args, **kwargs)
            monkeypatch.setattr(module, attr, call)
        for name in fused.NAMES:
            counted(*((w4a16, "linears_matmul") if name == "linears_together" else (fused, name)), name)
        return calls

    @pytest.mark.parametrize("experts, n, k, rows", [(4, 96, 256, 5), (1, 64, 128, 1), (16, 200, 384, 3)])
    def test_kernel_matches_the_dequantized_reference(experts, n, k, rows):
        g = torch.Generator().manual_seed(n)
        packed, scales = quantize_int4(torch.randn(experts, n, k, generator=g))
        x = torch.randn(rows, k, generator=g)
        ids = torch.randint(0, experts, (rows,), generator=g)
        got = w4a16.expert_matmul(x, ids, packed, scales)
        ref = torch.stack([x[i] @ dequantize_int4(packed[ids[i]], scales[ids[i]]).T for i in range(rows)])
        assert rel_err(got, ref) < 1e-6

    @pytest.mark.parametrize("config", [(*tile, v) for tile in w4a16.INT4_TILES for v in w4a16.INT4_VARIANTS]
                             + [(*tile, "words") for tile in w4a16.WORD_TILES])
    @pytest.mark.parametrize("split", [1, 3])
    def test_every_int4_tile_and_split_gives_the_same_product(config, split):
        g = torch.Generator().manual_seed(7)
        packed, scales = quantize_int4(torch.randn(3, 80, 640, generator=g))  # 5 groups: uneven tiles and splits
        x = torch.randn(2, 640, generator=g)
        ids = torch.tensor([2, 0])
        ref = torch.stack([x[i] @ dequantize_int4(packed[ids[i]], scales[ids[i]]).T for i in range(2)])
        block_n, groups, warps, variant = config
        got = w4a16.expert_matmul(x, ids, packed, scales, config=(block_n, groups, split, warps, variant))
        assert rel_err(got, ref) < 1e-6

    @pytest.mark.parametrize("split", [1, 2])
    def test_every_kernel_on_whole_tiles(split):
        """Scout-like shapes: every tile and split whole, the kernels' unmasked path (EVEN)."""
        g = torch.Generator().manual_seed(8)
        packed, scales = quantize_int4(torch.randn(2, 64, 512, generator=g))  # 4 groups
        x = torch.randn(1, 512, generator=g)
        ids = torch.tensor([1])
        ref = x[0] @ dequantize_int4(packed[1], scales[1]).T
        configs = [(*t, v) for t in w4a16.INT4_TILES for v in w4a16.INT4_VARIANTS] + [
            (*t, "words") for t in w4a16.WORD_TILES]
        for block_n, groups, warps, variant in configs:
            if w4a16._even(64, block_n, 4, w4a16._per_split(4, split, groups), groups):
                got = w4a16.expert_matmul(x, ids, packed, scales, config=(block_n, groups, split, warps, variant))
                assert rel_err(got[0], ref) < 1e-6, (block_n, groups, warps, variant)
        assert sum(w4a16._even(64, b, 4, w4a16._per_split(4, split, gpi), gpi) for b, gpi, _, _ in configs) >= 8

    def test_nibble_unpackings_give_the_same_bits():
        """Every byte value 0..255 (both nibbles 0..15) in the weights: OR-ing a nibble into 2^23's
        mantissa and subtracting gives exactly the converted integer, so the byte kernel's products
        are equal either way; the word kernel (another summation order) agrees to rounding."""
        g = torch.Generator().manual_seed(9)
        packed = torch.arange(256, dtype=torch.uint8).repeat(2, 64, 2)[:, :, :256]  # [2, 64, 256]: k = 512
        scales = torch.rand(2, 4, 64, generator=g) + 0.5
        x = torch.randn(3, 512, generator=g)
        ids = torch.tensor([1, 0, 1])
        cvt, magic = (w4a16.expert_matmul(x, ids, packed, scales, config=(16, 2, 1, 2, v)) for v in ("convert", "magic"))
        assert torch.equal(cvt, magic)
        ref = torch.stack([x[i] @ dequantize_int4(packed[ids[i]], scales[ids[i]]).T for i in range(3)])
        assert rel_err(magic, ref) < 1e-6
        assert rel_err(w4a16.expert_matmul(x, ids, packed, scales, config=(32, 1, 1, 1, "words")), ref) < 1e-6
        with pytest.raises(ValueError, match="variant 'fast'"):
            w4a16.expert_matmul(x, ids, packed, scales, config=(32, 1, 1, 1, "fast"))

    @pytest.mark.parametrize("config", [None, (16, 1, 1, 1), (32, 2, 3, 1)])
    def test_linears_side_by_side_in_one_launch(config):
        """q, k, v (or gate, up) through the word kernel at once: the outputs side by side, each as
        its own matrix gives (5 groups: uneven splits)."""
        g = torch.Generator().manual_seed(10)
        mats = [quantize_int4(torch.randn(n, 640, generator=g)) for n in (96, 32, 64)]
        x = torch.randn(2, 640, generator=g)
        ref = torch.cat([x @ dequantize_int4(packed, scales).T for packed, scales in mats], dim=-1)
        for parts in (mats, mats[:2], mats[:1]):
            got = w4a16.linears_matmul(x, parts, config)
            assert rel_err(got, ref[:, :got.shape[1]]) < 1e-6 and got.shape[1] == sum(p.shape[0] for p, _ in parts)
        with pytest.raises(ValueError, match="not multiples of any word tile"):
            w4a16.linears_matmul(x, [quantize_int4(torch.randn(24, 640, generator=g))])
        with pytest.raises(ValueError, match="do not fit together"):
            w4a16.linears_matmul(x, [mats[0], quantize_int4(torch.randn(32, 512, generator=g))])

    def test_int4_linears_run_together_when_they_can():
        from minillama4.quant import Int4Linear

        g = torch.Generator().manual_seed(11)
        q, k, v = (Int4Linear.from_linear(torch.nn.Linear(256, n, bias=False)) for n in (64, 32, 32))
        x = torch.randn(1, 3, 256, generator=g)
        with torch.no_grad():
            together = Int4Linear.run_together(x, [q, k, v])
            assert [tuple(t.shape) for t in together] == [(1, 3, 64), (1, 3, 32), (1, 3, 32)]
            assert all(rel_err(t, lin(x)) < 1e-5 for t, lin in zip(together, (q, k, v)))
            assert Int4Linear.run_together(torch.randn(1, 17, 256), [q, k]) is None  # prefill-sized: one by one
            other = Int4Linear.from_linear(torch.nn.Linear(128, 32, bias=False))
            assert Int4Linear.run_together(torch.randn(1, 1, 256), [q, other]) is None  # inputs differ

    def test_the_tuner_skips_configurations_that_fail(monkeypatch):
        """On CUDA `choose` times every candidate; one that raises (a variant some Triton cannot
        compile) is skipped with a warning, and an all-failing shape is an error naming them."""
        from types import SimpleNamespace

        x = SimpleNamespace(is_cuda=True, shape=(1, 256), dtype=torch.bfloat16, device=torch.device("cpu"))
        monkeypatch.setattr(w4a16, "time_ms", lambda fn: fn())
        monkeypatch.setattr(w4a16, "CHOSEN", {})
        monkeypatch.setattr(w4a16, "TIMES", {})
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (CPU torch: no CUDA)

        def launch(name):
            if name == "bad":
                raise RuntimeError("cannot compile")
            return {"slow": 2.0, "fast": 1.0}[name]

        with pytest.warns(RuntimeWarning, match="1 of 3 configurations failed"):
            assert w4a16.choose("test", x, 7, lambda: [("slow",), ("bad",), ("fast",)], ("slow",), launch) == ("fast",)
        assert w4a16.TIMES[("test", 1, 7, 256, torch.bfloat16, x.device)] == {("slow",): 2.0, ("fast",): 1.0}
        with pytest.raises(RuntimeError, match="no configuration ran"), pytest.warns(RuntimeWarning):
            w4a16.choose("test", x, 8, lambda: [("bad",)], ("slow",), launch)

    @pytest.mark.parametrize("tile", w4a16.DENSE_TILES)
    @pytest.mark.parametrize("split", [1, 3])
    def test_every_dense_tile_and_split_gives_the_same_product(tile, split):
        g = torch.Generator().manual_seed(8)
        w = torch.randn(4, 200, 72, generator=g)  # k = 200, n = 72: no tile divides them
        x = torch.randn(3, 200, generator=g)
        ids = torch.tensor([3, 3, 1])
        ref = torch.stack([x[i] @ w[ids[i]] for i in range(3)])
        assert rel_err(w4a16.expert_matmul_dense(x, ids, w, config=(*tile, split)), ref) < 1e-6

    def test_kernels_refuse_shapes_that_do_not_fit():
        packed, scales = quantize_int4(torch.randn(2, 64, 256))
        with pytest.raises(ValueError, match="do not fit"):
            w4a16.expert_matmul(torch.randn(3, 128), torch.zeros(3, dtype=torch.long), packed, scales)
        with pytest.raises(ValueError, match="do not fit"):
            w4a16.expert_matmul_dense(torch.randn(3, 128), torch.zeros(3, dtype=torch.long), torch.randn(2, 64, 8))

    def test_int4_static_decode_through_the_kernel_matches_eager():
        cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                         num_experts_per_tok=2)
        model = quantize_model(ml4.Llama4Text.random(cfg, seed=3), which="all")
        experts = model.model.layers[0].feed_forward.experts
        assert experts.kernel_available(torch.zeros(1))  # the gather dispatch takes the kernel here
        ids = torch.randint(3, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
        cache, eager_cache = model.new_cache(2, 25), model.new_cache(2, 25)
        with torch.no_grad():
            logits = model(ids, cache=eager_cache)[:, -1]
            model(ids, cache=cache)
            step = DecodeStep(model, cache)
            for _ in range(12):  # positions 5..16: past a chunk of 8
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, cache=eager_cache)[:, -1]
                with host_reads() as reads:
                    static = step(nxt)
                assert sum(reads.values()) == 0
                assert rel_err(static, logits) < 1e-5

    def test_the_scout_bench_times_the_kernel_alone():
        from minillama4 import bench_scout

        model = ml4.random_model(ml4.configs.get("small"), quantize="int4", which="all")
        rows = bench_scout.kernel_bandwidth(model, "cpu")
        assert [r["matrix"] for r in rows] == ["gate_up", "down"]
        assert all(r["GBps"] > 0 and tuple(r["config"]) == w4a16.DEFAULT_INT4 for r in rows)

    def test_dense_static_decode_through_the_kernel_matches_eager():
        cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                         num_experts_per_tok=2, interleave_moe_layer_step=2)
        model = ml4.Llama4Text.random(cfg, seed=4)
        ids = torch.randint(3, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
        with host_reads() as reads:
            static = model.generate(ids, 12, decode="static")
        assert torch.equal(static, model.generate(ids, 12))
        assert reads["tolist"] == 0  # the MoE layers never asked the host which experts were chosen

    @pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32), (torch.bfloat16, None)])
    def test_fused_rms_norm_is_the_layers_math(dtype, weight_dtype):
        from minillama4.layers import rms_norm

        g = torch.Generator().manual_seed(5)
        x = (torch.randn(2, 3, 320, generator=g) * 3).to(dtype)
        weight = None if weight_dtype is None else torch.randn(320, generator=g).to(weight_dtype)
        with readable():
            ref = rms_norm(x, 1e-5) if weight is None else rms_norm(x, 1e-5) * weight
            q = torch.randn(1, 2, 4, 64, generator=g).to(dtype)[:, :, 1:3]  # a non-contiguous view, as after a slice
            q_ref = rms_norm(q, 1e-5)
        got = fused.rms_norm(x, weight, 1e-5)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        # bf16: the interpreter truncates when it casts to bf16 where a GPU rounds to nearest, so
        # results differ by an ulp or two here (tests/test_gpu.py checks the compiled kernel)
        assert rel_err(got, ref) < (1e-6 if dtype == torch.float32 else 2e-2)
        assert rel_err(fused.rms_norm(q, None, 1e-5), q_ref) < 2e-2

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_fused_rope_is_the_layers_math(dtype):
        from minillama4.layers import apply_rope, rope_angles, rope_inv_freq

        cfg = small_text(head_dim=32)
        x = torch.randn(2, 5, 3, 32, generator=torch.Generator().manual_seed(9)).to(dtype)
        freqs_cis = rope_angles(torch.arange(7, 12), rope_inv_freq(cfg))
        with readable():
            ref = apply_rope(x, freqs_cis)
        got = fused.rope(x, freqs_cis)
        assert got.dtype == dtype and rel_err(got, ref) < (1e-6 if dtype == torch.float32 else 2e-2)

    @pytest.mark.parametrize("chunk", [None, 4])
    def test_fused_attention_mask_is_the_attention_math(chunk):
        from minillama4 import attention

        q_pos = torch.tensor([5, 6, 9])
        k_pos = torch.tensor([-1, 0, 3, 4, 5, 6, 7, 8, 9, 10, -1])  # empty slots, other chunks, the future
        ref = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
        if chunk:
            ref &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
        assert torch.equal(fused.attention_mask(q_pos, k_pos, chunk), ref)
        with readable():
            assert torch.equal(attention.attention_mask(q_pos, k_pos, chunk), ref)

    @pytest.mark.parametrize("transpose", [False, True])
    def test_dequantize_kernel_gives_the_readable_values(transpose):
        from minillama4.quant import dequantize_on_device

        g = torch.Generator().manual_seed(10)
        packed, scales = quantize_int4(torch.randn(3, 96, 384, generator=g))
        ref = dequantize_int4(packed, scales)  # the readable version, fp32
        got = w4a16.dequantize(packed, scales, torch.float32, transpose=transpose)
        assert torch.equal(got, ref.transpose(1, 2) if transpose else ref)
        out = torch.empty(3, 384, 96)
        assert w4a16.dequantize(packed, scales, torch.float32, out=out, transpose=True) is out
        # the wrapper quant.py calls (CPU tensors: the readable version) gives the same, one matrix too
        assert torch.equal(dequantize_on_device(packed[1], scales[1], transpose=True), dequantize_int4(packed[1], scales[1]).T)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_fused_add_rms_norm_is_the_residual_add_then_the_norm(dtype):
        from minillama4.layers import RMSNorm, add_rms_norm

        g = torch.Generator().manual_seed(6)
        h, delta = ((torch.randn(2, 3, 320, generator=g) * 3).to(dtype) for _ in range(2))
        norm = RMSNorm(320, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(320, generator=g))
            with readable():
                ref_h, ref_x = add_rms_norm(h, delta, norm)
            got_h, got_x = add_rms_norm(h, delta, norm)
        assert got_h.dtype == got_x.dtype == dtype and got_x.shape == ref_x.shape
        assert torch.equal(got_h, ref_h) if dtype == torch.float32 else rel_err(got_h, ref_h) < 1e-2  # (interpreter: bf16 truncated)
        assert rel_err(got_x, ref_x) < (1e-6 if dtype == torch.float32 else 2e-2)
        with pytest.raises(ValueError, match="add_rms_norm"):
            fused.add_rms_norm(h, delta[:, :2], norm.weight, 1e-5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("layer", ["rope+norm", "rope", "nope+temperature"])
    def test_fused_qk_prepare_is_queries_and_keys(dtype, layer):
        """q and k from their projections as Attention.queries / keys make them, at positions
        around floor_scale multiples (the temperature's floor) and across a chunk."""
        from minillama4.attention import Attention
        from minillama4.layers import rope_angles, rope_inv_freq

        cfg = small_text(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                         use_qk_norm=layer == "rope+norm", floor_scale=4, attn_scale=0.5,
                         no_rope_layers=[0, 1, 1, 1] if layer == "nope+temperature" else [1, 1, 1, 1])
        attn = Attention(cfg, 0)
        assert attn.use_rope == (layer != "nope+temperature") and attn.temperature == (layer == "nope+temperature")
        g = torch.Generator().manual_seed(17)
        positions = torch.arange(5, 13)  # (p + 1) / 4 crosses 2 and 3
        both = (torch.randn(2, 8, 4 * 16 + 2 * 16, generator=g) * 3).to(dtype)
        q_x, k_x = both.split([64, 32], dim=-1)  # views side by side, as after one launch
        freqs_cis = rope_angles(positions, rope_inv_freq(cfg))
        with readable():
            ref_q, ref_k = attn.queries(None, positions, freqs_cis, q_x), attn.keys(None, freqs_cis, k_x)
        q, k = fused.qk_prepare(q_x, k_x, positions, freqs_cis, 4, 2, cfg.rms_norm_eps, attn.use_rope,
                                attn.use_qk_norm, (4, 0.5) if attn.temperature else None)
        assert q.shape == ref_q.shape and k.shape == ref_k.shape and q.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2e-2  # (bf16: the interpreter truncates its casts)
        assert rel_err(q, ref_q) < tol and rel_err(k, ref_k) < tol

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_fused_silu_mul_is_swiglus_activation(dtype):
        g = torch.Generator().manual_seed(11)
        both = (torch.randn(3, 2, 2 * 1500, generator=g) * 4).to(dtype)
        gate, up = both.chunk(2, dim=-1)  # views, as after a fused gate/up matmul
        ref = torch.nn.functional.silu(gate) * up
        got = fused.silu_mul(gate, up)
        assert got.dtype == dtype and rel_err(got, ref) < (1e-6 if dtype == torch.float32 else 2e-2)

    def test_fused_cache_write_is_the_three_index_copies():
        g = torch.Generator().manual_seed(12)
        keys, values = torch.randn(2, 3, 8, 16, generator=g), torch.randn(2, 3, 8, 16, generator=g)
        slot_pos = torch.full((8,), -1, dtype=torch.long)
        k, v = torch.randn(2, 3, 1, 16, generator=g), torch.randn(2, 3, 1, 16, generator=g)
        ref = [t.clone() for t in (keys, values, slot_pos)]
        position = torch.tensor([13])  # slot 13 % 8 = 5
        ref[0].index_copy_(2, position % 8, k)
        ref[1].index_copy_(2, position % 8, v)
        ref[2].index_copy_(0, position % 8, position)
        fused.cache_write(k, v, position, keys, values, slot_pos)
        assert all(torch.equal(a, b) for a, b in zip((keys, values, slot_pos), ref))

    @pytest.mark.parametrize("k, experts", [(1, 16), (2, 16), (3, 5), (1, 128)])
    def test_fused_top_k_gates_is_the_routers_choice(k, experts):
        g = torch.Generator().manual_seed(14)
        logits = torch.randn(7, experts, generator=g).bfloat16()
        top_logits, top_ids = torch.topk(logits, k, dim=-1)
        ids, gates = fused.top_k_gates(logits, k, torch.bfloat16)
        assert torch.equal(ids, top_ids) and ids.dtype == torch.long
        # within a bf16 step: Triton's interpreter truncates to bf16 where the GPU rounds to nearest
        # (tests/test_gpu.py asserts the same bits on CUDA)
        assert gates.dtype == torch.bfloat16 and rel_err(gates, torch.sigmoid(top_logits.float())) < 2**-7
        ids, gates = fused.top_k_gates(logits.float(), k, torch.float32)
        assert rel_err(gates, torch.sigmoid(top_logits.float())) < 1e-6
        # ties (torch.topk orders them as it likes): the lower expert first
        tied = torch.tensor([[0.5, 2.0, -1.0, 2.0, 2.0]])
        assert fused.top_k_gates(tied, 2, torch.float32)[0].tolist() == [[1, 3]]
        with pytest.raises(ValueError, match="k=6 with 5 experts"):
            fused.top_k_gates(tied, 6, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("slots, chunk, position", [(64, 16, 37), (16, 16, 37), (16, 16, 3), (300, None, 250)])
    def test_fused_decode_attention_is_mask_and_sdpa(dtype, slots, chunk, position):
        """One query over a static cache (full, or a ring of one chunk that has wrapped), against
        attention_mask + SDPA as Attention.forward runs them: 10 query heads share 2 kv heads."""
        from minillama4.attention import attention_mask

        g = torch.Generator().manual_seed(16)
        b, h, kv, dh = 2, 10, 2, 32
        q = torch.randn(b, 1, h, dh, generator=g).to(dtype).transpose(1, 2)  # a view, as in Attention
        keys, values = (torch.randn(b, kv, slots, dh, generator=g).to(dtype) for _ in range(2))
        held = torch.arange(max(0, position + 1 - slots), position + 1)  # what a cache of `slots` still holds
        slot_pos = torch.full((slots,), -1, dtype=torch.long)
        slot_pos[held % slots] = held
        pos = torch.tensor([position])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=attention_mask(pos, slot_pos, chunk), scale=dh**-0.5, enable_gqa=True)
        got = fused.decode_attention(q, keys, values, slot_pos, pos, chunk, dh**-0.5)
        assert got.shape == ref.shape and got.dtype == dtype
        assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 2e-2)

    def test_a_fused_kernel_switched_off_is_never_called(monkeypatch):
        """fused.KERNELS (MINILLAMA4_FUSED) rules single kernels out: their readable code runs."""
        def refuse(*args, **kwargs):
            raise AssertionError("a kernel that is switched off was called")

        cfg = small_text(hidden_size=64, head_dim=16)
        model = ml4.Llama4Text.random(cfg, seed=19)
        ids = torch.randint(3, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(19))
        with readable():
            ref = model.generate(ids, 6, decode="static")
        monkeypatch.setattr(fused, "KERNELS", set(fused.NAMES) - {"decode_attention", "qk_prepare", "top_k_gates"})
        calls = spy_on_kernels(monkeypatch)
        for name in ("decode_attention", "qk_prepare", "top_k_gates"):
            monkeypatch.setattr(fused, name, refuse)
        assert torch.equal(model.generate(ids, 6, decode="static"), ref)
        assert calls["rope"] > 0 and calls["cache_write"] > 0  # without qk_prepare, RoPE runs on its own

    @pytest.mark.parametrize("int4", [False, True])
    def test_the_fused_model_matches_the_readable_model(int4, monkeypatch):
        """The fused kernels of fused.py in place (norms, the residual add with its norm, RoPE, mask, SwiGLU
        activation, cache write, top-k, decode attention, q/k/v and gate/up side by side, q/k
        preparation)
        against the readable code, the row kernels in both: logits of a prefill and of decode steps."""
        cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                         num_experts_per_tok=2, interleave_moe_layer_step=2)
        model = ml4.Llama4Text.random(cfg, seed=13)
        if int4:
            model = quantize_model(model, which="all")
        ids = torch.randint(3, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(13))

        def run():
            cache = model.new_cache(2, 24)
            with torch.no_grad():
                logits = [model(ids, cache=cache)[:, -1]]
                step = DecodeStep(model, cache)
                for _ in range(9):  # positions 11..19: across the chunk of 8
                    logits.append(step(logits[-1].argmax(-1, keepdim=True)))
            return torch.stack(logits)

        calls = spy_on_kernels(monkeypatch)
        with readable():
            ref = run()
        assert not calls  # the reference really is the readable code
        got = run()
        assert rel_err(got, ref) < 1e-5
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        # every kernel ran (q/k preparation does RoPE here; q/k/v in one launch needs int4 linears)
        assert set(calls) == set(fused.NAMES) - {"rope"} - ({"linears_together"} if not int4 else set()), calls
