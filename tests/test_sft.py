"""SFT (minillama4.train.sft): the masked loss (no loss on prompt tokens), the likelihood judge,
pruning, and a learning test: SFT raises chat accuracy."""

import math

import pytest
import torch
import torch.nn.functional as F

import minillama4 as ml4
from minillama4.train import posttrain_task as T
from minillama4.train import sft
from helpers import posttrain_model as small_model

TOK = ml4.ByteTokenizer()


def examples():
    return [sft.SFTExample(T.Problem(3, 4), "7", "concise"),
            sft.SFTExample(T.Problem(487, 65), "552\n487+65=552", "verbose")]


def test_sft_batch_masks_only_assistant_tokens():
    ids, mask = sft.sft_batch(examples())
    assert ids.shape[0] == 2 and mask.shape == ids.shape
    assert TOK.decode(ids[0][mask[0]].tolist()) == "7<|eot|>"
    assert TOK.decode(ids[1][mask[1]].tolist()) == "552\n487+65=552<|eot|>"
    assert (ids[0][~mask[0]][-3:] == TOK.pad_id).all()  # the short row is right-padded, unmasked


def test_masked_loss_equals_cross_entropy_on_assistant_tokens():
    ids, mask = sft.sft_batch(examples())
    logits = torch.randn(*ids.shape, TOK.vocab_size, generator=torch.Generator().manual_seed(0))
    loss = sft.masked_sft_loss(logits, ids, mask)
    ce = []
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                ce.append(F.cross_entropy(logits[b, t][None], ids[b, t + 1][None]))
    assert len(ce) == 2 + 15  # "7<|eot|>" and "552\n487+65=552<|eot|>"
    assert float(loss) == pytest.approx(float(torch.stack(ce).mean()), rel=1e-6)


def test_no_loss_and_no_gradient_on_prompt_tokens():
    ids, mask = sft.sft_batch(examples())
    logits = torch.randn(*ids.shape, TOK.vocab_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    sft.masked_sft_loss(logits, ids, mask).backward()
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, 1:]  # position t is scored iff token t+1 is an assistant token
    assert (logits.grad[~scored] == 0).all()  # prompt, header and padding positions: no gradient
    assert (logits.grad[scored].abs().sum(-1) > 0).all()
    # changing the logits that predict prompt tokens leaves the loss unchanged
    with torch.no_grad():
        changed = logits.detach().clone()
        changed[~scored] += 100 * torch.randn_like(changed[~scored])
        before = float(sft.masked_sft_loss(logits, ids, mask))
        assert float(sft.masked_sft_loss(changed, ids, mask)) == pytest.approx(before)


def test_make_sft_dataset_styles_and_levels():
    data = sft.make_sft_dataset(600, seed=0, verbose_fraction=0.3)
    assert len(data) == 600 and {ex.problem.level for ex in data} == set(T.LEVELS)
    frac = sum(ex.style == "verbose" for ex in data) / len(data)
    assert 0.25 < frac < 0.35
    assert all(T.reward(ex.problem, ex.response) == 1.0 for ex in data)
    assert sft.make_sft_dataset(50, seed=4) == sft.make_sft_dataset(50, seed=4)


def test_judge_scores_are_exact_answer_probabilities():
    model = small_model()
    problems = [T.Problem(3, 4), T.Problem(12, 345)]
    for fmt in ("raw", "chat"):
        scores = sft.judge_scores(model, problems, fmt=fmt)
        assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    # by hand, raw format: product of next-token probabilities of "7\n" after <|end_of_text|>"3+4="
    ids = torch.tensor([[TOK.eos_id] + TOK.encode("3+4=7\n")])
    with torch.no_grad():
        probs = torch.softmax(model(ids)[0].float(), -1)
    manual = probs[4, ids[0, 5]] * probs[5, ids[0, 6]]
    assert float(sft.judge_scores(model, problems[:1], fmt="raw")[0]) == pytest.approx(float(manual), rel=1e-5)
    # by hand, chat format: the probabilities of the concise answer's bytes and <|eot|> after the chat
    # prompt, each sequence on its own (in the batched call the shorter one is right-padded)
    chat = sft.judge_scores(model, problems, fmt="chat")
    for i, (p, answer) in enumerate([(problems[0], "7"), (problems[1], "357")]):
        prompt = TOK.encode(T.chat_prompt(p.question))
        ids = prompt + TOK.encode(answer) + [TOK.eot_id]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids]))[0].float(), -1)
        manual = math.prod(float(probs[j - 1, ids[j]]) for j in range(len(prompt), len(ids)))
        assert len(ids) - len(prompt) == len(answer) + 1
        assert float(chat[i]) == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match=r"fmt='xml': expected one of \('raw', 'chat'\)"):
        sft.judge_scores(model, problems, fmt="xml")


def test_prune_easy_drops_the_highest_scores():
    data = list("abcdefgh")
    scores = torch.tensor([0.9, 0.1, 0.5, 0.9, 0.0, 0.7, 0.3, 0.2])
    assert sft.prune_easy(data, scores, 0.5) == ["b", "e", "g", "h"]  # kept in their original order
    assert sft.prune_easy(data, scores, 0.25) == ["b", "c", "e", "f", "g", "h"]
    assert sft.prune_easy(data, scores, 0.125) == ["b", "c", "d", "e", "f", "g", "h"]  # tie: the first goes
    assert sft.prune_easy(data, scores, 0.0) == data
    with pytest.raises(ValueError, match=r"drop_fraction=1.0: must be a finite number in \[0, 1\)"):
        sft.prune_easy(data, scores, 1.0)


def test_sft_steps_follow_epochs():
    assert sft.sft_steps(1000, sft.SFTConfig(epochs=2, batch_size=32)) == math.ceil(2000 / 32)
    assert sft.sft_steps(1000, sft.SFTConfig(epochs=2, steps=7)) == 7


def test_sft_raises_chat_accuracy():
    model = small_model(seed=1)
    held_out = T.make_problems(60, seed=99, levels=(1,))
    data = sft.make_sft_dataset(512, seed=0, verbose_fraction=0.0, levels=(1,))
    history = sft.train_sft(model, data, sft.SFTConfig(steps=200, batch_size=32, lr=1e-2, warmup=5, eval_every=100),
                            eval_problems=held_out)
    assert history.eval_step == [99, 199] and history.n_examples == 512
    assert T.evaluate_chat(small_model(seed=1), held_out).accuracy == 0.0  # random init: no answers
    assert history.eval_accuracy[-1] >= 0.6  # greedy exact answers to level-1 chat questions
    assert sum(history.loss[-10:]) / 10 < sum(history.loss[:10]) / 10 - 3.0
    finished = [c.finished for c in T.evaluate_chat(model, held_out).completions]
    assert all(finished)  # it learned to end its turn with <|eot|>


# ------------------------------------------------------------------------------ bad input: refused by name, nothing lost
@pytest.mark.parametrize("field, value, message", [
    ("epochs", float("nan"), r"SFTConfig.epochs=nan: must be a finite number > 0"),
    ("epochs", 0, r"SFTConfig.epochs=0: must be a finite number > 0"),
    ("steps", -3, r"SFTConfig.steps=-3: must be a positive integer"),
    ("batch_size", 0, r"SFTConfig.batch_size=0: must be a positive integer"),
    ("lr", -1e-3, r"SFTConfig.lr=-0.001: must be a finite number > 0"),
    ("weight_decay", -1, r"SFTConfig.weight_decay=-1: must be a finite number >= 0"),
    ("min_lr_ratio", 2.0, r"SFTConfig.min_lr_ratio=2.0: must be a finite number in \[0, 1\]"),
    ("betas", (0.9,), r"SFTConfig.betas=\(0.9,\): must be two AdamW decay rates"),
])
def test_sft_config_refuses_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        sft.SFTConfig(**{field: value})


def test_sft_refuses_bad_input_before_training():
    from minillama4.train.loop import TrainConfig

    model, data = small_model(), sft.make_sft_dataset(16, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="cfg must be a SFTConfig, got TrainConfig"):  # pre-training's lr is 6x higher
        sft.train_sft(model, data, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="examples is empty"):
        sft.train_sft(model, [])
    with pytest.raises(ValueError, match="eval_problems is empty"):  # it used to record accuracy 0.0
        sft.train_sft(model, data, sft.SFTConfig(steps=1), eval_problems=[])
    with pytest.raises(TypeError, match="model must be a Module, got Llama4Config"):
        sft.train_sft(T.model_config(), data)
    cfg = sft.SFTConfig(steps=1)
    cfg.batch_size = 0  # set after the config was built: checked again at the call
    with pytest.raises(ValueError, match="SFTConfig.batch_size=0"):
        sft.train_sft(model, data, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_data_helpers_refuse_bad_input():
    data = sft.make_sft_dataset(16, seed=0)
    with pytest.raises(ValueError, match=r"verbose_fraction=2.0: must be a finite number in \[0, 1\]"):
        sft.make_sft_dataset(16, verbose_fraction=2.0)
    with pytest.raises(ValueError, match=r"scores of shape \(30,\): expected one score per example, shape \(16,\)"):
        sft.prune_easy(data, torch.rand(30), 0.5)
    with pytest.raises(ValueError, match=r"scores\[3\]=nan: judge scores must be finite"):
        sft.prune_easy(data, torch.tensor([0.5] * 3 + [float("nan")] * 13), 0.5)
    for frac in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"drop_fraction={frac}: must be a finite number in \[0, 1\)"):
            sft.prune_easy(data, torch.rand(16), frac)
    with pytest.raises(ValueError, match="batch_size=0: must be a positive integer"):
        sft.judge_scores(small_model(), [T.Problem(3, 4)], batch_size=0)


def test_sft_stops_before_the_update_at_a_nonfinite_loss(monkeypatch):
    model, data = small_model(), sft.make_sft_dataset(16, seed=0)
    init = [p.detach().clone() for p in model.parameters()]
    real_loss, seen = sft.masked_sft_loss, []

    def nan_at_step_1(logits, ids, mask):
        seen.append([p.detach().clone() for p in model.parameters()])  # the weights this step starts from
        loss = real_loss(logits, ids, mask)
        return loss * float("nan") if len(seen) == 2 else loss

    monkeypatch.setattr(sft, "masked_sft_loss", nan_at_step_1)
    model.eval()
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        sft.train_sft(model, data, sft.SFTConfig(steps=3, batch_size=4))
    assert not model.training  # its mode is restored too
    assert not all(torch.equal(a, b) for a, b in zip(init, model.parameters()))  # step 0 was taken
    assert all(torch.equal(a, b) for a, b in zip(seen[1], model.parameters()))  # step 1 was not


def test_masked_loss_refuses_an_empty_mask_and_other_shapes():
    ids, mask = sft.sft_batch(examples())
    logits = torch.zeros(*ids.shape, TOK.vocab_size)
    # every chat example ends in a scored <|eot|>, so a mask without a target is a mistake (it gave 0.0)
    with pytest.raises(ValueError, match=r"mask \(2, \d+\) has no True after position 0: no token to train on"):
        sft.masked_sft_loss(logits, ids, torch.zeros_like(mask))
    only_first = torch.zeros_like(mask)
    only_first[:, 0] = True  # position 0 is never a target
    with pytest.raises(ValueError, match="has no True after position 0"):
        sft.masked_sft_loss(logits, ids, only_first)
    with pytest.raises(ValueError, match=r"logits \(2, \d+, \d+\), ids \(2, \d+\), mask \(2, 3\): expected logits "
                                         r"\[b, t, v\] and ids and mask \[b, t\]"):
        sft.masked_sft_loss(logits, ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"logits \(1, \d+, \d+\)"):
        sft.masked_sft_loss(logits[:1], ids, mask)
    with pytest.raises(TypeError, match="mask must be a Tensor, got list"):
        sft.masked_sft_loss(logits, ids, mask.tolist())
