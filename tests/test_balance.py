"""Balancing losses and metrics on hand-computed cases (minillama4.balance)."""

import math
import re

import pytest
import torch

import minillama4 as ml4
from minillama4.balance import (balancing_losses, bias_update, drop_tokens, dropped_fraction, expert_capacity,
                                expert_load, imbalance, router_z_loss, switch_aux_loss, update_selection_bias)
from minillama4.moe import MoE


def test_expert_load_counts_token_copies():
    top_ids = torch.tensor([[0, 1], [0, 2], [3, 0]])
    assert expert_load(top_ids, 5).tolist() == [3, 1, 1, 1, 0]


def test_switch_loss_is_one_when_uniform_for_top1_and_top2():
    logits = torch.zeros(8, 4)  # softmax P_i = 1/4
    top1 = torch.arange(8)[:, None] % 4  # f_i = 1/4
    assert switch_aux_loss(logits, top1).item() == pytest.approx(1.0)
    top2 = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], dim=1)
    assert switch_aux_loss(logits, top2).item() == pytest.approx(1.0)


def test_switch_loss_collapsed_router_by_hand():
    # every token to expert 0, whose softmax probability is 2 / (2 + 1 + 1 + 1) = 0.4
    logits = torch.tensor([[math.log(2), 0.0, 0.0, 0.0]]).repeat(6, 1).requires_grad_()
    top_ids = torch.zeros(6, 1, dtype=torch.long)
    loss = switch_aux_loss(logits, top_ids)
    assert loss.item() == pytest.approx(4 * 1.0 * 0.4)  # N * f_0 * P_0
    loss.backward()
    grad = logits.grad.sum(0)
    assert grad[0] > 0 and (grad[1:] < 0).all()  # gradient descent lowers the busy expert's logit


def test_z_loss_by_hand():
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: log 2, log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_balancing_losses_average_over_layers():
    uniform = (0, torch.zeros(4, 4), torch.arange(4)[:, None], None)
    collapsed = (1, torch.tensor([[math.log(2), 0.0, 0.0, 0.0]]).repeat(4, 1), torch.zeros(4, 1, dtype=torch.long), None)
    out = balancing_losses([uniform, collapsed])
    assert out["switch_aux"].item() == pytest.approx((1.0 + 1.6) / 2)
    z_collapsed = math.log(5) ** 2
    assert out["z_loss"].item() == pytest.approx((math.log(4) ** 2 + z_collapsed) / 2)
    assert balancing_losses([])["switch_aux"].item() == 0.0


def test_losses_from_a_real_forward_have_gradients():
    model = ml4.Llama4Text.random(ml4.configs.tiny(), seed=0)
    outputs = []
    model(torch.randint(0, 256, (2, 12)), router_outputs=outputs)
    losses = balancing_losses(outputs)
    (losses["switch_aux"] + losses["z_loss"]).backward()
    assert model.model.layers[0].feed_forward.router.weight.grad.abs().sum() > 0


def test_bias_update_direction():
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    load = torch.tensor([10, 0, 5, 5])  # mean 5: expert 0 over, expert 1 under, 2 and 3 exactly at the mean
    assert bias_update(bias, load, 0.1).tolist() == pytest.approx([-0.1, 0.1, 1.0, 0.0])


def test_update_selection_bias_on_a_model_changes_choice_not_gates():
    model = ml4.Llama4Text.random(ml4.configs.tiny(), seed=0)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert all(m.selection_bias is None for m in moes)
    update_selection_bias(model, {0: torch.tensor([8, 0, 0, 0])}, rate=0.5)
    assert moes[0].selection_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert all(m.selection_bias is None for m in moes[1:])  # layers without a load are untouched
    x = torch.randn(10, model.cfg.hidden_size)
    logits, top_ids, gates = moes[0].route(x)
    assert torch.equal(top_ids, (logits + moes[0].selection_bias).topk(1).indices)
    assert torch.allclose(gates, torch.sigmoid(logits.gather(1, top_ids)))  # gates from raw logits


def test_bias_updates_balance_a_skewed_router():
    """A router that sends almost every token to expert 0; repeated DeepSeek-V3 updates spread the load."""
    cfg = ml4.configs.tiny().text
    torch.manual_seed(0)
    moe = MoE(cfg, layer=0)
    torch.nn.init.normal_(moe.router.weight, std=0.05)
    with torch.no_grad():
        moe.router.weight[0] += 0.03  # every token likes expert 0 (a logit lead of about 1.5)
    x = torch.randn(512, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).abs()

    def max_over_mean():
        load = expert_load(moe.route(x)[1], moe.n_experts)
        return imbalance(load)[0]["max_over_mean"]

    before = max_over_mean()
    for _ in range(100):
        moe.selection_bias = bias_update(moe.selection_bias if moe.selection_bias is not None else torch.zeros(4),
                                         expert_load(moe.route(x)[1], moe.n_experts), rate=0.05)
    after = max_over_mean()
    assert before > 3.0 and after < 1.5
    assert moe.selection_bias[0] < 0  # the popular expert is handicapped


def test_capacity_formula():
    assert expert_capacity(100, 1, 16, 1.0) == 7  # ceil(6.25)
    assert expert_capacity(100, 2, 16, 1.25) == 16  # ceil(15.625)


def test_drop_tokens_top1_in_token_order():
    top_ids = torch.tensor([[0], [0], [0], [1], [0], [2]])  # capacity ceil(6 / 4) = 2
    out = drop_tokens(top_ids, n_experts=4, capacity_factor=1.0)
    assert out.capacity == 2
    assert out.dropped[:, 0].tolist() == [False, False, True, False, True, False]
    assert out.drop_fraction == pytest.approx(2 / 6)
    assert torch.equal(out.kept, ~out.dropped)


def test_drop_tokens_top2_first_choices_first():
    top_ids = torch.tensor([[0, 1], [0, 1], [1, 0]])  # capacity ceil(0.5 * 6 / 2) = 2
    out = drop_tokens(top_ids, n_experts=2, capacity_factor=0.5)
    assert out.capacity == 2
    # queue of expert 0: t0 slot0, t1 slot0, t2 slot1 (dropped); expert 1: t2 slot0, t0 slot1, t1 slot1 (dropped)
    assert out.kept.tolist() == [[True, True], [True, False], [True, False]]
    assert out.drop_fraction == pytest.approx(2 / 6)
    assert dropped_fraction(expert_load(top_ids, 2), 0.5, top_k=2) == pytest.approx(out.drop_fraction)


def test_dropped_fraction_from_loads_matches_drop_tokens():
    top_ids = torch.randint(0, 8, (300, 1), generator=torch.Generator().manual_seed(0)) ** 2 % 8  # skewed
    for cf in (0.5, 1.0, 1.25, 2.0):
        assert dropped_fraction(expert_load(top_ids, 8), cf) == pytest.approx(drop_tokens(top_ids, 8, cf).drop_fraction)
    assert drop_tokens(torch.arange(8)[:, None], 8, 1.0).drop_fraction == 0.0


def test_imbalance_reuses_load_stats():
    rows = imbalance(torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0]]))
    assert rows[0]["max_over_mean"] == 1.0 and rows[0]["cv"] == 0.0
    assert rows[1]["max_over_mean"] == 4.0 and rows[1]["entropy"] == 0.0
    assert imbalance(torch.tensor([1, 1]))[0]["entropy_frac"] == pytest.approx(1.0)


def test_bad_capacity_and_drop_arguments_are_refused():
    load = torch.tensor([[8, 0, 0, 0], [2, 2, 2, 2]])  # a History step: [layers, e]
    with pytest.raises(ValueError, match="load has shape \\(2, 4\\): expected one layer's \\[e\\] loads"):
        dropped_fraction(load, 1.0)
    for factor in (-1.0, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"capacity_factor={factor}: must be a finite number > 0"):
            dropped_fraction(load[0], factor)
        with pytest.raises(ValueError, match="capacity_factor="):
            drop_tokens(torch.zeros(4, 1, dtype=torch.long), 4, factor)
    with pytest.raises(ValueError, match="top_k=0: must be a positive integer"):
        dropped_fraction(load[0], 1.0, top_k=0)
    with pytest.raises(ValueError, match="top_ids holds expert ids in \\[0, 3\\]: n_experts=2"):
        drop_tokens(torch.tensor([[0], [3]]), 2, 1.0)
    with pytest.raises(ValueError, match="top_ids \\(4,\\)"):
        drop_tokens(torch.zeros(4, dtype=torch.long), 4, 1.0)
    with pytest.raises(ValueError, match="n_experts=0"):
        expert_capacity(10, 1, 0, 1.0)


def test_update_selection_bias_refuses_unknown_layers_and_bad_rates_changing_nothing():
    model = ml4.Llama4Text.random(ml4.configs.tiny(), seed=0)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    good = torch.tensor([8, 0, 0, 0])
    with pytest.raises(ValueError, match="loads has layer 99, which is not an MoE layer .*\\[0, 1, 2, 3\\]"):
        update_selection_bias(model, {0: good, 99: good}, 0.1)
    with pytest.raises(ValueError, match="loads\\[1\\] \\(3,\\): expected one load per expert, shape \\(4,\\)"):
        update_selection_bias(model, {0: good, 1: torch.tensor([1, 2, 3])}, 0.1)
    for rate in (math.nan, -0.1):
        with pytest.raises(ValueError, match=f"rate={rate}: must be a finite number >= 0"):
            update_selection_bias(model, {0: good}, rate)
    assert all(m.selection_bias is None for m in moes)  # layer 0 was not updated before the refusal
    with pytest.raises(ValueError, match="rate=nan"):
        bias_update(torch.zeros(4), good, math.nan)


def test_expert_load_and_switch_loss_refuse_bad_ids_and_mismatched_tokens():
    with pytest.raises(ValueError, match="top_ids holds expert ids in \\[0, 7\\]: n_experts=4 needs them in \\[0, 4\\)"):
        expert_load(torch.tensor([[0], [7]]), 4)  # used to return a load of length 8
    with pytest.raises(ValueError, match="top_ids holds expert ids in \\[-1, 0\\]"):
        expert_load(torch.tensor([[0], [-1]]), 4)
    with pytest.raises(ValueError, match="top_ids \\(4, 1\\) torch.float32: expected \\[n, k\\] integer expert ids"):
        expert_load(torch.zeros(4, 1), 4)
    with pytest.raises(ValueError, match="top_ids \\(2,\\) torch.int64"):
        expert_load(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="n_experts=0: must be a positive integer"):
        expert_load(torch.zeros(2, 1, dtype=torch.long), 0)
    assert expert_load(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]  # no tokens: no load
    with pytest.raises(ValueError, match="logits \\(3, 4\\) and top_ids \\(2, 1\\): expected logits \\[n, e\\] "
                                         "and top_ids \\[n, k\\] of the same n tokens"):
        switch_aux_loss(torch.zeros(3, 4), torch.tensor([[0], [1]]))  # used to return 1.0
    with pytest.raises(ValueError, match="top_ids holds expert ids in \\[0, 7\\]: n_experts=4"):
        switch_aux_loss(torch.zeros(2, 4), torch.tensor([[0], [7]]))


def test_bias_update_refuses_a_load_of_another_shape():
    for load in (torch.ones(4, 1), torch.tensor([3.0]), torch.ones(8)):  # [4, 1] gave a [4, 4] bias, [1] a no-op
        with pytest.raises(ValueError, match=f"bias \\(4,\\) and load {re.escape(str(tuple(load.shape)))}: "
                                             "expected one load per expert, both of shape \\(e,\\)"):
            bias_update(torch.zeros(4), load, 0.1)
    with pytest.raises(TypeError, match="load must be a Tensor, got list"):
        bias_update(torch.zeros(4), [1, 2, 3, 4], 0.1)


def test_imbalance_refuses_other_ranks_and_negative_loads():
    with pytest.raises(ValueError, match="loads has shape \\(2, 3, 4\\): expected \\[layers, e\\] or one layer's "
                                         "\\[e\\] loads"):
        imbalance(torch.ones(2, 3, 4))  # used to raise a raw EinopsError
    with pytest.raises(ValueError, match="loads has shape \\(\\)"):
        imbalance(torch.tensor(3.0))
    with pytest.raises(ValueError, match="loads holds a negative load \\(-1\\): expected token counts >= 0"):
        imbalance(torch.tensor([-1.0, 1.0, 2.0]))  # gave a negative entropy
    with pytest.raises(TypeError, match="loads must be a Tensor, got list"):
        imbalance([[1, 2], [3, 4]])
