"""GPU checks (skipped on machines without CUDA; run by scripts/gpu_check.sh on a GPU machine):
parity with transformers on CUDA, the grouped-matmul dispatch, the int4 kernels against the
dequantize reference, and the static decode step replayed as a CUDA graph."""

import pytest
import torch
from helpers import rel_err, small_text

import minillama4 as ml4
from minillama4.quant import Int4Linear, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_parity_on_cuda(dtype, tol):
    pytest.importorskip("transformers")
    from minillama4.hf_reference import to_transformers

    cfg = small_text(hidden_size=128, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
    ours = ml4.Llama4Text.random(cfg, seed=0, dtype=dtype, device="cuda")
    hf = to_transformers(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(ours(ids), ref) < tol
        assert rel_err(ours.set_dispatch("reference")(ids), ref) < tol


def test_grouped_mm_dispatch_on_cuda_bf16():
    from minillama4.moe import grouped_mm_supported

    cfg = small_text(hidden_size=128, intermediate_size=128, num_local_experts=8)
    model = ml4.Llama4Text.random(cfg, seed=1, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, 64, 128, device="cuda", dtype=torch.bfloat16)
    print("grouped_mm on CUDA bf16:", grouped_mm_supported(x, model.model.layers[0].feed_forward.experts.gate_up_proj))
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")
    with torch.no_grad():
        fast = model(ids)
        ref = model.set_dispatch("reference")(ids)
    assert rel_err(fast, ref) < 2e-2


def test_int4_linear_decode_kernels_match_dequantize():
    torch.manual_seed(2)
    lin = torch.nn.Linear(1024, 256, bias=False, device="cuda")
    q = Int4Linear.from_linear(lin)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ q.dequantized().T
    kernels = q._cuda_kernels(x)
    assert {"tinygemm", "w4a16"} <= set(kernels)
    for name, kernel in kernels.items():
        assert rel_err(kernel().float(), ref) < 2e-2, name
    assert rel_err(q(x).float(), ref) < 2e-2  # the faster of the two, timed once for this shape


def test_int4_model_generates_on_cuda():
    cfg = ml4.configs.small()
    model = ml4.random_model(cfg, quantize="int4", which="all", device="cuda", seed=3)
    out = model.generate(torch.tensor([[1, 2, 3]], device="cuda"), 8)
    assert out.shape == (1, 11)
    dense = ml4.Llama4Text.random(cfg, seed=4, dtype=torch.bfloat16, device="cuda")
    q = quantize_model(dense)
    assert q(torch.tensor([[1, 2, 3]], device="cuda")).isfinite().all()


def test_streaming_int4_load_onto_cuda_matches_the_cpu_load(tmp_path):
    """from_pretrained(quantize="int4", device="cuda") quantizes each tensor on the GPU, block by
    block: the same int4 weights as the CPU load (scales exactly; codes all but a handful, in
    case the GPU's division rounds a tie differently)."""
    cfg = small_text(hidden_size=256, head_dim=64, intermediate_size=256, intermediate_size_mlp=512)
    ml4.Llama4Text.random(cfg, seed=6, dtype=torch.bfloat16).save_pretrained(tmp_path, max_shard_size="200KB")
    on_cpu = ml4.from_pretrained(tmp_path, quantize="int4", which="all", dtype=torch.float32)
    on_gpu = ml4.from_pretrained(tmp_path, quantize="int4", which="all", dtype=torch.float32, device="cuda")
    gpu = dict(on_gpu.named_buffers())
    int4 = [(name, ref) for name, ref in on_cpu.named_buffers() if name.endswith(("packed", "scales"))]
    assert len(int4) == len(gpu) > 0
    for name, ref in int4:
        got = gpu[name].cpu()
        if name.endswith("packed"):
            assert (got != ref).float().mean() < 1e-4, name
        else:
            assert torch.equal(got, ref), name
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():  # float32 activations: both take the dequantizing path
        assert rel_err(on_gpu(ids.cuda()).cpu(), on_cpu(ids)) < 1e-3


def test_static_decode_matches_eager_on_cuda_fp32():
    cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                     num_experts_per_tok=2, interleave_moe_layer_step=2)
    model = ml4.Llama4Text.random(cfg, seed=9, device="cuda")
    ids = torch.randint(3, cfg.vocab_size, (2, 5), device="cuda")
    assert torch.equal(model.generate(ids, 30, decode="static"), model.generate(ids, 30, decode="eager"))


@pytest.mark.parametrize("int4", [False, True])
def test_cuda_graph_replays_the_static_step_exactly(int4):
    """A replayed graph runs the very kernels of the static step: the same bits, the same tokens.
    Capturing also proves the step has no host sync (capture fails on one)."""
    cfg = small_text(hidden_size=1024, head_dim=64, num_attention_heads=16, num_key_value_heads=4,
                     intermediate_size=1024, intermediate_size_mlp=2048, num_experts_per_tok=1)
    model = ml4.Llama4Text.random(cfg, seed=10, dtype=torch.bfloat16, device="cuda")
    if int4:
        model = quantize_model(model, which="all")  # tinygemm for the linears at decode
    ids = torch.randint(3, cfg.vocab_size, (1, 6), device="cuda")
    static = model.generate(ids, 40, decode="static")
    graph = model.generate(ids, 40, decode="graph")
    assert torch.equal(graph, static)
    sampled = [model.generate(ids, 20, temperature=1.0, seed=3, decode=d) for d in ("static", "graph")]
    assert torch.equal(*sampled)


def test_static_step_has_no_host_sync_on_cuda():
    from minillama4.decode import DecodeStep

    cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256)
    model = ml4.Llama4Text.random(cfg, seed=11, device="cuda")
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        nxt = model(torch.tensor([[5, 6, 7]], device="cuda"), cache=cache)[:, -1].argmax(-1, keepdim=True)
    step = DecodeStep(model, cache)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            nxt = step(nxt).argmax(-1, keepdim=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_w4a16_kernel_on_cuda_bf16():
    pytest.importorskip("triton")
    from minillama4 import w4a16
    from minillama4.quant import dequantize_int4, quantize_int4

    g = torch.Generator(device="cuda").manual_seed(0)
    packed, scales = quantize_int4(torch.randn(16, 2048, 1024, device="cuda", generator=g))
    x = torch.randn(3, 1024, device="cuda", generator=g).bfloat16()
    ids = torch.tensor([5, 0, 15], device="cuda")
    got = w4a16.expert_matmul(x, ids, packed, scales).float()
    ref = torch.stack([x[i].float() @ dequantize_int4(packed[ids[i]], scales[ids[i]]).T for i in range(3)])
    assert rel_err(got, ref) < 1e-2  # bf16 output


def test_w4a16_every_tile_and_split_on_cuda():
    pytest.importorskip("triton")
    from minillama4 import w4a16
    from minillama4.quant import dequantize_int4, quantize_int4

    g = torch.Generator(device="cuda").manual_seed(1)
    packed, scales = quantize_int4(torch.randn(4, 320, 1152, device="cuda", generator=g))  # 9 groups
    x = torch.randn(2, 1152, device="cuda", generator=g).bfloat16()
    ids = torch.tensor([3, 1], device="cuda")
    ref = torch.stack([x[i].float() @ dequantize_int4(packed[ids[i]], scales[ids[i]]).T for i in range(2)])
    for block_n, groups, warps in w4a16.INT4_TILES:
        for split in (1, 4):
            cvt, magic = (w4a16.expert_matmul(x, ids, packed, scales, config=(block_n, groups, split, warps, v))
                          for v in ("convert", "magic"))
            assert torch.equal(cvt, magic), (block_n, groups, split, warps)  # the same floats either way
            assert rel_err(magic.float(), ref) < 1e-2, (block_n, groups, split, warps)
    for block_n, groups, warps in w4a16.WORD_TILES:  # the inline-asm byte permutes run only here
        for split in (1, 3):
            got = w4a16.expert_matmul(x, ids, packed, scales, config=(block_n, groups, split, warps, "words")).float()
            assert rel_err(got, ref) < 1e-2, (block_n, groups, split, warps, "words")
    # whole tiles (Scout's case: no masks), fp32 to see the word kernel's own error
    big, big_scales = quantize_int4(torch.randn(2, 1024, 5120, device="cuda", generator=g))
    x32 = torch.randn(1, 5120, device="cuda", generator=g)
    ref32 = x32[0] @ dequantize_int4(big[1], big_scales[1]).T
    for block_n, groups, warps in w4a16.WORD_TILES:
        got = w4a16.expert_matmul(x32, ids[1:], big, big_scales, config=(block_n, groups, 1, warps, "words"))
        assert rel_err(got[0], ref32) < 1e-5, (block_n, groups, warps)
    # the byte kernel's EVEN path: 40 groups in 1 or 5 splits, in the tiles the H100 chose for the
    # experts before and the widest (each tile is one more compile: the script's time is limited)
    for block_n, groups, warps in ((8, 4, 4), (8, 8, 4), (64, 1, 4)):
        for split in (1, 5):
            assert w4a16._even(1024, block_n, 40, w4a16._per_split(40, split, groups), groups)
            got = w4a16.expert_matmul(x32, ids[1:], big, big_scales, config=(block_n, groups, split, warps, "magic"))
            assert rel_err(got[0], ref32) < 1e-5, (block_n, groups, split, warps)
    w4a16.expert_matmul(x, ids, packed, scales)  # times them and keeps the fastest
    assert ("int4", 2, 320, 1152, torch.bfloat16, x.device) in w4a16.CHOSEN
    w = torch.randn(4, 1152, 320, device="cuda", generator=g).bfloat16()
    ref = torch.stack([x[i].float() @ w[ids[i]].float() for i in range(2)])
    for tile in w4a16.DENSE_TILES:
        for split in (1, 4):
            got = w4a16.expert_matmul_dense(x, ids, w, config=(*tile, split)).float()
            assert rel_err(got, ref) < 1e-2, (tile, split)


def test_int4_linears_side_by_side_on_cuda():
    """q, k, v of a Scout-width layer in one launch of the word kernel, and Int4Linear.run_together,
    which keeps that launch only if it times faster than the three calls."""
    from minillama4 import w4a16
    from minillama4.quant import _TOGETHER

    torch.manual_seed(5)
    q, k, v = (Int4Linear.from_linear(torch.nn.Linear(5120, n, bias=False, device="cuda")) for n in (5120, 1024, 1024))
    x = torch.randn(1, 1, 5120, device="cuda", dtype=torch.bfloat16)
    ref = [x.float() @ lin.dequantized().T for lin in (q, k, v)]
    got = w4a16.linears_matmul(x[0, 0][None], [(lin.packed, lin.scales) for lin in (q, k, v)])
    assert rel_err(got.float(), torch.cat(ref, -1)[0]) < 1e-2
    with torch.no_grad():
        outs = Int4Linear.run_together(x, [q, k, v])
    print("q/k/v in one launch:", _TOGETHER)
    if outs is not None:
        assert all(rel_err(o.float(), r) < 1e-2 for o, r in zip(outs, ref))


def test_fused_rms_norm_on_cuda():
    """The fused norm (fused.py) against the readable math, which the CPU and training run."""
    from minillama4 import fused

    g = torch.Generator(device="cuda").manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5120, device="cuda", generator=g) * 3).to(dtype)
        w = torch.randn(5120, device="cuda", generator=g).to(dtype)
        xf = x.float()
        ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
        assert rel_err(fused.rms_norm(x, w, 1e-5), ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    from minillama4.layers import RMSNorm

    norm = RMSNorm(64, 1e-5).cuda()
    x = torch.randn(2, 64, device="cuda", requires_grad=True)
    norm(x).sum().backward()  # with gradients the readable version runs: it has a backward
    assert x.grad is not None and norm.weight.grad is not None


def test_fused_rope_and_mask_on_cuda_match_the_cpu():
    from minillama4 import attention, fused
    from minillama4.layers import apply_rope, rope_angles, rope_inv_freq

    cfg = small_text(head_dim=128)
    x = torch.randn(1, 4, 40, 128)
    freqs_cis = rope_angles(torch.arange(100, 104), rope_inv_freq(cfg))
    ref = apply_rope(x, freqs_cis)  # CPU: the readable version
    assert rel_err(fused.rope(x.cuda(), freqs_cis.cuda()).cpu(), ref) < 1e-6
    q_pos, k_pos = torch.arange(8190, 8194), torch.cat([torch.arange(8180, 8194), torch.full((5,), -1)])
    for chunk in (None, 8192):
        assert torch.equal(attention.attention_mask(q_pos.cuda(), k_pos.cuda(), chunk).cpu(),
                           attention.attention_mask(q_pos, k_pos, chunk))


def test_fused_add_rms_norm_on_cuda_gives_torchs_sum():
    from minillama4 import fused
    from minillama4.layers import RMSNorm, add_rms_norm

    norm = RMSNorm(5120, 1e-5).cuda().bfloat16()
    h, delta = (torch.randn(3, 5120, device="cuda").bfloat16() * 4 for _ in range(2))
    with torch.no_grad():
        got_h, got_x = add_rms_norm(h, delta, norm)
        fused.ENABLED = False
        try:
            ref_h, ref_x = add_rms_norm(h, delta, norm)
        finally:
            fused.ENABLED = True
    assert torch.equal(got_h, ref_h)  # the residual stream itself: the same bits as torch's add
    assert rel_err(got_x, ref_x) < 1e-2


def test_fused_top_k_gates_on_cuda_match_torch():
    from minillama4 import fused

    g = torch.Generator(device="cuda").manual_seed(15)
    for experts, k in ((16, 1), (128, 1), (16, 2)):
        # distinct values, exact in bf16: no ties, whose order torch.topk leaves open
        logits = (torch.stack([torch.randperm(experts, device="cuda", generator=g) for _ in range(64)]) / 8 - 3)
        for dtype in (torch.bfloat16, torch.float32):
            top_logits, top_ids = torch.topk(logits.to(dtype), k, dim=-1)
            ids, gates = fused.top_k_gates(logits.to(dtype), k, dtype)
            assert torch.equal(ids, top_ids)
            ref = torch.sigmoid(top_logits.float()).to(dtype)
            assert rel_err(gates, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-6)  # (tl.exp: last bits; an ulp in bf16)


def test_fused_decode_attention_on_cuda_is_mask_and_sdpa():
    """Scout's attention shapes (40 query heads, 8 kv heads, dh 128) over an 8,192-slot cache
    at short and long context, ring (chunked) and full, against attention_mask + SDPA."""
    from minillama4 import fused
    from minillama4.attention import attention_mask

    g = torch.Generator(device="cuda").manual_seed(16)
    slots, dh = 8192, 128
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        keys, values = (torch.randn(1, 8, slots, dh, device="cuda", generator=g).to(dtype) for _ in range(2))
        q = torch.randn(1, 1, 40, dh, device="cuda", generator=g).to(dtype).transpose(1, 2)
        for position, chunk in ((127, 8192), (127, None), (8000, None), (8192 + 300, 8192)):
            held = torch.arange(max(0, position + 1 - slots), position + 1, device="cuda")
            slot_pos = torch.full((slots,), -1, dtype=torch.long, device="cuda")
            slot_pos[held % slots] = held
            pos = torch.tensor([position], device="cuda")
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=attention_mask(pos, slot_pos, chunk), scale=dh**-0.5, enable_gqa=True)
            got = fused.decode_attention(q, keys, values, slot_pos, pos, chunk, dh**-0.5)
            assert rel_err(got, ref) < tol, (dtype, position, chunk)


def test_dequantize_kernel_on_cuda_gives_the_readable_values():
    from minillama4 import w4a16
    from minillama4.quant import dequantize_int4, quantize_int4

    g = torch.Generator(device="cuda").manual_seed(12)
    packed, scales = quantize_int4(torch.randn(4, 320, 1152, device="cuda", generator=g))
    for dtype in (torch.float32, torch.bfloat16):
        ref = dequantize_int4(packed, scales, dtype)
        assert torch.equal(w4a16.dequantize(packed, scales, dtype), ref)
        assert torch.equal(w4a16.dequantize(packed, scales, dtype, transpose=True), ref.transpose(1, 2))


@pytest.mark.parametrize("int4", [False, True])
def test_fused_kernels_on_cuda_match_the_readable_model(int4):
    """fused.py's kernels (norms, residual add + norm, RoPE, mask, SwiGLU activation, cache
    write, top-k, decode attention) against the readable
    code on the same CUDA model: prefill and static decode logits, fp32."""
    from minillama4 import fused
    from minillama4.decode import DecodeStep

    cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                     num_experts_per_tok=2, interleave_moe_layer_step=2)
    model = ml4.Llama4Text.random(cfg, seed=13, device="cuda")
    if int4:
        model = quantize_model(model, which="all")
    ids = torch.randint(3, cfg.vocab_size, (2, 11), device="cuda")

    def run():
        cache = model.new_cache(2, 24)
        with torch.no_grad():
            logits = [model(ids, cache=cache)[:, -1]]
            step = DecodeStep(model, cache)
            for _ in range(9):
                logits.append(step(logits[-1].argmax(-1, keepdim=True)))
        return torch.stack(logits)

    fused.ENABLED = False
    try:
        ref = run()
    finally:
        fused.ENABLED = True
    got = run()
    assert rel_err(got, ref) < 1e-5
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_router_trace_under_a_cuda_graph_records_what_static_steps_record():
    cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256,
                     num_experts_per_tok=2, interleave_moe_layer_step=2)
    model = ml4.Llama4Text.random(cfg, seed=14, device="cuda")
    ids = torch.randint(3, cfg.vocab_size, (2, 5), device="cuda")
    traces, outs = {}, {}
    for mode in ("static", "graph"):
        with ml4.RouterTrace(model) as trace:
            outs[mode] = model.generate(ids, 12, decode=mode)
        traces[mode] = trace
    assert torch.equal(outs["graph"], outs["static"])
    assert torch.equal(outs["graph"], model.generate(ids, 12, decode="graph"))  # untraced: the other graph
    for layer in traces["static"].moe_layers:
        assert torch.equal(traces["graph"].expert_ids(layer), traces["static"].expert_ids(layer))
        assert torch.equal(traces["graph"].logits(layer), traces["static"].logits(layer))
    assert torch.equal(traces["graph"].token_ids(), traces["static"].token_ids())
