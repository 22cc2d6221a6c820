"""DPO (minillama4.train.dpo): the loss against hand-computed values, its beta limits and gradient
direction, pair building, and a learning test: DPO raises preference accuracy and margin."""

import copy
import math

import pytest
import torch

import minillama4 as ml4
from minillama4.train import dpo
from minillama4.train import posttrain_task as T
from helpers import posttrain_model as small_model
from helpers import warmed_posttrain_model

TOK = ml4.ByteTokenizer()


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_loss_hand_computed():
    # policy chosen -1, rejected -2; reference -1.5 for both; beta 0.1
    loss, cw, cl = dpo.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert float(cw) == pytest.approx(0.05) and float(cl) == pytest.approx(-0.05)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.1)))  # -log sigma(0.1) = 0.644397
    assert float(loss) == pytest.approx(0.6443966600735709)
    # a batch is the mean over pairs; a wrongly ranked pair costs more than log 2
    loss2, _, _ = dpo.dpo_loss(t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0), beta=1.0)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2  # margins +1 and -2
    assert float(loss2) == pytest.approx(expected)


def test_policy_equal_to_reference_gives_log2():
    pc, pr = t(-3.0, -0.5), t(-1.0, -7.0)
    loss, cw, cl = dpo.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.5)
    assert float(loss) == pytest.approx(math.log(2)) and torch.all(cw == 0) and torch.all(cl == 0)


def test_beta_limits():
    args = (t(-1.0), t(-4.0), t(-2.0), t(-2.0))  # log-ratio margin h = 1 - (-2) = 3
    assert float(dpo.dpo_loss(*args, beta=1e-8)[0]) == pytest.approx(math.log(2), abs=1e-6)  # beta -> 0
    assert float(dpo.dpo_loss(*args, beta=100.0)[0]) == pytest.approx(0.0, abs=1e-12)  # right order, large beta
    wrong = (t(-4.0), t(-1.0), t(-2.0), t(-2.0))  # h = -3
    assert float(dpo.dpo_loss(*wrong, beta=100.0)[0]) == pytest.approx(300.0, rel=1e-9)  # ~ -beta h


def test_gradient_direction_and_weight():
    pc, pr = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    beta = 0.5
    loss, cw, cl = dpo.dpo_loss(pc, pr, t(-1.2), t(-1.5), beta)
    loss.backward()
    # dL/dlog pi(y_w) = -beta sigma(r_l - r_w) < 0 and dL/dlog pi(y_l) = +beta sigma(r_l - r_w) > 0 (paper §4)
    weight = torch.sigmoid(cl - cw)
    assert float(pc.grad) < 0 < float(pr.grad)
    assert float(pc.grad) == pytest.approx(float(-beta * weight))
    assert float(pr.grad) == pytest.approx(float(beta * weight))


def test_sequence_logps_sum_the_response_tokens_only():
    model = small_model()
    pair = dpo.PreferencePair(T.Problem(3, 4), "7", "8\n3+4=8", "wrong")
    ids, mask = dpo.pair_batch([pair])
    assert ids.shape[0] == 2 and mask[0].sum() == 2 and mask[1].sum() == len("8\n3+4=8") + 1
    with torch.no_grad():
        lp = dpo.sequence_logps(model, ids, mask)
        full = T.token_logprobs(model, ids)
    n0 = len(T.encode_chat(TOK, pair.problem, "7")[0])
    assert float(lp[0]) == pytest.approx(float(full[0, n0 - 3:n0 - 1].sum().detach()), abs=1e-5)  # "7" and <|eot|>
    # the rejected row by hand, from its own unpadded ids: log-softmax of the logits before each
    # response token ("8\n3+4=8" and <|eot|>), summed
    ids1 = T.encode_chat(TOK, pair.problem, "8\n3+4=8")[0]
    n1, k = len(ids1), len("8\n3+4=8") + 1
    assert ids.shape[1] == n1 and ids[1].tolist() == ids1 and TOK.decode(ids1[n1 - k:]) == "8\n3+4=8<|eot|>"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids1]))[0].float(), -1)
    by_hand = sum(float(logp[j - 1, ids1[j]]) for j in range(n1 - k, n1))
    assert float(lp[1]) == pytest.approx(by_hand, abs=1e-5)
    assert float(lp[1]) > float(full[1].sum()) + 10  # the prompt's tokens (about -5.6 each) are not in it


def test_build_pairs_prefers_correct_and_concise(monkeypatch):
    p, q, r = T.Problem(3, 4), T.Problem(5, 5), T.Problem(1, 1)

    def fake_complete(model, problems, n_samples, temperature, seed, tokenizer=None):
        def c(prob, text, finished=True):
            return T.Completion(prob, text, finished, [], [])
        table = {p: [c(p, "7"), c(p, "8"), c(p, "8"), c(p, "9"), c(p, "7\n3+4=7")],
                 q: [c(q, "10\n5+5=10"), c(q, "11")],  # no correct concise sample: no pair
                 r: [c(r, "2"), c(r, "3", finished=False)]}  # unfinished samples are not used
        return [table[x] for x in problems]

    monkeypatch.setattr(dpo, "complete", fake_complete)
    pairs = dpo.build_pairs(None, [p, q, r], n_samples=5)
    assert pairs == [dpo.PreferencePair(p, "7", "8", "wrong"),  # the most frequent wrong answer
                     dpo.PreferencePair(p, "7", "7\n3+4=7", "verbose")]
    # a generator of problems gives the same pairs (it was read twice: sampled, then no pairs)
    assert dpo.build_pairs(None, (x for x in [p, q, r]), n_samples=5) == pairs


@pytest.fixture(scope="module")
def warm_model():
    """A small model after a short SFT on level 1 with 40% verbose responses: its samples come in
    both styles and are sometimes wrong, so DPO has wrong and verbose responses to push down."""
    return warmed_posttrain_model(verbose_fraction=0.4, steps=160)


def test_dpo_raises_preference_accuracy_and_margin(warm_model):
    policy = copy.deepcopy(warm_model)
    pairs = dpo.build_pairs(policy, T.make_problems(96, seed=11, levels=(1,)), n_samples=6, seed=0)
    held = dpo.build_pairs(policy, T.make_problems(64, seed=12, levels=(1,)), n_samples=6, seed=1)
    assert {pr.kind for pr in pairs} == {"wrong", "verbose"} and len(held) >= 40
    history = dpo.train_dpo(policy, pairs, dpo.DPOConfig(beta=0.5, steps=30, batch_size=32, lr=3e-4, eval_every=10),
                            reference=warm_model, eval_pairs=held)
    assert history.eval_step == [-1, 9, 19, 29]
    # before any step the policy is the reference: every margin is 0, accuracy is chance, loss is log 2
    assert history.eval_margin[0] == pytest.approx(0.0, abs=1e-6) and history.eval_accuracy[0] == 0.5
    assert history.eval_loss[0] == pytest.approx(math.log(2), abs=1e-5)
    # on held-out pairs (other problems, other samples)
    assert history.eval_margin[-1] > 1.5  # implicit reward margin r(y_w) - r(y_l)
    assert history.eval_accuracy[-1] >= 0.75  # reward accuracy, up from 0.5
    assert history.eval_loss[-1] < math.log(2) - 0.3
    assert all(v > 0.5 for v in history.eval_margin_by_kind[-1].values())  # both wrong and verbose pairs
    assert sum(history.margin[-5:]) / 5 > sum(history.margin[:5]) / 5 + 1.0  # training batches too


# ------------------------------------------------------------------------------ bad input: refused by name, nothing lost
@pytest.mark.parametrize("field, value, message", [
    ("beta", float("nan"), r"DPOConfig.beta=nan: must be a finite number > 0"),
    ("beta", -1, r"DPOConfig.beta=-1: must be a finite number > 0 \(beta < 0 learns the opposite preference"),
    ("beta", 0, r"DPOConfig.beta=0: must be a finite number > 0 .*beta = 0 never changes the model"),
    ("steps", -3, r"DPOConfig.steps=-3: must be a positive integer"),
    ("batch_size", 0, r"DPOConfig.batch_size=0: must be a positive integer"),
    ("weight_decay", -1, r"DPOConfig.weight_decay=-1: must be a finite number >= 0"),
    ("grad_clip", float("inf"), r"DPOConfig.grad_clip=inf: must be a finite number >= 0"),
])
def test_dpo_config_refuses_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        dpo.DPOConfig(**{field: value})


def test_dpo_refuses_bad_input_before_training():
    from minillama4.train.rl import RLConfig
    from minillama4.train.sft import make_sft_dataset

    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    pairs = [dpo.PreferencePair(T.Problem(3, 4), "7", "8", "wrong")]
    with pytest.raises(TypeError, match="cfg must be a DPOConfig, got RLConfig"):
        dpo.train_dpo(model, pairs, RLConfig())
    with pytest.raises(TypeError, match="pairs\\[0\\] is a SFTExample: expected PreferencePair items"):
        dpo.train_dpo(model, make_sft_dataset(4))
    with pytest.raises(ValueError, match="pairs is empty"):
        dpo.train_dpo(model, [])
    with pytest.raises(ValueError, match="eval_pairs is empty"):
        dpo.train_dpo(model, pairs, dpo.DPOConfig(steps=1), eval_pairs=[])
    with pytest.raises(TypeError, match="policy must be a Module, got Llama4Config"):
        dpo.train_dpo(T.model_config(), pairs)
    with pytest.raises(ValueError, match="pairs is empty"):
        dpo.preference_metrics(model, model, [], beta=0.1)
    with pytest.raises(ValueError, match="margin is empty"):
        dpo.reward_accuracy(torch.zeros(0))
    with pytest.raises(ValueError, match="beta=-0.1: must be a finite number > 0"):
        dpo.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=-0.1)
    with pytest.raises(ValueError, match="n_samples=1, temperature=1.0: pairs need n_samples >= 2"):
        dpo.build_pairs(model, [T.Problem(3, 4)], n_samples=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dpo_stops_before_the_update_at_a_nonfinite_loss(monkeypatch):
    policy = small_model()
    before = [p.detach().clone() for p in policy.parameters()]
    real_loss = dpo.dpo_loss

    def nan_loss(*args):
        loss, cw, cl = real_loss(*args)
        return loss * float("nan"), cw, cl

    monkeypatch.setattr(dpo, "dpo_loss", nan_loss)
    pairs = [dpo.PreferencePair(T.Problem(3, 4), "7", "8", "wrong")]
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        dpo.train_dpo(policy, pairs, dpo.DPOConfig(steps=2))
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_dpo_loss_reward_accuracy_and_pairs_refuse_bad_values():
    z = torch.zeros
    with pytest.raises(ValueError, match=r"log-probabilities of shapes .*'policy_rejected': \(1,\).*'ref_rejected': "
                                         r"\(4, 1\)\}: expected four \[b\] tensors of the same shape"):
        dpo.dpo_loss(z(4), z(1), z(4), z(4, 1))  # broadcast to [4, 4] and returned a loss
    with pytest.raises(ValueError, match=r"'policy_chosen': \(2, 1\).*expected four \[b\] tensors"):
        dpo.dpo_loss(z(2, 1), z(2, 1), z(2, 1), z(2, 1))
    with pytest.raises(TypeError, match="ref_chosen must be a Tensor, got float"):
        dpo.dpo_loss(t(-1.0), t(-2.0), -1.5, t(-1.5))
    with pytest.raises(ValueError, match=r"margin holds NaN at index \[0\]: a NaN margin is neither positive nor a tie"):
        dpo.reward_accuracy(torch.tensor([float("nan"), 1.0]))  # used to return 0.5
    assert dpo.reward_accuracy(torch.tensor([float("inf"), 0.0])) == 0.75
    with pytest.raises(ValueError, match=r"PreferencePair.kind='wrongg': expected one of \('wrong', 'verbose'\)"):
        dpo.PreferencePair(T.Problem(3, 4), "7", "8", "wrongg")  # was accepted, then left out of margin_by_kind
