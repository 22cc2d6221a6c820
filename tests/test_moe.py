"""The MoE block: the three dispatch paths agree with each other and with the dense definition."""

import pytest
import torch
import torch.nn.functional as F
from helpers import small_text

from minillama4.moe import MoE


def make(top_k=1, experts=4, seed=0):
    torch.manual_seed(seed)
    moe = MoE(small_text(num_local_experts=experts, num_experts_per_tok=top_k), layer=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def dense_definition(moe, x):
    """What Hugging Face computes: every expert on every token, unchosen experts gated by 0."""
    x = x.reshape(-1, x.shape[-1])
    logits = moe.router(x)
    top, ids = logits.topk(moe.top_k, dim=-1)
    gates = torch.zeros_like(logits).scatter_(1, ids, torch.sigmoid(top))
    out = moe.shared_expert(x)
    for e in range(moe.n_experts):
        gate, up = (x * gates[:, e:e + 1] @ moe.experts.gate_up_proj[e]).chunk(2, -1)
        out = out + (up * F.silu(gate)) @ moe.experts.down_proj[e]
    return out


@pytest.mark.parametrize("top_k, experts, tokens", [(1, 4, 37), (2, 6, 37), (3, 8, 5), (1, 16, 1), (4, 4, 9)])
def test_fast_and_gather_equal_reference_equals_dense(top_k, experts, tokens):
    moe = make(top_k, experts)
    x = torch.randn(1, tokens, 64)
    with torch.no_grad():
        moe.dispatch = "reference"
        ref = moe(x)
        moe.dispatch = "fast"
        fast = moe(x)
        moe.dispatch = "gather"
        gathered = moe(x)
        dense = dense_definition(moe, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=5e-6)  # sums the k outputs in another order
    torch.testing.assert_close(ref.reshape(-1, 64), dense, rtol=1e-5, atol=5e-6)  # float order differs by thread count


def test_fast_path_handles_unbalanced_and_idle_experts():
    moe = make(1, 8)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[5, 0] = 10.0  # almost every token prefers expert 5
        x = torch.randn(2, 20, 64).abs()
        moe.dispatch = "reference"
        ref = moe(x)
        moe.dispatch = "fast"
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)


def test_gate_scales_the_expert_input_not_output():
    """Llama 4 multiplies the expert's input by sigmoid(logit); scaling the output instead
    (the bug several inference engines shipped) gives a different answer, since SwiGLU is not
    homogeneous."""
    moe = make(1, 4)
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        logits, ids, gates = moe.route(x[0])
        expected = moe.shared_expert(x[0])
        wrong = expected.clone()
        for n in range(7):
            e = int(ids[n, 0])
            expected[n] += moe.experts.one(e, x[0, n:n + 1] * gates[n])[0]
            wrong[n] += gates[n] * moe.experts.one(e, x[0, n:n + 1])[0]
        got = moe(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - wrong).abs().max() > 1e-3
    assert torch.all((gates > 0) & (gates < 1))  # sigmoid, not renormalised softmax
    assert torch.equal(ids[:, 0], logits.argmax(-1))  # top-1 on raw logits


def test_gradients_flow_through_both_paths():
    moe = make(2, 4)
    x = torch.randn(1, 9, 64)
    grads = []
    for mode in ("reference", "fast"):
        moe.zero_grad()
        moe.dispatch = mode
        moe(x).square().sum().backward()
        grads.append(moe.experts.gate_up_proj.grad.clone())
    scale = grads[0].abs().max()
    assert scale > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5 * float(scale))


def test_both_fast_variants_agree_with_reference(monkeypatch):
    """The fast path uses torch._grouped_mm where this torch has it, else a loop over sorted
    slices; force each and compare (with an idle expert, so an empty group is included)."""
    from minillama4 import moe as moe_module

    moe = make(2, 8)
    with torch.no_grad():
        moe.router.weight[7] = -100.0  # expert 7 never chosen
        x = torch.randn(1, 21, 64)
        moe.dispatch = "reference"
        ref = moe(x)
        moe.dispatch = "fast"
        variants = {True: None, False: None}
        for use_grouped in variants:
            if use_grouped and not moe_module.grouped_mm_supported(x, moe.experts.gate_up_proj):
                continue
            monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda *a, _u=use_grouped: _u)
            variants[use_grouped] = moe(x)
            torch.testing.assert_close(variants[use_grouped], ref, rtol=1e-5, atol=1e-6)
    assert variants[False] is not None


@pytest.mark.parametrize("dtype, intermediate", [(torch.float32, 6), (torch.float32, 10), (torch.bfloat16, 12)],
                         ids=["fp32-6", "fp32-10", "bf16-12"])
def test_fast_path_with_rows_grouped_mm_cannot_take(dtype, intermediate):
    """torch._grouped_mm needs 16-byte rows; an intermediate_size whose rows are not (fp32: not a
    multiple of 4; bf16: of 8) made the second grouped matmul raise ("strides should be multiple of
    16 bytes") once a layer had as many token copies as experts. It now takes the loop."""
    torch.manual_seed(0)
    moe = MoE(small_text(num_local_experts=2, num_experts_per_tok=1, intermediate_size=intermediate), layer=0)
    for p in moe.parameters():  # larger weights than the default init, as make() uses
        torch.nn.init.normal_(p, std=0.2)
    moe = moe.to(dtype)
    x = torch.randn(1, 9, 64, dtype=dtype)
    with torch.no_grad():
        moe.dispatch = "reference"
        ref = moe(x)
        moe.dispatch = "fast"
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)
    from minillama4 import moe as moe_module

    weights = (moe.experts.gate_up_proj, moe.experts.down_proj)
    assert not moe_module.grouped_mm_supported(x.reshape(-1, 64), *weights)
    if hasattr(torch, "_grouped_mm"):  # an aligned size (16 in fp32 and bf16) still takes the grouped path
        aligned = MoE(small_text(num_local_experts=2, intermediate_size=16), layer=0).to(dtype)
        assert moe_module.grouped_mm_supported(x.reshape(-1, 64), aligned.experts.gate_up_proj,
                                               aligned.experts.down_proj)


def test_router_outputs_keep_gradients_and_selection_bias_only_changes_choice():
    import minillama4 as ml4

    model = ml4.Llama4Text.random(small_text(num_experts_per_tok=2, num_local_experts=6), seed=4)
    ids = torch.randint(0, 320, (2, 9))
    outs = []
    logits = model(ids, router_outputs=outs)
    assert [o[0] for o in outs] == [0, 1, 2, 3]
    layer, router_logits, top_ids, gates = outs[0]
    assert router_logits.shape == (18, 6) and router_logits.requires_grad
    router_logits.square().mean().backward()
    assert model.model.layers[0].feed_forward.router.weight.grad is not None
    moe = model.model.layers[0].feed_forward
    with torch.no_grad():
        free = moe.route(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)))
        moe.selection_bias = torch.tensor([100.0, 100.0, 0, 0, 0, 0])  # force experts 0 and 1
        forced = moe.route(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)))
        moe.selection_bias = None
    assert sorted(forced[1][0].tolist()) == [0, 1]
    torch.testing.assert_close(forced[0], free[0])  # logits unchanged
    torch.testing.assert_close(forced[2], torch.sigmoid(forced[0].gather(-1, forced[1])))  # gates from raw logits
    assert logits.shape == (2, 9, 320)


def test_a_model_built_without_random_has_initialised_experts():
    """Llama4Text(cfg) left the stacked experts as torch.empty memory (NaN logits after other
    tensors were freed). They are now normal(0, initializer_range), from a generator of their own:
    the global one is not touched, so Llama4Text.random(seed) draws what it always did."""
    from minillama4 import configs
    from minillama4.model import Llama4Text
    from minillama4.moe import Experts

    cfg = configs.tiny().text
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    experts = Experts(cfg, layer=1)
    assert torch.equal(torch.rand(3), expected_next)  # the global generator was left alone
    for w in (experts.gate_up_proj, experts.down_proj):
        assert w.isfinite().all()
        assert abs(w.std().item() - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert not torch.equal(experts.gate_up_proj, Experts(cfg, layer=2).gate_up_proj)  # layers differ
    model = Llama4Text(cfg)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3, 4]])).isfinite().all()
    with torch.device("meta"):  # what from_pretrained builds: nothing drawn
        assert Experts(cfg).gate_up_proj.is_meta
