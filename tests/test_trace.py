"""RouterTrace records what the router decided, and costs nothing when off."""

import pytest
import torch
from helpers import small_text

import minillama4 as ml4
from minillama4.moe import MoE
from minillama4.trace import load_stats


@pytest.fixture(scope="module")
def model():
    return ml4.Llama4Text.random(small_text(num_experts_per_tok=2, num_local_experts=6), seed=2)


def test_trace_records_every_moe_layer_and_token(model):
    ids = torch.randint(0, 320, (2, 9))
    with ml4.RouterTrace(model) as trace:
        logits = model(ids)
    assert trace.moe_layers == [0, 1, 2, 3]
    for layer in trace.moe_layers:
        ids_l = trace.expert_ids(layer)
        assert ids_l.shape == (18, 2) and trace.gates(layer).shape == (18, 2)
        assert torch.equal(ids_l, trace.logits(layer).topk(2, dim=-1).indices)
        assert torch.allclose(trace.gates(layer), torch.sigmoid(trace.logits(layer).topk(2, dim=-1).values))
        assert int(trace.load(layer).sum()) == 36
    assert torch.equal(trace.token_ids(), ids.flatten())
    assert trace.positions().tolist() == list(range(9)) * 2
    assert not trace.is_image().any()
    # tracing does not change the output, and the model is clean afterwards
    with torch.no_grad():
        assert torch.equal(model(ids), logits.detach())
    assert model.trace is None and all(getattr(m, "trace", None) is None for m in model.modules())


def test_trace_follows_generation(model):
    with ml4.RouterTrace(model) as trace:
        out = model.generate([[1, 2, 3]], 5)
    assert trace.positions().tolist() == list(range(7))  # prompt, then one per step (last not fed back)
    assert torch.equal(trace.token_ids(), out[0, :7])
    rows = trace.table(ml4.ByteTokenizer())
    assert len(rows) == 7 and set(rows[0]) >= {"position", "token", "L0", "L3"}


def test_load_stats():
    s = load_stats(torch.tensor([5, 5, 5, 5]))
    assert s["max_over_mean"] == 1.0 and s["cv"] == 0.0 and abs(s["entropy_frac"] - 1) < 1e-6
    s = load_stats(torch.tensor([20, 0, 0, 0]))
    assert s["max_over_mean"] == 4.0 and s["entropy"] == 0.0
    # [layers, e] read as one layer gave entropy_frac 3.0; a negative count a negative entropy
    with pytest.raises(ValueError, match=r"one layer's token copies per expert \[e\], got \(2, 4\)"):
        load_stats(torch.ones(2, 4))
    with pytest.raises(ValueError, match="negative count"):
        load_stats(torch.tensor([1.0, -1.0, 2.0]))


def test_nested_traces_refused(model):
    with ml4.RouterTrace(model):
        with pytest.raises(RuntimeError, match="already active"):
            ml4.RouterTrace(model).__enter__()


def test_a_forward_that_fails_midway_leaves_the_trace_aligned(model):
    ids = torch.randint(0, 320, (1, 5))

    def fail(module, args):
        raise RuntimeError("out of memory (simulated)")

    with ml4.RouterTrace(model) as trace:
        model(ids)
        hook = model.model.layers[2].register_forward_pre_hook(fail)  # after MoE layers 0 and 1 recorded
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                model(ids)
        finally:
            hook.remove()
        assert trace.token_ids().shape == (5,) and trace.expert_ids(0).shape == (5, 2)  # the failed call is left out
        model(ids)
    assert trace.token_ids().shape == (10,) and all(trace.expert_ids(i).shape == (10, 2) for i in trace.moe_layers)
    assert len(trace.table()) == 10 and trace.positions().tolist() == list(range(5)) * 2


def test_entering_is_all_or_nothing(model):
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    moes[-1].trace = stale = object()  # only the last MoE layer is taken
    try:
        with pytest.raises(RuntimeError, match=r"already active on this model \(MoE layers \[3\] hold one\)"):
            ml4.RouterTrace(model).__enter__()
        assert model.trace is None and [m.trace for m in moes] == [None] * 3 + [stale]  # nothing attached
    finally:
        moes[-1].trace = None
    with ml4.RouterTrace(model) as trace:  # usable again once that layer is free
        model(torch.tensor([[1, 2]]))
    assert trace.expert_ids(3).shape == (2, 2)


def test_bad_trace_arguments_give_clear_errors(model):
    with pytest.raises(TypeError, match="RouterTrace takes a Llama4Text or Llama4 model, got str"):
        ml4.RouterTrace("x")
    with ml4.RouterTrace(model) as trace:
        model(torch.tensor([[1, 2, 3]]))
    for read in (trace.expert_ids, trace.logits, trace.gates, trace.load, trace.stats):
        with pytest.raises(ValueError, match=r"layer 99 is not an MoE layer; MoE layers are \[0, 1, 2, 3\]"):
            read(99)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[3\] .* torch.bool of shape \(5,\)"):
        trace.load(0, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got torch.int64 of shape \(3,\)"):
        trace.load(0, torch.tensor([1, 0, 1]))
    assert int(trace.load(0, torch.tensor([True, False, True])).sum()) == 4  # 2 tokens x top-2
