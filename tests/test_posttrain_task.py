"""The post-training task (minillama4.train.posttrain_task): difficulty, chat format, verifier,
sampling helpers; and the post-training figures (minillama4.viz.posttrain)."""

import random

import numpy as np
import pytest
import torch

import minillama4 as ml4
from minillama4.train import posttrain_task as T
from helpers import posttrain_model as small_model

TOK = ml4.ByteTokenizer()


@pytest.mark.parametrize("a, b, carries", [(0, 0, 0), (3, 4, 0), (5, 5, 1), (45, 55, 2), (999, 1, 3),
                                           (123, 456, 0), (19, 1, 1), (500, 500, 1)])
def test_count_carries(a, b, carries):
    assert T.count_carries(a, b) == carries == T.count_carries(b, a)


def test_levels_are_digits_plus_carries():
    assert T.Problem(3, 4).level == 1 and T.Problem(999, 1).level == 6
    p = T.Problem(487, 65)
    assert (p.question, p.answer, p.digits, p.carries, p.level) == ("487+65=", "552", 3, 2, 5)
    assert T.LEVELS == (1, 2, 3, 4, 5, 6)


def test_problem_at_level_hits_every_level_deterministically():
    rng = random.Random(0)
    for level in T.LEVELS:
        problems = [T.problem_at_level(rng, level) for _ in range(30)]
        assert all(p.level == level for p in problems)
        assert all(0 <= p.a < 1000 and 0 <= p.b < 1000 for p in problems)
    assert T.make_problems(12, seed=3) == T.make_problems(12, seed=3)
    counts = T.by_level(T.make_problems(60, seed=1))
    assert {lv: len(v) for lv, v in counts.items()} == {lv: 10 for lv in T.LEVELS}  # balanced
    with pytest.raises(ValueError, match="impossible"):
        T.problem_at_level(rng, 7)


def test_chat_format_uses_the_llama4_special_tokens():
    prompt = T.chat_prompt("12+345=")
    assert prompt == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n12+345=<|eot|>"
                      "<|header_start|>assistant<|header_end|>\n\n")
    ids, mask = T.encode_chat(TOK, T.Problem(12, 345), "357")
    special = [i for i in ids if i >= 256]
    names = [TOK.id_to_special[i] for i in special]
    assert names == ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|header_start|>",
                     "<|header_end|>", "<|eot|>"]  # each special token is ONE id
    assert TOK.decode(ids) == prompt + "357<|eot|>"
    assert len(ids) == len(mask) and sum(mask) == 4  # "3", "5", "7", <|eot|>
    assert mask[-4:] == [True] * 4 and not any(mask[:-4])
    assert TOK.decode([i for i, m in zip(ids, mask) if m]) == "357<|eot|>"


def test_verifier_and_styles():
    p = T.Problem(487, 65)
    assert T.format_response(p, "concise") == "552" and T.format_response(p, "verbose") == "552\n487+65=552"
    assert T.reward(p, "552") == 1.0 and T.reward(p, "552\n487+65=552") == 1.0
    assert T.reward(p, "551") == 0.0 and T.reward(p, "5520") == 0.0 and T.reward(p, "") == 0.0
    assert T.reward(p, "551\n487+65=552") == 0.0  # the first number counts
    assert T.reward(p, "552", finished=False) == 0.0  # no <|eot|>: unfinished, no reward
    assert T.parse_answer("552, not 12.") == "552" and T.parse_answer("none") is None
    assert not T.is_verbose("552") and T.is_verbose("552\n487+65=552") and T.is_verbose("552 552")
    with pytest.raises(ValueError, match="style='poetic': expected 'concise' or 'verbose'"):
        T.format_response(p, "poetic")


def test_pad_batch_right_pads_and_masks():
    ids, mask = T.pad_batch([[1, 2, 3], [4]], [[False, True, True], [True]], pad_id=TOK.pad_id)
    assert ids.tolist() == [[1, 2, 3], [4, TOK.pad_id, TOK.pad_id]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_token_logprobs_match_log_softmax():
    model = small_model()
    ids = torch.tensor([T.encode_chat(TOK, T.Problem(3, 4), "7")[0]])
    logp = T.token_logprobs(model, ids)
    full = torch.log_softmax(model(ids).float(), -1)
    assert logp.shape == (1, ids.shape[1] - 1)
    assert torch.allclose(logp[0, 5], full[0, 5, ids[0, 6]], atol=1e-6)


def test_complete_samples_groups_and_stops_at_eot():
    model = small_model()
    problems = [T.Problem(3, 4), T.Problem(12, 345), T.Problem(5, 6)]  # two prompt lengths
    out = T.complete(model, problems, n_samples=3, temperature=1.0, seed=0, max_new_tokens=6)
    assert [len(row) for row in out] == [3, 3, 3]
    for p, row in zip(problems, out):
        for c in row:
            assert c.problem == p and c.prompt_ids == TOK.encode(T.chat_prompt(p.question))
            assert len(c.response_ids) <= 6
            assert c.finished == (c.response_ids[-1:] == [TOK.eot_id])
            assert TOK.eot_id not in c.response_ids[:-1]
    again = T.complete(model, problems, n_samples=3, temperature=1.0, seed=0, max_new_tokens=6)
    assert [[c.response_ids for c in row] for row in out] == [[c.response_ids for c in row] for row in again]
    greedy = T.complete(model, problems, n_samples=2, temperature=0.0, max_new_tokens=6)
    assert all(row[0].response_ids == row[1].response_ids for row in greedy)


def _greedy_alone(model, prompt_ids, max_new_tokens):
    """One prompt's greedy continuation by a direct model.generate, cut after its first <|eot|>."""
    new = model.generate(torch.tensor([prompt_ids]), max_new_tokens, stop_tokens=[TOK.eot_id])[0, len(prompt_ids):]
    new = new.tolist()
    return new[: new.index(TOK.eot_id) + 1] if TOK.eot_id in new else new


def test_complete_answers_each_prompt_from_its_own_prompt():
    model = small_model()
    with torch.no_grad():  # <|eot|> wins where byte 19 would: some greedy answers end early, some do not
        model.lm_head.weight[TOK.eot_id] = 1.5 * model.lm_head.weight[19]
    problems = [T.Problem(3, 4), T.Problem(12, 345), T.Problem(5, 6), T.Problem(98, 7), T.Problem(7, 8)]
    prompts = [TOK.encode(T.chat_prompt(p.question)) for p in problems]  # lengths 4, 7, 4, 5, 4 (+ the template)
    greedy = T.complete(model, problems, n_samples=2, temperature=0.0, max_new_tokens=6)
    alone = [_greedy_alone(model, ids, 6) for ids in prompts]
    assert [[c.response_ids for c in row] for row in greedy] == [[a, a] for a in alone]
    assert [row[0].finished for row in greedy] == [a[-1:] == [TOK.eot_id] for a in alone]
    assert any(a[-1:] == [TOK.eot_id] for a in alone) and not all(a[-1:] == [TOK.eot_id] for a in alone)
    assert len({tuple(a) for a in alone}) >= 3  # different prompts answer differently: a swap would show
    assert [row[0].text for row in greedy] == [TOK.decode(a[:-1] if a[-1:] == [TOK.eot_id] else a) for a in alone]
    # sampled: a prompt's samples do not depend on which other lengths are in the list
    full = T.complete(model, problems, n_samples=3, temperature=1.0, seed=0, max_new_tokens=6)
    samples = [[c.response_ids for c in row] for row in full]
    fours = T.complete(model, [problems[0], problems[2], problems[4]], n_samples=3, temperature=1.0, seed=0,
                       max_new_tokens=6)
    assert [[c.response_ids for c in row] for row in fours] == [samples[0], samples[2], samples[4]]
    for i in (1, 3):  # the only prompt of its length
        alone_sampled = T.complete(model, [problems[i]], n_samples=3, temperature=1.0, seed=0, max_new_tokens=6)
        assert [c.response_ids for c in alone_sampled[0]] == samples[i]
    assert len({tuple(x) for row in samples for x in row}) == 15  # every sample differs
    reseeded = T.complete(model, problems, n_samples=3, temperature=1.0, seed=1, max_new_tokens=6)
    assert [[c.response_ids for c in row] for row in reseeded] != samples


def test_completion_batch_masks_the_response():
    c = T.Completion(T.Problem(3, 4), "7", True, [1, 2, 3], [55, TOK.eot_id])
    ids, mask = T.completion_batch([c], TOK.pad_id)
    assert ids.tolist() == [[1, 2, 3, 55, TOK.eot_id]] and mask.tolist() == [[False, False, False, True, True]]
    assert c.correct and c.reward == 1.0 and not c.verbose  # 55 is the byte of "7"
    c = T.Completion(T.Problem(3, 4), "7\n3+4=7", False, [1], TOK.encode("7\n3+4=7"))
    assert not c.correct and c.verbose  # unfinished


class _ChatStub(torch.nn.Module):
    """A 'model' whose greedy chat responses are known: responses[question] = (text, finished).
    It reads the question back from the chat prompt it is given; an unfinished response fills
    the token limit without <|eot|>, and finished rows are padded with <|eot|> as generate does."""

    def __init__(self, responses):
        super().__init__()
        self.responses = responses

    def generate(self, ids, max_new_tokens, temperature=0.0, seed=None, stop_tokens=None):
        assert temperature == 0.0 and list(stop_tokens) == [TOK.eot_id]
        news = []
        for row in ids.tolist():
            prompt = TOK.decode(row)
            question = prompt.split("user<|header_end|>\n\n")[1].split("<|eot|>")[0]
            assert prompt == T.chat_prompt(question)
            text, finished = self.responses[question]
            new = TOK.encode(text) + [TOK.eot_id] if finished else TOK.encode(text.ljust(max_new_tokens))
            assert len(new) <= max_new_tokens
            news.append(new)
        width = max(len(n) for n in news)
        return torch.cat([ids, torch.tensor([n + [TOK.eot_id] * (width - len(n)) for n in news])], 1)


def test_evaluate_chat_reports_per_level():
    responses = {"3+4=": ("7", True),  # level 1: right
                 "15+16=": ("31", True),  # level 3: right
                 "2+5=": ("8", True),  # level 1: wrong
                 "27+14=": ("41 41", True),  # level 3: right, verbose
                 "1+1=": ("2\n1+1=2", True),  # level 1: right, verbose
                 "4+4=": ("8", False),  # level 1: the right number, but never ended: wrong, not verbose
                 "38+45=": ("84\n38+45=83", True)}  # level 3: wrong (the first number counts), verbose
    problems = [T.Problem(*map(int, q[:-1].split("+"))) for q in responses]
    assert [p.level for p in problems] == [1, 3, 1, 3, 1, 1, 3]
    ev = T.evaluate_chat(_ChatStub(responses), problems)
    assert ev.pass_rate == {1: 2 / 4, 3: 2 / 3}
    assert ev.verbose_rate == {1: 1 / 4, 3: 2 / 3}
    assert ev.accuracy == pytest.approx(4 / 7) and ev.verbose == pytest.approx(3 / 7)
    assert [c.problem for c in ev.completions] == problems
    assert [c.text for c in ev.completions] == ["7", "31", "8", "41 41", "2\n1+1=2", "8" + " " * (T.MAX_NEW_TOKENS - 1),
                                                 "84\n38+45=83"]
    assert [c.finished for c in ev.completions] == [True] * 5 + [False, True]
    assert [c.correct for c in ev.completions] == [True, True, False, True, True, False, False]
    assert ev.summary() == {"pass_rate": ev.pass_rate, "verbose_rate": ev.verbose_rate, "accuracy": ev.accuracy,
                            "verbose": ev.verbose}
    # a real model: every problem answered, every level reported
    ev = T.evaluate_chat(small_model(), T.make_problems(12, seed=0))
    assert set(ev.pass_rate) == set(T.LEVELS) and len(ev.completions) == 12


def test_pass_at_k():
    assert T.pass_at_k(4, 0, 2) == 0.0 and T.pass_at_k(4, 4, 1) == 1.0
    assert T.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert T.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_bad_problem_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"levels=\(\): must name at least one difficulty level in 1..6"):
        T.make_problems(4, seed=0, levels=())  # it used to divide by zero
    with pytest.raises(ValueError, match=r"levels=\(1, 2.5\): 2.5 is not a difficulty level"):
        T.make_problems(4, seed=0, levels=(1, 2.5))
    with pytest.raises(TypeError, match="level=2.5: must be an integer in 1..6"):
        T.problem_at_level(random.Random(0), 2.5)  # no carry count matches: it searched 100,000 times
    with pytest.raises(ValueError, match="n=-1: must be a non-negative integer"):
        T.make_problems(-1, seed=0)
    with pytest.raises(ValueError, match=r"pass_at_k\(n=4, c=0, k=8\): needs c <= n .* and k <= n"):
        T.pass_at_k(4, 0, 8)  # it answered 1.0 with no correct sample
    model = small_model()
    with pytest.raises(ValueError, match="problems is empty"):  # an accuracy of nothing
        T.evaluate_chat(model, [])
    with pytest.raises(TypeError, match="model must be a Module, got Llama4Config"):
        T.complete(T.model_config(), [T.Problem(3, 4)])
    with pytest.raises(TypeError, match=r"problems\[1\] is a tuple: expected Problem items"):
        T.complete(model, [T.Problem(3, 4), (3, 4)])
    # found by an audit: a negative operand looped forever in count_carries; the raw evaluation read
    # a generator twice (an empty result) and took strings; chat_share out of [0, 1] named n_chars
    with pytest.raises(ValueError, match="Problem.a=-5: must be a non-negative integer"):
        T.Problem(-5, 17)
    with pytest.raises(ValueError, match="b=-1: must be a non-negative integer"):
        T.count_carries(3, -1)
    problems = [T.Problem(3, 4), T.Problem(12, 9)]
    assert T.evaluate_raw(model, (p for p in problems)) == T.evaluate_raw(model, problems)
    assert set(T.evaluate_raw(model, problems)) == {p.level for p in problems}
    with pytest.raises(ValueError, match="problems is empty"):
        T.evaluate_raw(model, [])
    with pytest.raises(TypeError, match=r"problems\[0\] is a str: expected Problem items"):
        T.complete_raw(model, ["3+4="])
    for share in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"chat_share={share}: must be a finite number in \[0, 1\]"):
            T.pretraining_stream(n_chars=1000, chat_share=share)
    with pytest.raises(TypeError, match="tokenizer must be a ByteTokenizer, got str"):
        T.pretraining_stream(n_chars=1000, tokenizer="x")


def test_pretraining_stream_mixes_raw_lines_and_dialogues():
    ids = T.pretraining_stream(n_chars=20_000, seed=0, chat_share=0.3)
    text = TOK.decode(ids.tolist())
    docs = [d for d in text.split("<|end_of_text|>") if d]
    chats = [d for d in docs if d.startswith("<|begin_of_text|>")]
    raw = [d for d in docs if not d.startswith("<|begin_of_text|>")]
    assert chats and raw and all("<|header_start|>" not in d for d in raw)
    share = sum(len(TOK.encode(d)) + 1 for d in chats) / len(ids)
    assert 0.2 < share < 0.4
    answers = [d.split("assistant<|header_end|>\n\n")[1] for d in chats]
    assert all(a.endswith("<|eot|>") and a[: -len("<|eot|>")].isdigit() for a in answers)  # concise answers only
    assert torch.equal(ids, T.pretraining_stream(n_chars=20_000, seed=0, chat_share=0.3))


def test_model_config_fits_a_chat_sequence_in_one_chunk():
    cfg = T.model_config().text
    longest = len(T.encode_chat(TOK, T.Problem(999, 999), T.format_response(T.Problem(999, 999), "verbose"))[0])
    assert longest <= cfg.attention_chunk_size
    assert T.MAX_NEW_TOKENS >= len(T.format_response(T.Problem(999, 999), "verbose")) + 1


# ------------------------------------------------------------------------------ figures (viz.posttrain)
def _rl_history():
    from minillama4.train.rl import RLHistory

    h = RLHistory(step=[0, 1, 2], reward=[0.2, 0.4, 0.5], frac_filtered=[0.5, 0.25, 0.0], kl=[0.0, 0.01, float("nan")],
                  active_levels=[[3], [3, 4], [4]], level_reward=[{3: 0.2}, {3: 0.5, 4: 0.1}, {"4": 0.5}],
                  probe={1: 1.0, 2: 0.95, 3: 0.4}, eval_step=[-1, 2], eval_accuracy=[0.3, 0.5])
    return h


def test_pass_rate_and_pruning_figures():
    from minillama4.viz import posttrain as pv

    fig = pv.pass_rate_by_level({"base (raw a+b=)": {1: 1.0, 2: 0.5}, "SFT": {"1": 1.0, "2": 0.75}},
                                counts={1: 4, 2: 4})
    assert [t.name for t in fig.data] == ["base (raw a+b=)", "SFT"] and list(fig.data[1].y) == [1.0, 0.75]
    with pytest.raises(ValueError, match="rates is empty"):
        pv.pass_rate_by_level({})
    with pytest.raises(TypeError, match=r"rates\['SFT'\] must be a Mapping, got list"):
        pv.pass_rate_by_level({"SFT": [1.0, 0.75]})
    fig = pv.pruning_figure([0.9, 0.1, 0.5, 0.8], [1, 3, 2, 1], drop_fraction=0.5)
    kept, dropped = fig.data[-2], fig.data[-1]
    assert list(kept.x) == ["1", "2", "3"] and list(kept.y) == [0, 1, 1] and list(dropped.y) == [2, 0, 0]
    assert "50%" in fig.layout.title.text


def test_stage_curves_accept_histories_and_their_json():
    import json

    from minillama4.train.dpo import DPOHistory
    from minillama4.train.sft import SFTHistory
    from minillama4.viz import posttrain as pv

    rl_h = _rl_history()
    for h in (rl_h, json.loads(json.dumps(rl_h.to_dict()))):
        fig = pv.rl_curves(h)
        assert len(fig.data) == 2 + 2 + 2  # reward raw + smoothed, levels 3 and 4, filtered, KL
        assert pv.curriculum_figure(h).data[0].z.shape == (4, 3)
    assert pv.rl_variants_figure({"G=8": rl_h}).data[0].name == "G=8: 30.0% -> 50.0%"
    sft_h = SFTHistory(step=[0, 1], loss=[2.0, 1.0], eval_step=[1], eval_accuracy=[0.5], n_examples=64)
    assert "64 examples, 2 steps" in pv.sft_comparison({"hard half": sft_h}).data[0].name
    assert list(pv.sft_variants_figure({"0.5": sft_h, "0.0": sft_h}).data[0].x) == ["0%", "50%"]
    dpo_h = DPOHistory(step=[0], margin=[0.1], eval_step=[-1, 0], eval_margin=[0.0, 0.2], eval_accuracy=[0.0, 0.9],
                       eval_preference=[0.6, 0.8], eval_margin_by_kind=[{"wrong": 0.0}, {"wrong": 0.3}])
    assert len(pv.dpo_curves(dpo_h).data) == 5
    fig = pv.dpo_variants_figure({"0.1": {"history": dpo_h, "accuracy": 0.5, "verbose": 0.1}})
    assert list(fig.data[0].y) == [0.2]
    assert list(pv.smooth([1.0, float("nan"), 3.0], 2)) == [1.0, 1.0, 3.0]


def test_completions_table_colours_by_correctness():
    from minillama4.viz import posttrain as pv

    fig = pv.completions_table(["3+4="], {"SFT": ["7"], "RL": ["8\n3+4=8"]}, ["7"])
    cells = fig.data[0].cells
    assert list(cells.values[2]) == ["7"] and cells.fill.color[2][0] != cells.fill.color[3][0]


def test_variant_explorer_redraws_on_change():
    import plotly.graph_objects as go

    from minillama4.viz import posttrain as pv

    calls = []

    def build(frac, kind):
        calls.append((frac, kind))
        return go.Figure(layout=dict(title=f"{frac} {kind}"))

    ex = pv.variant_explorer({"frac": [0.0, 0.5], "kind": ["a", "b"]}, build, note=lambda frac, kind: f"<b>{frac}</b>")
    assert calls == [(0.0, "a")] and ex.text.value == "<b>0.0</b>"
    ex.controls["frac"].value = 0.5
    ex.controls["kind"].value = "b"
    assert calls[-1] == (0.5, "b") and ex.figure.layout.title.text == "0.5 b"
    assert len(ex.output.outputs) == 1
    # bad options or a build that is not a figure function are named, not an IndexError or AttributeError
    with pytest.raises(ValueError, match="options is empty"):
        pv.variant_explorer({}, build)
    with pytest.raises(ValueError, match=r"options\['frac'\] is empty"):
        pv.variant_explorer({"frac": []}, build)
    with pytest.raises(TypeError, match=r"options\['kind'\] must be a list of the values"):  # not "a", "b"
        pv.variant_explorer({"frac": [0.0], "kind": "ab"}, build)
    ex = pv.variant_explorer({"frac": np.array([0.0, 0.5]), "kind": {"a": 1, "b": 2}.keys()}, build)
    assert list(ex.controls["frac"].options) == [0.0, 0.5] and list(ex.controls["kind"].options) == ["a", "b"]
    with pytest.raises(TypeError, match="build and note must be functions"):
        pv.variant_explorer({"frac": [0.0]}, "build")
    with pytest.raises(TypeError, match=r"build\(...\)'s result must be a Figure, got NoneType"):
        pv.variant_explorer({"frac": [0.0]}, lambda frac: None)


# ------------------------------------------------------------------------------ the cached pipeline of notebook 07
CACHE = __import__("pathlib").Path(__file__).resolve().parent.parent / "notebooks" / "data" / "07_post_training"


def test_rounding_saving_and_loading_a_stage(tmp_path):
    model = small_model()
    T.round_to_bf16(model)
    T.save_stage(model, tmp_path / "stage")
    loaded = T.load_stage(tmp_path / "stage")
    assert model.dtype == torch.float32 and loaded.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert T._rounded({"a": [0.123456789, float("nan")], "b": (1, "x")}) == {"a": [0.12346, None], "b": [1, "x"]}
    with pytest.raises(ValueError, match="start_at"):
        T.build_course_cache(tmp_path, start_at="ppo")


@pytest.mark.parametrize("field, value, message", [
    ("rl_kl_coef", float("nan"), r"PipelineConfig.rl_kl_coef=nan: must be a finite number >= 0"),
    ("rl_group_size", 1, r"PipelineConfig.rl_group_size=1: GRPO needs >= 2 samples per prompt"),
    ("rl_variants", ((1, 0.05),), r"PipelineConfig.rl_variants\[0\]\[0\]=1: GRPO needs >= 2 samples per prompt"),
    ("rl_variants", ((4,),), r"PipelineConfig.rl_variants=\(\(4,\),\): expected \(group size, KL weight\) pairs"),
    ("rl_samples_per_step", 4, r"PipelineConfig.rl_samples_per_step=4: must be at least every group size \(8\)"),
    ("drop_fraction", 1.0, r"PipelineConfig.drop_fraction=1.0: must be a finite number in \[0, 1\)"),
    ("drop_variants", (), r"PipelineConfig.drop_variants=\(\): must be a non-empty tuple"),
    ("verbose_fraction", 2.0, r"PipelineConfig.verbose_fraction=2.0: must be a finite number in \[0, 1\]"),
    ("judge_format", "xml", r"PipelineConfig.judge_format='xml': expected one of \('chat', 'raw'\)"),
    ("dpo_samples", 1, r"PipelineConfig.dpo_samples=1: must be an integer >= 2"),
    ("dpo_betas", (0.1, -1.0), r"PipelineConfig.dpo_betas\[1\]=-1.0: must be a finite number > 0"),
    ("sft_epochs", 0, r"PipelineConfig.sft_epochs=0: must be a finite number > 0"),
    ("pretrain_steps", 2.5, r"PipelineConfig.pretrain_steps=2.5: must be a positive integer"),
])
def test_pipeline_config_refuses_bad_fields(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        T.PipelineConfig(**{field: value})


def test_build_course_cache_refuses_before_writing(tmp_path):
    from minillama4.train.sft import SFTConfig

    cfg = T.PipelineConfig()
    cfg.rl_kl_coef = float("nan")  # set after the config was built: checked again before any work
    with pytest.raises(ValueError, match="PipelineConfig.rl_kl_coef=nan"):
        T.build_course_cache(tmp_path / "cache", cfg)
    with pytest.raises(TypeError, match="cfg must be a PipelineConfig, got SFTConfig"):
        T.build_course_cache(tmp_path / "cache", SFTConfig())
    with pytest.raises(ValueError, match=r"start_at='rl' reuses the cached stages before it, but .*results.json"):
        T.build_course_cache(tmp_path / "cache", start_at="rl")  # nothing cached there to reuse
    assert not (tmp_path / "cache").exists()


def test_eval_problems_are_fixed():
    problems = T.eval_problems()
    assert len(problems) == 600 and problems == T.eval_problems()
    assert {lv: len(v) for lv, v in T.by_level(problems).items()} == {lv: 100 for lv in T.LEVELS}


@pytest.mark.skipif(not (CACHE / "results.json").exists(), reason="notebook 07's cache is not there")
def test_notebook_cache_matches_the_pipeline_config():
    import dataclasses
    import json

    results = T.load_results(CACHE)
    expected = json.loads(json.dumps(dataclasses.asdict(T.PipelineConfig())))  # tuples as lists, like the file
    assert results["config"] == expected  # rebuild the cache after changing PipelineConfig
    for stage in T.STAGES:
        model = T.load_stage(CACHE / stage)
        assert model.config.text == T.model_config().text
    assert set(results["sft"]["variants"]) == {str(f) for f in T.PipelineConfig().drop_variants}
    assert results["rl"]["main"] in results["rl"]["variants"] and results["dpo"]["main"] in results["dpo"]["variants"]
