"""int4 weight-only quantization (CPU paths), streaming quantized loads, the memory planner."""

import copy

import pytest
import torch

import minillama4 as ml4
from minillama4 import configs, plan
from minillama4.quant import (Int4Experts, Int4Linear, dequantize_int4, quantize_int4, quantize_model,
                              unpack_int4)


def test_round_trip_error_is_bounded_by_the_group_scale():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    packed, scales = quantize_int4(w)
    assert packed.shape == (64, 256) and packed.dtype == torch.uint8 and scales.shape == (4, 64)
    back = dequantize_int4(packed, scales)
    per_weight = scales.float().T.repeat_interleave(128, dim=1)  # [64, 512]
    err = (back - w).abs()
    assert torch.all(err <= per_weight * 1.05)  # only +absmax is clipped: one step (+ bf16 scale rounding)
    assert (err <= per_weight / 2 + 1e-6).float().mean() > 0.99  # everything else: rounding
    assert 0.08 < float((back - w).norm() / w.norm()) < 0.13  # ~11% on Gaussian weights


def test_packed_layout_even_high_odd_low():
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 1] = 8.0, -8.0  # absmax 8 -> scale 1 -> q = 7 (clipped) and -8
    packed, scales = quantize_int4(w)
    assert float(scales[0, 0]) == 1.0
    assert int(packed[0, 0]) == (15 << 4) | 0  # q + 8 = 15 in the high nibble, 0 in the low
    assert unpack_int4(packed)[0, :2].tolist() == [15, 0]


def test_quantizing_block_by_block_equals_the_whole_tensor_at_once(monkeypatch):
    """quantize_int4 works through QUANT_BLOCK weights at a time (to bound its temporaries): the
    block boundaries, uneven ones included, change no bit, on stacked and transposed views too,
    and the input is left as it was."""
    from minillama4 import quant

    g = torch.Generator().manual_seed(3)
    experts = torch.randn(3, 384, 200, generator=g).to(torch.bfloat16)  # x @ W layout [e, k, n]
    for w in (torch.randn(100, 512, generator=g), experts.transpose(1, 2), experts[1].T):
        before = w.clone()
        monkeypatch.setattr(quant, "QUANT_BLOCK", 1 << 30)
        whole = quantize_int4(w)
        monkeypatch.setattr(quant, "QUANT_BLOCK", 7 * w.shape[-1])  # 7 rows a block: the last one short
        blocks = quantize_int4(w)
        assert all(torch.equal(a, b) for a, b in zip(whole, blocks))
        assert torch.equal(w, before)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group=128"):
        quantize_int4(torch.randn(4, 100))
    q = Int4Linear(128, 16)
    with pytest.raises(ValueError, match="does not fit"):
        q.load_dense(torch.randn(16, 256))
    with pytest.raises(ValueError, match=r"needs a weight \[out, in\] .* got shape \(128,\)"):
        quantize_int4(torch.randn(128))
    with pytest.raises(ValueError, match="group=0: expected a positive int"):
        quantize_int4(torch.randn(4, 128), group=0)
    with pytest.raises(TypeError, match="real-valued weight tensor, got torch.bool"):
        quantize_int4(torch.ones(4, 128, dtype=torch.bool))


def test_bad_module_sizes_are_refused_by_name():
    """group=0 raised ZeroDivisionError and a negative size torch's "Dimension size must be
    non-negative"; an odd input dim (group 129) would have packed 129 weights into 64 bytes."""
    for make, error, match in [
        (lambda: Int4Linear(128, 16, group=0), ValueError, "group=0: expected a positive int"),
        (lambda: Int4Linear(-128, 16), ValueError, "in_features=-128: must be a positive integer"),
        (lambda: Int4Linear(128, 0), ValueError, "out_features=0: must be a positive integer"),
        (lambda: Int4Linear(128.0, 16), TypeError, "in_features=128.0: must be a positive integer"),
        (lambda: Int4Linear(129, 16, group=129), ValueError, r"in_features=129: .* multiple of group=129 \(and even\)"),
        (lambda: Int4Linear(100, 16), ValueError, "in_features=100: int4 needs the input dim to be a multiple of group=128"),
        (lambda: Int4Experts(0, 128, 128), ValueError, "n_experts=0: must be a positive integer"),
        (lambda: Int4Experts(2, 128, 64), ValueError, "hidden=64: int4 needs the input dim to be a multiple of group=128"),
        (lambda: Int4Experts(2, -128, 128), ValueError, "dim=-128: must be a positive integer"),
        (lambda: Int4Experts(2, 128, 128, group=0), ValueError, "group=0: expected a positive int"),
    ]:
        with pytest.raises(error, match=match):
            make()
    assert Int4Experts(2, 128, 256).down_scales.shape == (2, 2, 128)


def test_non_finite_weights_are_refused_and_the_module_is_left_as_it_was():
    w = torch.randn(16, 256)
    w[3, 5], w[9, 200] = float("nan"), float("inf")  # each would make its whole group of 128 NaN
    with pytest.raises(ValueError, match=r"weight \(16, 256\) has NaN or inf values \(in 2 of its 32 groups of 128\)"):
        quantize_int4(w)
    q = Int4Linear(256, 16)
    before = q.packed.clone(), q.scales.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        q.load_dense(w)
    assert torch.equal(q.packed, before[0]) and torch.equal(q.scales, before[1])


def test_quantize_model_refuses_before_replacing_anything():
    model = ml4.Llama4Text.random(configs.small(), seed=7)
    with torch.no_grad():
        model.model.layers[-1].feed_forward.experts.down_proj[1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.3.feed_forward.experts.down_proj has NaN or inf values"):
        quantize_model(model)
    assert not any(isinstance(m, (Int4Linear, Int4Experts)) for m in model.modules())  # layers 0-2 untouched too
    with pytest.raises(ValueError, match=r"gate_proj: int4 needs input dims \[64\] to be multiples of group=128"):
        quantize_model(ml4.Llama4Text.random(configs.tiny()))
    with pytest.raises(TypeError, match="takes a Llama4Text or Llama4 model, got TextConfig"):
        quantize_model(configs.small().text)
    quantized = quantize_model(ml4.Llama4Text.random(configs.small(), seed=7))
    with pytest.raises(ValueError, match=r"shared_expert.gate_proj is already int4 \(Int4Linear\): this model is "
                                         r"already quantized"):
        quantize_model(quantized, "all")
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # "all" did not start either


def test_int4_linear_matches_dequantized_reference_and_cpu_kernel():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 64, bias=False)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(5, 256)
    ref = x @ q.dequantized().T
    torch.testing.assert_close(q(x), ref)  # fp32: the readable dequantize path
    got = q(x.bfloat16()).float()  # bf16 on CPU: torch's int4 kernel
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2


def test_the_cpu_kernels_weight_copy_follows_new_weights():
    """The int4 kernel keeps its own layout of the weights, built on the first bf16 call. After
    load_state_dict (an in-place copy into packed and scales) it went on computing with the old
    weights (found by fuzzing); load_dense and moves drop it too, and a module made under
    inference_mode runs (a version-counter check broke it)."""
    torch.manual_seed(0)
    a, b = (Int4Linear.from_linear(torch.nn.Linear(256, 64, bias=False)) for _ in range(2))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    before = a(x)
    a.load_state_dict(b.state_dict())
    after = a(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, x @ b.dequantized(torch.bfloat16).T, rtol=2e-2, atol=2e-2)
    assert torch.equal(after, b(x))
    a.to(torch.device("cpu"))  # a move (here to the same device) drops the copy
    assert a._kernel_weight is None and torch.equal(a(x), after)
    a.load_dense(torch.zeros(64, 256))
    assert torch.equal(a(x), torch.zeros(3, 64, dtype=torch.bfloat16))
    with torch.inference_mode():
        c = Int4Linear.from_linear(torch.nn.Linear(256, 64, bias=False))
        assert c(x).shape == (3, 64)


def test_int4_experts_match_dense_experts_with_the_same_dequantized_weights():
    cfg = configs.small().text
    model = ml4.Llama4Text.random(cfg, seed=2)
    dense = model.model.layers[0].feed_forward.experts
    q = Int4Experts.from_experts(dense)
    x = torch.randn(7, cfg.hidden_size)
    for e in (0, 5, 15):
        w_in = dequantize_int4(q.gate_up_packed[e], q.gate_up_scales[e]).T
        w_out = dequantize_int4(q.down_packed[e], q.down_scales[e]).T
        gate, up = (x @ w_in).chunk(2, -1)
        torch.testing.assert_close(q.one(e, x), (up * torch.nn.functional.silu(gate)) @ w_out)


def absmax_round_trip(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Symmetric absmax int4 of w [n, k] per group of `group` inputs, written out independently of
    quant.py: scale = max|w| / 8 (rounded to bf16, as stored), q = clamp(round(w / scale), -8, 7)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    scale = (wg.abs().amax(-1, keepdim=True) / 8).clamp(min=1e-12).to(torch.bfloat16).float()
    return ((wg / scale).round().clamp(-8, 7) * scale).reshape(n, k).to(w.dtype)


def plain_reference_quantization(model, which: str = "ffn"):
    """The same weights through a plain absmax group-128 round trip, kept dense (the attention
    projections too with which="all")."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            ffn = layer.feed_forward
            linears = [lin for mlp in ([ffn] if not hasattr(ffn, "experts") else [ffn.shared_expert])
                       for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if which == "all":
                attn = layer.self_attn
                linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            for lin in linears:
                lin.weight.copy_(absmax_round_trip(lin.weight))
            if hasattr(ffn, "experts"):
                for name in ("gate_up_proj", "down_proj"):
                    w = getattr(ffn.experts, name)  # [e, in, out]: quantized along `in`
                    w.copy_(torch.stack([absmax_round_trip(x.T).T for x in w]))
    return ref


@pytest.mark.parametrize("dispatch, which", [("fast", "ffn"), ("reference", "ffn"), ("gather", "ffn"), ("fast", "all")])
def test_quantized_model_error_no_worse_than_plain_reference_quantization(dispatch, which):
    cfg = configs.small().replace_text(interleave_moe_layer_step=2)  # MoE and dense layers
    model = ml4.Llama4Text.random(cfg, seed=3)
    ids = torch.randint(0, cfg.text.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = model(ids)
        reference = plain_reference_quantization(model, which)(ids)
        ours = quantize_model(copy.deepcopy(model), which=which).set_dispatch(dispatch)(ids)
    ref_err = float((reference - exact).abs().max())
    assert ref_err > 0  # quantization did something
    assert float((ours - exact).abs().max()) <= ref_err * 1.001 + 1e-6
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_streaming_quantized_load_of_sharded_checkpoint(tmp_path):
    cfg = configs.small()
    model = ml4.Llama4Text.random(cfg, seed=4)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    streamed = ml4.from_pretrained(tmp_path, quantize="int4")
    assert isinstance(streamed.model.layers[0].feed_forward.experts, Int4Experts)
    assert not any("experts.gate_up_proj" in n for n, _ in streamed.named_parameters())
    in_memory = quantize_model(copy.deepcopy(model))
    ids = torch.randint(0, 272, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids), in_memory(ids))
    with pytest.raises(ValueError, match="int4 weights"):
        streamed.save_pretrained(tmp_path / "again")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_a_streamed_int4_load_in_any_dtype_equals_load_then_quantize(tmp_path, dtype):
    """The loader hands a bf16 tensor to the quantizer uncast when the cast would only widen it
    (the quantizer reads fp32 blocks): the same int4 tensors as casting first, without a whole
    tensor-sized copy at the peak. A narrowing cast (fp32 -> bf16) still happens first."""
    for stored in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(stored)
        ml4.Llama4Text.random(configs.small(), seed=5, dtype=stored).save_pretrained(folder)
        streamed = ml4.from_pretrained(folder, quantize="int4", which="all", dtype=dtype)
        after = quantize_model(ml4.from_pretrained(folder, dtype=dtype), which="all")
        state = after.state_dict()
        for name, t in streamed.state_dict().items():
            assert t.dtype == state[name].dtype and torch.equal(t, state[name]), (stored, name)


def test_random_int4_model_is_built_directly_in_int4():
    cfg = configs.small()
    model = ml4.random_model(cfg, quantize="int4", dtype=torch.float32, seed=5)
    experts = model.model.layers[0].feed_forward.experts
    assert isinstance(experts, Int4Experts) and experts.gate_up_packed.dtype == torch.uint8
    w = dequantize_int4(experts.gate_up_packed, experts.gate_up_scales)
    assert 0.015 < float(w.std()) < 0.025  # about initializer_range
    out = model.generate(torch.tensor([[1, 2, 3]]), 5)
    assert out.shape == (1, 8)


def test_memory_plan_numbers():
    scout = configs.scout()
    assert plan.kv_cache_bytes(scout.text, 1, ring=False) == 192 * 1024  # 192 KiB per token
    p = plan.plan_memory(scout, context=8192, quantize="int4", which="all")
    assert 54 < p.weight_bytes / plan.GIB < 58  # ~54.8 GiB of weights measured on an H100
    assert p.total < 0.93 * 80 * 10**9  # fits an 80 GB H100 with an 8K cache, with room to spare
    on_gpu = plan.plan_memory(scout, context=8192, quantize="int4", which="all", cuda=True)
    assert on_gpu.decode_kernels == p.weights["text.attention"] + p.weights["text.shared_experts"]
    assert "tinygemm layout" in on_gpu.table() and "tinygemm" not in p.table()
    # the H100 run peaked at 64.5 GiB with an 8K cache (docs/benchmarks.md): the plan is not below it
    assert 64.5 < on_gpu.total / plan.GIB < 80 * 10**9 / plan.GIB
    bf16 = plan.plan_memory(scout, context=8192)
    assert bf16.weight_bytes / plan.GIB > 200
    long = plan.plan_memory(scout, context=1 << 20, quantize="int4")
    no_ring = plan.plan_memory(scout, context=1 << 20, quantize="int4", ring=False)
    assert no_ring.kv_cache > 3.5 * long.kv_cache  # 36 of 48 layers keep one chunk


def test_memory_planner_refuses_with_how_much(monkeypatch, tmp_path):
    p = plan.plan_memory(configs.scout(), context=8192)
    with pytest.raises(plan.MemoryPlanError, match=r"needs 20\d\.\d GiB .* short by"):
        plan.check_fits(p, 80 * plan.GIB, where="cuda:0")
    ml4.Llama4Text.random(configs.tiny()).save_pretrained(tmp_path)
    monkeypatch.setattr(plan, "available_bytes", lambda device: 1024)
    with pytest.raises(plan.MemoryPlanError, match="short by"):
        ml4.from_pretrained(tmp_path)
    with pytest.raises(plan.MemoryPlanError, match=r"small needs .* GiB on .* but only 0.0 GiB is free: short by"):
        ml4.random_model(configs.small())


def test_int4_prefill_dequantizes_into_one_shared_scratch_and_matches_the_loop(monkeypatch):
    from minillama4 import quant

    cfg = configs.small()
    model = quantize_model(ml4.Llama4Text.random(cfg, seed=6))
    ids = torch.randint(0, cfg.text.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    quant.free_scratch()
    buffers = []
    original = Int4Experts.dequantized_all
    monkeypatch.setattr(Int4Experts, "dequantized_all",
                        lambda self, dtype: buffers.append(original(self, dtype)) or buffers[-1])
    with torch.no_grad():
        grouped = model(ids)  # 80 tokens: every layer dequantizes its experts and runs grouped matmuls
        looped = model.set_dispatch("reference")(ids)
    assert len(buffers) == sum(isinstance(m, Int4Experts) for m in model.modules()) > 1
    assert len({(w_in.data_ptr(), w_out.data_ptr()) for w_in, w_out in buffers}) == 1  # one buffer for all layers
    torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-5)
    assert len(quant._SCRATCH) == 2
    quant.free_scratch()
    assert not quant._SCRATCH


def test_memory_plan_counts_the_int4_prefill_scratch():
    scout = configs.scout()
    int4 = plan.plan_memory(scout, context=8192, quantize="int4")
    bf16 = plan.plan_memory(scout, context=8192, dtype="bf16")
    t = scout.text
    assert int4.activations - bf16.activations == 3 * t.hidden_size * t.intermediate_size * t.num_local_experts * 2
    maverick = configs.maverick()
    m_int4 = plan.plan_memory(maverick, context=8192, quantize="int4")
    m_bf16 = plan.plan_memory(maverick, context=8192, dtype="bf16")
    t = maverick.text  # 128 experts: prefill loops over them, one dequantized at a time
    assert m_int4.activations - m_bf16.activations == 3 * t.hidden_size * t.intermediate_size * 2
