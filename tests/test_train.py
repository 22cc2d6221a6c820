"""The training loop (minillama4.train) on the tiny preset: few steps, fixed seeds."""

import math
import types

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


class _ArithmeticStub(torch.nn.Module):
    """A 'model' whose greedy answers are known: the true sum of the prompt it is given, plus one
    for the prompts in `wrong`. Records every prompt, and checks the call arithmetic_predictions makes."""

    def __init__(self, wrong=(), max_digits=2):
        super().__init__()
        self.wrong, self.max_digits, self.seen, self.tok = set(wrong), max_digits, [], ml4.ByteTokenizer()

    def generate(self, ids, max_new_tokens, stop_tokens=None, **kwargs):
        newline = self.tok.encode("\n")[0]
        assert max_new_tokens == 2 * self.max_digits + 1 and list(stop_tokens) == [newline] and not kwargs
        rows = []
        for row in ids.tolist():
            assert row[0] == self.tok.eos_id and len(row) == ids.shape[1]  # <|end_of_text|> then the problem
            prompt = self.tok.decode(row[1:])
            self.seen.append(prompt)
            a, b = prompt.removesuffix("=").split("+")
            answer = int(a) + int(b) + (prompt in self.wrong)
            new = self.tok.encode(f"{answer}\n")
            rows.append(row + new + [newline] * (max_new_tokens - len(new)))  # padded with the stop token
        return torch.tensor(rows)


def test_arithmetic_accuracy_counts_exact_answers():
    import random

    from minillama4.data import arithmetic_problem

    rng = random.Random(3)  # the seeded problems, drawn again here
    problems = [arithmetic_problem(rng, 2) for _ in range(12)]
    assert problems[1] == ("7+4=", "11") and problems[6] == ("83+66=", "149") and problems[10] == ("0+45=", "45")
    wrong = {"7+4=", "83+66=", "0+45="}  # 3 of the 12 answered one too high
    stub = _ArithmeticStub(wrong)
    assert arithmetic_accuracy(stub, n=12, seed=3, max_digits=2) == 0.75
    assert sorted(stub.seen) == sorted(p for p, _ in problems)  # each problem asked once
    stub = _ArithmeticStub(wrong)
    rows = arithmetic_predictions(stub, n=12, seed=3, max_digits=2)
    assert [(p, a) for p, a, _ in rows] == problems  # in the seeded order, not grouped by length
    assert [got for _, _, got in rows] == [str(int(a) + (p in wrong)) for p, a in problems]
    assert rows[1] == ("7+4=", "11", "12") and rows[0] == ("5+9=", "14", "14")
    assert arithmetic_accuracy(_ArithmeticStub(), n=12, seed=3, max_digits=2) == 1.0
    assert arithmetic_accuracy(_ArithmeticStub({p for p, _ in problems}), n=12, seed=3, max_digits=2) == 0.0
    assert arithmetic_accuracy(_ArithmeticStub({"5+9="}), n=4, seed=3, max_digits=2) == 0.75  # n=4: the first 4
    # no problems answered 0.0 (read as 0% correct), and a bad ops went unchecked when none were drawn
    with pytest.raises(ValueError, match="n=0: must be a positive integer"):
        arithmetic_accuracy(_ArithmeticStub(), n=0)
    with pytest.raises(ValueError, match="ops='/'"):
        arithmetic_accuracy(_ArithmeticStub(), n=1, ops="/")
    with pytest.raises(TypeError, match="tokenizer must be a ByteTokenizer or HFTokenizer, got str"):
        arithmetic_accuracy(_ArithmeticStub(), tokenizer="tok")


def test_an_empty_history_has_no_imbalance_rows():
    from minillama4.train.loop import History

    assert History(moe_layers=[1, 3]).max_over_mean().shape == (0, 2)  # was IndexError


def test_bad_schedule_and_config_fields_are_refused_where_built():
    for bad, match in [(dict(min_lr_ratio=-1), "min_lr_ratio=-1: .*in \\[0, 1\\]"),
                       (dict(min_lr_ratio=5), "min_lr_ratio=5"),
                       (dict(warmup=-5), "warmup=-5: must be a non-negative integer"), (dict(lr=math.nan), "lr=nan"),
                       (dict(lr=0.0), "lr=0.0: .*> 0"), (dict(switch_aux=math.nan), "switch_aux=nan"),
                       (dict(bias_update_rate=math.nan), "bias_update_rate=nan"), (dict(z_loss=-1e-3), "z_loss=-0.001"),
                       (dict(weight_decay=-0.1), "weight_decay=-0.1"),
                       (dict(grad_clip=math.nan), "grad_clip=nan.*0 turns"), (dict(grad_clip=-1.0), "grad_clip=-1.0"),
                       (dict(steps=-3), "steps=-3: must be a positive integer"),
                       (dict(batch_size=0), "batch_size=0"), (dict(seq_len=-1), "seq_len=-1"),
                       (dict(eval_batches=0), "eval_batches=0"), (dict(betas=(0.9, 1.0)), "betas\\[1\\]=1.0")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(TypeError, match="steps=2.5: must be a positive integer"):
        TrainConfig(steps=2.5)
    with pytest.raises(TypeError, match="grad_clip=None: .*0 turns clipping off"):
        TrainConfig(grad_clip=None)
    # lr_at checks what it reads on any config (shapes.py passes its own)
    with pytest.raises(ValueError, match="min_lr_ratio=-1"):
        lr_at(0, types.SimpleNamespace(steps=10, lr=1e-3, warmup=0, min_lr_ratio=-1))
    TrainConfig(steps=5, warmup=0, min_lr_ratio=1.0, grad_clip=0.0, eval_every=0, log_every=0)  # edges stay valid


def test_bad_train_arguments_fail_before_the_first_step():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    base = dict(steps=3, batch_size=2, seq_len=16, progress=False, log_every=0)
    dense = ml4.Llama4Text.random(ml4.configs.tiny().replace_text(moe_layers=[]), seed=0)
    cases = [
        (ValueError, "val_data holds 10 tokens, too few for one window",
         lambda: train(model, ids, val_data=ids[:10], **base)),
        (ValueError, "eval_batches=0", lambda: train(model, ids, val_data=ids, **{**base, "eval_batches": 0})),
        (TypeError, "val_data must be a TokenCorpus", lambda: train(model, ids, val_data="text", **base)),
        (ValueError, "val_data has shape \\(2, 17\\).*pass a list",
         lambda: train(model, ids, val_data=ids[:34].view(2, 17), **base)),
        (TypeError, "data must be a TokenCorpus.*got int", lambda: train(model, 5, **base)),
        (TypeError, "data\\[0\\] must be a Tensor, got int", lambda: train(model, [1, 2, 3], **base)),
        (ValueError, "data is an empty list", lambda: train(model, [], **base)),
        (TypeError, "data has dtype torch.float32", lambda: train(model, ids.float(), **base)),
        (ValueError, "data holds 16 tokens, too few", lambda: train(model, ids[:16], **base)),
        (TypeError, "model must be a Module, got Llama4Config", lambda: train(ml4.configs.tiny(), ids, **base)),
        (TypeError, "cfg must be a TrainConfig, got dict", lambda: train(model, ids, {"steps": 2})),
        (TypeError, "unknown TrainConfig field\\(s\\) \\['stpes'\\]", lambda: train(model, ids, stpes=2)),
        (ValueError, "lr=nan", lambda: train(model, ids, lr=math.nan, **base)),
        (ValueError, "bias_update_rate=0.01: the model has no MoE layer",
         lambda: train(dense, ids, bias_update_rate=0.01, **base)),
        (ValueError, "switch_aux=0.01: the model has no MoE layer", lambda: train(dense, ids, switch_aux=0.01, **base)),
        # these three used to be found only after training steps (an audit)
        (ValueError, r"val_data holds token ids in \[\d+, 277\]: the model's vocabulary is \[0, 272\)",
         lambda: train(model, ids, val_data=torch.cat([ids[:99] + 5, torch.tensor([277])]), **base)),
        (ValueError, r"data holds token ids in \[-1, 255\]", lambda: train(model, torch.cat([ids, torch.tensor([-1])]), **base)),
        (ValueError, r"val_data\[1\] holds token ids in \[300, 300\]",
         lambda: train(model, ids, val_data=[ids[:34].view(2, 17), torch.full((2, 17), 300)], **base)),
        (TypeError, r"val_data is a one-pass iterator \(generator\): evaluation reads it several times",
         lambda: train(model, ids, val_data=(b for b in [ids[:34].view(2, 17)]), **base)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was trained
    assert len(train(dense, ids, **base).loss) == 3  # a dense model trains without balancing


def test_training_stops_at_the_first_nan_loss_with_the_history_so_far():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan  # every logit of token 0 is NaN: the loss is NaN from step 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with pytest.raises(FloatingPointError, match="loss is nan at step 0") as info:
        train(model, torch.randint(0, 256, (500,)), steps=3, batch_size=2, seq_len=16, progress=False, log_every=0)
    assert info.value.history.step == [] and not model.training  # mode restored, no step recorded
    assert all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())
    batch = torch.randint(0, 256, (2, 17))
    with pytest.raises(TypeError, match="data batch 1 must be a Tensor, got str") as info:
        train(tiny(), iter([batch, "oops"]), steps=3, progress=False, log_every=0)
    assert info.value.history.step == [0]  # an iterable is checked batch by batch: the steps done are kept


def test_evaluate_refuses_data_without_a_window():
    model = tiny()
    ids = torch.randint(0, 256, (100,))
    with pytest.raises(ValueError, match="data is an empty list: there is no loss"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="max_batches=0: must be a positive integer"):
        evaluate(model, ids, batch_size=2, seq_len=16, max_batches=0)
    with pytest.raises(ValueError, match="data yielded no batch"):
        evaluate(model, iter([]))
    with pytest.raises(ValueError, match="data holds 100 tokens, too few for one window of seq_len \\+ 1 = 129"):
        evaluate(model, ids)
    assert model.training  # left as it was


def test_arithmetic_predictions_batch_by_tokens_with_a_bpe_like_tokenizer(tmp_path):
    """A checkpoint's tokenizer groups digits (here in pairs): "1+234=" and "12+34=" have the same
    characters but 5 and 4 tokens. Batching by characters gave ragged batches (torch.tensor raised)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from minillama4.tokenizer import HFTokenizer

    vocab = {w: i for i, w in enumerate([str(d) for d in range(100)] + ["+", "=", "\n", "<|end_of_text|>", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\d\d|\d|."), behavior="isolated")
    tok.add_special_tokens(["<|end_of_text|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    assert len(hf.encode("1+234=")) == 5 and len(hf.encode("12+34=")) == 4
    rows = arithmetic_predictions(tiny(), n=16, seed=3, max_digits=3, tokenizer=hf)
    assert len(rows) == 16 and all(p.endswith("=") for p, _, _ in rows)
