"""GRPO (minillama4.train.rl): group-relative advantages and zero-advantage filtering on
constructed groups, the clipped loss and k3 KL, the curriculum, and a learning test: RL raises
the mean reward on held-out prompts over its starting point."""

import copy
import dataclasses
import random

import pytest
import torch

from minillama4.train import rl
from minillama4.train import posttrain_task as T
from helpers import warmed_posttrain_model


def test_group_advantages_on_constructed_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0],  # mean 0.5, std (Bessel) = sqrt(1/3)
                            [1.0, 1.0, 1.0, 1.0],  # all right: zero advantage
                            [0.0, 0.0, 0.0, 0.0],  # all wrong: zero advantage
                            [1.0, 0.0, 0.0, 0.0]])  # mean 0.25, std = 0.5
    adv = rl.group_advantages(rewards, eps=0.0)
    s = (1 / 3) ** 0.5
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))
    assert torch.allclose(adv[3], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5)
    assert torch.allclose(adv.sum(1), torch.zeros(4), atol=1e-6)  # advantages sum to 0 in every group
    assert torch.allclose(rl.group_advantages(rewards, scale=False)[3], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert rl.zero_advantage_groups(rewards).tolist() == [False, True, True, False]
    assert rl.zero_advantage_groups(torch.tensor([[0.5, 0.5], [0.2, 0.3]])).tolist() == [True, False]


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    logp = torch.linspace(-5, 0, 11)
    assert torch.equal(rl.k3_kl(logp, logp), torch.zeros(11))
    assert (rl.k3_kl(logp, logp.flip(0)) >= 0).all()
    # unbiased: E_{x~p}[k3] = KL(p || q) for two categorical distributions
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    k3 = (p * rl.k3_kl(p.log(), q.log())).sum()
    assert float(k3) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


def test_grpo_loss_is_the_policy_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = rl.grpo_loss(logp, logp.detach(), adv, mask)
    # -mean_i A_i * (1/|o_i|) sum_t rho_t with rho = 1: -(1 * 2/2 + (-2) * 3/3) / 2 = 0.5
    assert float(loss.detach()) == pytest.approx(0.5)
    assert stats["clip_frac"] == 0.0 and stats["ratio"] == pytest.approx(1.0)
    loss.backward()
    # d loss / d logp[i, t] = -A_i / |o_i| / n_sequences on response tokens, 0 elsewhere
    expected = torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(logp.grad, expected)


def test_grpo_clipping_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 = 1.65 (clipped) and 1.05
    loss, stats = rl.grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] < 0  # the clipped token gets no gradient
    assert stats["clip_frac"] == 0.5
    # with a negative advantage, a ratio above 1 + eps is NOT clipped (min keeps the worse term)
    logp2 = torch.tensor([[0.5]], requires_grad=True)
    rl.grpo_loss(logp2, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool))[0].backward()
    assert float(logp2.grad) == pytest.approx(float(torch.exp(torch.tensor(0.5))))


def test_kl_penalty_pulls_towards_the_reference():
    logp = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, stats = rl.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool),
                               ref_logp=ref, kl_coef=0.1)
    assert stats["kl"] > 0
    loss.backward()
    assert logp.grad[0, 0] > 0 > logp.grad[0, 1]  # descent lowers the first log-prob and raises the second


def test_curriculum_retires_easy_levels_and_unlocks_harder_ones():
    cur = rl.Curriculum(easy_above=0.9, advance_at=0.5, ema=0.0)
    cur.start({1: 1.0, 2: 0.95, 3: 0.6, 4: 0.2, 5: 0.0, 6: 0.0})
    assert cur.retired == {1, 2} and cur.max_level == 4 and cur.active() == [3, 4]  # 3 passes 0.5: unlock 4
    cur.update({3: 0.95, 4: 0.3})
    assert cur.active() == [4]
    cur.update({4: 0.6})
    assert cur.max_level == 5 and cur.active() == [4, 5]
    problems = cur.sample(random.Random(0), 40)
    assert {p.level for p in problems} == {4, 5}
    everything_easy = rl.Curriculum()
    everything_easy.start({lv: 1.0 for lv in T.LEVELS})
    assert everything_easy.active() == [6]  # never empty: the hardest level stays


@pytest.fixture(scope="module")
def warm_model():
    """A short SFT on level 1 (concise answers): it solves some problems, not all."""
    return warmed_posttrain_model(verbose_fraction=0.0, steps=120)


def test_rl_raises_held_out_reward(warm_model):
    policy = copy.deepcopy(warm_model)
    held_out = T.make_problems(40, seed=1234, levels=(1,))
    before = rl.mean_reward(policy, held_out, n_samples=8, seed=5)
    cfg = rl.RLConfig(steps=40, prompts_per_step=16, group_size=8, lr=2e-3, mu=2, kl_coef=0.0, levels=(1,),
                      curriculum=False, seed=0)
    history = rl.train_rl(policy, cfg, eval_problems=held_out[:12])
    after = rl.mean_reward(policy, held_out, n_samples=8, seed=5)
    assert 0.1 < before < 0.9  # a starting point with something to learn
    assert after > before + 0.15
    assert history.eval_accuracy[-1] > history.eval_accuracy[0]  # greedy answers improve too
    assert sum(history.reward[-10:]) / 10 > sum(history.reward[:10]) / 10 + 0.05  # the training reward rises too
    assert len(history.reward) == 40 and all(0 <= f <= 1 for f in history.frac_filtered)
    assert any(f > 0 for f in history.frac_filtered)  # some all-right / all-wrong groups were dropped
    assert all(k >= 0 for k in history.kl if k == k) and history.kl[-1] > 0  # drifted from the reference
    assert history.eval_step == [-1, 39]


def test_rl_curriculum_probes_reprobes_and_moves_levels(warm_model):
    """train_rl with the curriculum on (the default) and a fresh probe after every step: the probes
    are the policy's real pass rates, and the levels drawn each step follow the documented rule
    (retire a level at pass rate >= easy_above, unlock the next one past advance_at, a reprobe
    resets retirements, unlocked levels stay unlocked). The warm model solves about a quarter of
    level 1 and no harder sums, so advance_at=0.1 unlocks level 2 at the start and easy_above=0.27
    lies between level 1's pass rates before and after a little RL: the levels move."""
    levels, steps, samples = (1, 2, 3), 3, 4  # samples: probe_pass_rates' default, which train_rl uses
    cfg = rl.RLConfig(steps=steps, prompts_per_step=8, group_size=4, lr=2e-3, kl_coef=0.0, levels=levels,
                      curriculum=True, easy_above=0.27, advance_at=0.1, probe_problems=8, reprobe_every=1, seed=0)
    expected_probe = rl.probe_pass_rates(copy.deepcopy(warm_model), levels, problems_per_level=cfg.probe_problems,
                                         seed=cfg.seed + 7)
    policy = copy.deepcopy(warm_model)
    history = rl.train_rl(policy, cfg)

    # the initial probe: level -> pass rate of the untrained policy, from real samples
    assert history.probe == expected_probe
    n = cfg.probe_problems * samples
    for probe in [history.probe] + [p for _, p in history.reprobes]:
        assert list(probe) == list(levels)
        assert all(0 <= r <= 1 and abs(r * n - round(r * n)) < 1e-9 for r in probe.values())  # k right of n
    assert history.probe[1] > max(history.probe[2], history.probe[3])  # SFT on level 1 solves level 1 best

    # a reprobe after every step but the last, tagged with its step; each is the probe of the policy
    # as it was after that step (a shorter run of the same config stops there; train_rl seeds the
    # probe after step s with cfg.seed + 7 + s)
    assert [s for s, _ in history.reprobes] == list(range(steps - 1))
    for s, fresh in history.reprobes:
        shorter = copy.deepcopy(warm_model)
        prefix = rl.train_rl(shorter, dataclasses.replace(cfg, steps=s + 1))
        assert prefix.active_levels == history.active_levels[: s + 1]  # same run up to there
        assert rl.probe_pass_rates(shorter, levels, problems_per_level=cfg.probe_problems,
                                   seed=cfg.seed + 7 + s) == fresh

    # every step draws its prompts from its active levels, the hardest of them recorded as max_level
    assert len(history.active_levels) == len(history.max_level) == len(history.level_reward) == steps
    for active, top, rewards in zip(history.active_levels, history.max_level, history.level_reward):
        assert active == sorted(active) and set(active) <= set(levels) and top == max(active)
        assert rewards and set(rewards) <= set(active)

    # the rule, on the recorded probes. Start: retire what the probe passes at >= easy_above and
    # unlock from the easiest level up to the first one the probe fails at both thresholds
    low = min(cfg.easy_above, cfg.advance_at)
    start_top = next((lv for lv in levels if history.probe[lv] < low), levels[-1])
    assert history.max_level[0] == start_top
    assert history.active_levels[0] == ([lv for lv in levels if lv <= start_top
                                         and history.probe[lv] < cfg.easy_above] or [start_top])
    # after step s: running rates ema * probe + (1 - ema) * this step's reward, then the fresh probe
    # retires exactly the levels it passes (never the hardest) and the unlocking goes on from there
    ema = rl.Curriculum().ema  # train_rl uses the Curriculum's default
    previous = history.probe
    for s, fresh in history.reprobes:
        top, new_top = history.max_level[s], history.max_level[s + 1]
        assert new_top >= top  # unlocked levels stay unlocked
        assert new_top == levels[-1] or fresh[new_top] < low
        for lv in levels[levels.index(top):levels.index(new_top)]:  # the levels it walked past
            running = ema * previous[lv] + (1 - ema) * history.level_reward[s].get(lv, previous[lv])
            assert max(running, fresh[lv]) >= low
        assert history.active_levels[s + 1] == [lv for lv in levels if lv <= new_top
                                                and (fresh[lv] < cfg.easy_above or lv == levels[-1])]
        previous = fresh
    # the same, step by step, through the Curriculum the unit test above checks
    cur = rl.Curriculum(levels=levels, easy_above=cfg.easy_above, advance_at=cfg.advance_at)
    cur.start(history.probe)
    replayed = [cur.active()]
    for rewards, (_, fresh) in zip(history.level_reward, history.reprobes):
        cur.update(rewards)
        cur.reprobe(fresh)
        replayed.append(cur.active())
    assert replayed == history.active_levels

    # and the run exercised the rule: a level unlocked at the start, one retired later by a reprobe
    assert history.max_level[0] > levels[0]
    assert any(active != list(range(levels[0], top + 1))
               for active, top in zip(history.active_levels[1:], history.max_level[1:]))
    assert any(loss == loss for loss in history.loss)  # some groups had mixed rewards: the policy was updated
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), warm_model.parameters()))


# ------------------------------------------------------------------------------ bad input: refused by name, nothing lost
@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, r"RLConfig.group_size=1: GRPO needs >= 2 samples per prompt to compare them"),
    ("temperature", 0, r"RLConfig.temperature=0: greedy rollouts make every sample of a group the same"),
    ("temperature", float("nan"), r"RLConfig.temperature=nan: must be a finite number > 0"),
    ("mu", 0, r"RLConfig.mu=0: must be >= 1 gradient steps"),
    ("clip_eps", float("nan"), r"RLConfig.clip_eps=nan: must be a finite number in \(0, 1\]"),
    ("clip_eps", -1, r"RLConfig.clip_eps=-1: must be a finite number in \(0, 1\]"),
    ("kl_coef", float("nan"), r"RLConfig.kl_coef=nan: must be a finite number >= 0"),
    ("kl_coef", -1, r"RLConfig.kl_coef=-1: must be a finite number >= 0"),
    ("weight_decay", -1, r"RLConfig.weight_decay=-1: must be a finite number >= 0"),
    ("steps", -3, r"RLConfig.steps=-3: must be a positive integer"),
    ("prompts_per_step", 0, r"RLConfig.prompts_per_step=0: must be a positive integer"),
    ("levels", (), r"RLConfig.levels=\(\): must name at least one difficulty level in 1..6"),
    ("levels", (2, 1), r"RLConfig.levels=\(2, 1\): must be increasing"),
    ("levels", (1, 7), r"RLConfig.levels=\(1, 7\): 7 is not a difficulty level"),
])
def test_rl_config_refuses_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        rl.RLConfig(**{field: value})


def test_rl_config_accepts_the_notebook_runs():
    for g, kl in T.PipelineConfig().rl_variants:  # KL = 0 is a cached run: no penalty, KL still measured
        assert rl.RLConfig(group_size=g, kl_coef=kl, prompts_per_step=512 // g).kl_coef == kl


def test_rl_refuses_bad_input_before_training():
    from minillama4.train.sft import SFTConfig
    from helpers import posttrain_model

    policy = posttrain_model()
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(TypeError, match="cfg must be a RLConfig, got SFTConfig"):
        rl.train_rl(policy, SFTConfig())
    with pytest.raises(TypeError, match="policy must be a Module, got Llama4Config"):
        rl.train_rl(T.model_config())
    with pytest.raises(ValueError, match="eval_problems is empty"):
        rl.train_rl(policy, rl.RLConfig(steps=1), eval_problems=[])
    with pytest.raises(ValueError, match="problems is empty"):  # a mean of nothing
        rl.mean_reward(policy, [])
    with pytest.raises(ValueError, match=r"Curriculum.levels=\(1, 1, 2\): must be increasing, without repeats"):
        rl.Curriculum(levels=(1, 1, 2))  # a repeat made _advance loop forever
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_rl_stops_before_the_update_at_a_nonfinite_loss(monkeypatch):
    from helpers import posttrain_model

    policy = posttrain_model()
    before = [p.detach().clone() for p in policy.parameters()]
    real_loss = rl.grpo_loss

    def nan_loss(*args):
        loss, stats = real_loss(*args)
        return loss * float("nan"), stats

    monkeypatch.setattr(rl, "grpo_loss", nan_loss)
    cfg = rl.RLConfig(steps=2, prompts_per_step=2, group_size=2, curriculum=False, filter_zero_advantage=False)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        rl.train_rl(policy, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_rl_pieces_refuse_bad_values():
    with pytest.raises(ValueError, match=r"rewards\[0, 1\]=nan: rewards must be finite"):
        rl.group_advantages(torch.tensor([[1.0, float("nan"), 0.0]]))  # gave all-zero advantages
    with pytest.raises(ValueError, match=r"rewards\[1, 0\]=inf"):
        rl.group_advantages(torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]), scale=False)
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\): expected \[p, g\]"):
        rl.group_advantages(torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="eps=-1: must be a finite number >= 0"):
        rl.group_advantages(torch.ones(2, 2), eps=-1)
    cur = rl.Curriculum(easy_above=0.9, advance_at=0.5, ema=0.0)
    cur.start({1: 0.2, 2: 0.0})
    before = (dict(cur.pass_rate), set(cur.retired), cur.max_level)
    with pytest.raises(ValueError, match=r"level_rewards\[2\]=5.0: must be a finite number in \[0, 1\]"):
        cur.update({1: 0.95, 2: 5.0})
    with pytest.raises(ValueError, match=r"level_rewards\[1\]=nan"):
        cur.update({1: float("nan")})
    assert (cur.pass_rate, cur.retired, cur.max_level) == before  # nothing changed by the refused updates
    with pytest.raises(ValueError, match=r"probe\[3\]=-0.5: must be a finite number in \[0, 1\]"):
        rl.Curriculum().start({3: -0.5})
    with pytest.raises(TypeError, match="level_rewards must be a dict, got list"):
        cur.update([0.5])
    logp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    for eps in (-0.5, 0, float("nan"), 1.5):
        with pytest.raises(ValueError, match=rf"clip_eps={eps}: must be a finite number in \(0, 1\]"):
            rl.grpo_loss(logp, logp, adv, mask, clip_eps=eps)
    with pytest.raises(ValueError, match="kl_coef=-0.1: must be a finite number >= 0"):
        rl.grpo_loss(logp, logp, adv, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"\{'logp': \(2, 3\), 'old_logp': \(2, 3\), 'mask': \(2, 2\)\} and "
                                         r"advantages \(2,\): expected \[b, t\] log-probabilities"):
        rl.grpo_loss(logp, logp, adv, mask[:, :2])
    with pytest.raises(ValueError, match=r"advantages \(3,\)"):
        rl.grpo_loss(logp, logp, torch.ones(3), mask)
    for cap in (-1, 0, float("nan")):
        with pytest.raises(ValueError, match=f"max_value={cap}: must be a finite number > 0"):
            rl.k3_kl(logp, logp, max_value=cap)  # -1 made every estimate -1
