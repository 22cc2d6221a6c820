"""The training loop (minillama4.train) on the tiny preset: few steps, fixed seeds."""

import math

import pytest
import torch

import minillama4 as ml4
from minillama4.data import load_corpus
from minillama4.moe import MoE
from minillama4.train import (TrainConfig, arithmetic_accuracy, arithmetic_predictions, evaluate, lr_at,
                              next_token_loss, param_groups, train)

FAST = dict(batch_size=8, seq_len=64, lr=3e-3, warmup=5, progress=False, log_every=0)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(seed=0, chars_per_domain=20_000)


def tiny(seed=0):
    return ml4.Llama4Text.random(ml4.configs.tiny(), seed=seed)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never rises
    assert lrs[-1] == pytest.approx(1e-4)  # ends at lr * min_lr_ratio
    assert lrs[10 + 89 // 2] == pytest.approx(0.55e-3, rel=0.02)  # half-way: the cosine's midpoint


def test_param_groups_skip_decay_on_norms():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms == {id(p) for p in no_decay["params"]}


def test_training_lowers_the_loss_and_records_history(corpus):
    train_data, val_data = corpus
    model = tiny()
    before = evaluate(model, val_data, batch_size=8, seq_len=64, max_batches=4)
    history = train(model, train_data, TrainConfig(steps=40, eval_every=20, eval_batches=4, **FAST),
                    val_data=val_data)
    after = evaluate(model, val_data, batch_size=8, seq_len=64, max_batches=4)
    assert math.log(272) - 0.5 < before < math.log(272) + 0.5  # random init: about uniform
    assert sum(history.loss[-5:]) / 5 < sum(history.loss[:5]) / 5 - 1.5
    assert after < before - 1.5
    assert history.step == list(range(40)) and len(history.lr) == len(history.grad_norm) == 40
    assert history.val_step == [19, 39] and history.val_loss[-1] == pytest.approx(after, rel=1e-4)
    loads = history.loads()
    assert history.moe_layers == [0, 1, 2, 3] and loads.shape == (40, 4, 4)
    assert (loads.sum(-1) == 8 * 64 * 1).all()  # every token copy counted, per step and layer
    assert history.max_over_mean().shape == (40, 4) and (history.max_over_mean() >= 1).all()
    assert history.switch_aux[0] >= 1.0 - 1e-5 and history.z_loss[0] > 0  # measured even when off
    assert history.total_loss == history.loss  # coefficients 0: only the cross-entropy was minimised
    assert history.bias == [] and all(m.selection_bias is None for m in model.modules() if isinstance(m, MoE))
    assert set(history.series()) >= {"step", "loss", "lr", "switch_aux"}


def test_training_is_deterministic(corpus):
    runs = [train(tiny(), corpus[0], TrainConfig(steps=8, **FAST)) for _ in range(2)]
    assert runs[0].loss == runs[1].loss
    assert torch.equal(runs[0].loads(), runs[1].loads())


def test_aux_loss_free_bias_reduces_imbalance(corpus):
    plain = train(tiny(), corpus[0], TrainConfig(steps=60, **FAST))
    model = tiny()
    biased = train(model, corpus[0], TrainConfig(steps=60, bias_update_rate=0.03, **FAST))
    assert len(biased.bias) == 60 and biased.bias[-1].shape == (4, 4)
    assert all(m.selection_bias is not None for m in model.modules() if isinstance(m, MoE))
    # the last step's update: its busiest expert went down by the rate, its least busy up
    load, step = biased.load[-1], biased.bias[-1] - biased.bias[-2]
    assert torch.allclose(step.gather(1, load.argmax(1, keepdim=True)), torch.tensor(-0.03))
    assert torch.allclose(step.gather(1, load.argmin(1, keepdim=True)), torch.tensor(0.03))
    assert biased.max_over_mean()[-20:].mean() < plain.max_over_mean()[-20:].mean() - 0.3
    assert abs(sum(biased.loss[-5:]) - sum(plain.loss[-5:])) / 5 < 0.2  # at no real cost in loss


def test_switch_aux_loss_lowers_the_switch_metric(corpus):
    plain = train(tiny(), corpus[0], TrainConfig(steps=40, **FAST))
    balanced = train(tiny(), corpus[0], TrainConfig(steps=40, switch_aux=0.1, z_loss=1e-3, **FAST))
    assert sum(balanced.switch_aux[-10:]) < sum(plain.switch_aux[-10:]) - 0.5  # 10 steps: mean lower by 0.05
    expected = [l + 0.1 * s + 1e-3 * z for l, s, z in zip(balanced.loss, balanced.switch_aux, balanced.z_loss)]
    assert balanced.total_loss == pytest.approx(expected, rel=1e-5)


def test_one_batch_is_memorised_and_iterables_can_end():
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    history = train(tiny(), batch, TrainConfig(steps=30, **FAST))
    assert history.loss[-1] < history.loss[0] - 2.5
    short = train(tiny(), [batch, batch, batch], TrainConfig(steps=10, **FAST), val_data=[batch])
    assert len(short.loss) == 3 and short.val_step == [2]  # the validation loss is still taken at the end
    with_overrides = train(tiny(), batch, steps=2, progress=False, log_every=0)
    assert len(with_overrides.loss) == 2


def test_evaluate_matches_the_loss_by_hand():
    model = tiny()
    ids = torch.randint(0, 256, (3 * 16 + 1,), generator=torch.Generator().manual_seed(0))
    windows = torch.stack([ids[i * 16: i * 16 + 17] for i in range(3)])
    with torch.no_grad():
        by_hand = next_token_loss(model(windows[:, :-1]), windows[:, 1:]).item()
    assert evaluate(model, ids, batch_size=2, seq_len=16) == pytest.approx(by_hand, rel=1e-5)
    assert evaluate(model, [windows]) == pytest.approx(by_hand, rel=1e-5)


def test_arithmetic_predictions_shape_and_answers():
    rows = arithmetic_predictions(tiny(), n=12, seed=3, max_digits=2)
    assert len(rows) == 12
    for prompt, expected, predicted in rows:
        assert prompt.endswith("=") and eval(prompt[:-1]) == int(expected) and "\n" not in predicted
    assert 0.0 <= arithmetic_accuracy(tiny(), n=12, seed=3, max_digits=2) <= 1.0
