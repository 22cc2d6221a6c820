"""minillama4.longctx (retrieval task, variants, training/evaluation, attention read-outs, KV-cache
arithmetic) and minillama4.viz.longctx (figures and the KV-memory explorer). Small, seeded, fast."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from helpers import small_text

import minillama4 as ml4
from minillama4 import longctx as lc
from minillama4 import plan
from minillama4.attention import nope_temperature
from minillama4.viz import longctx as lviz
from minillama4.viz.widgets import PLOTLY_MIME

TOK = ml4.ByteTokenizer()


# ------------------------------------------------------------------------------ KV-cache memory
def total(cfg, n, ring=True, **kw):
    return lc.kv_cache_memory(cfg, n, ring_buffer=ring, **kw).total


def test_scout_kv_cache_is_192_kib_per_token_with_a_full_cache():
    scout = ml4.configs.scout()
    assert lc.kv_bytes_per_token_per_layer(scout) == 2 * 8 * 128 * 2 == 4096
    assert total(scout, 1, ring=False) == 48 * 2 * 8 * 128 * 2 == 192 * 1024
    assert total(scout, 131072, ring=False) == 24 * lc.GIB


def test_scout_ring_buffer_keeps_one_chunk_in_36_chunked_layers():
    scout = ml4.configs.scout()
    for n in (131072, 1048576, 10485760):
        mem = lc.kv_cache_memory(scout, n, ring_buffer=True)
        assert mem.nope_bytes == 12 * n * 4096  # layers 3, 7, ..., 47 keep every position
        assert mem.rope_bytes == 36 * 8192 * 4096  # the other 36 keep one chunk of 8,192
        for ring in (True, False):  # the package's memory planner agrees
            assert total(scout, n, ring) == plan.kv_cache_bytes(scout.text, n, ring=ring)
    assert total(scout, 131072) == int(7.125 * lc.GIB)
    assert total(scout, 10485760, ring=False) == 1920 * lc.GIB
    rows = lc.kv_cache_table(scout)
    assert [r["context"] for r in rows] == [131072, 1048576, 10485760]
    savings = [r["saving"] for r in rows]
    assert savings == sorted(savings) and 3.3 < savings[0] and savings[-1] < 4  # tends to 48 / 12 = 4
    # inside one chunk the ring buffer holds everything: nothing saved
    assert total(scout, 8192) == total(scout, 8192, ring=False)


def test_kv_cache_without_chunked_layers_saves_nothing():
    for cfg in (small_text(attention_chunk_size=None), small_text(no_rope_layer_interval=1)):
        assert total(cfg, 1000) == total(cfg, 1000, ring=False)
    cfg = small_text()  # 4 layers, layer 3 NoPE, chunk 8, 2 kv heads of 16, fp8 and a batch of 3
    assert total(cfg, 100, bytes_per_value=1, batch=3) == 3 * 2 * 2 * 16 * (100 + 3 * 8)
    assert lc.kv_cache_memory(cfg, 100).per_token == pytest.approx(2 * 2 * 16 * 2 * (100 + 24) / 100)


@pytest.mark.parametrize("ring", [True, False])
def test_arithmetic_matches_the_real_cache(ring):
    model = ml4.Llama4Text.random(lc.variant_config("irope", chunk=8), seed=0)
    cache = model.new_cache(2, 64, ring=ring)
    assert cache.nbytes() == total(model.cfg, 64, ring, bytes_per_value=4, batch=2)  # fp32 model


def test_kv_cache_refuses_empty_and_negative_contexts():
    for bad in (0, -5):  # 0 divided by zero in per_token, -5 gave a negative byte count
        with pytest.raises(ValueError, match=f"context={bad}: must be a positive integer"):
            lc.kv_cache_memory(small_text(), bad)
    with pytest.raises(TypeError, match="context=2.5"):
        lc.kv_cache_memory(small_text(), 2.5)
    with pytest.raises(ValueError, match="bytes_per_value=0"):
        lc.kv_cache_memory(small_text(), 10, bytes_per_value=0)
    with pytest.raises(ValueError, match="max_context=0"):
        lviz.kv_cache_figure(small_text(), max_context=0)


def test_format_bytes():
    assert lc.format_bytes(4096) == "4 KiB"
    assert lc.format_bytes(7.125 * lc.GIB) == "7.125 GiB"
    assert lc.format_bytes(1920 * lc.GIB) == "1.875 TiB"
    assert lc.format_bytes(100) == "100 B"


# ------------------------------------------------------------------------------ retrieval tasks
def test_passkey_batch_structure():
    task = lc.PasskeyTask()
    b = task.batch(32, 64, seed=7)
    assert b.ids.shape == (64, 32) and b.answers.shape == b.key_pos.shape == b.value_pos.shape == (64, 1)
    assert b.answer_pos.tolist() == [31] and (b.ids[:, 0] == TOK.bos_id).all()
    assert torch.equal(b.ids, task.batch(32, 64, seed=7).ids)
    assert not torch.equal(b.ids, task.batch(32, 64, seed=8).ids)
    texts = [TOK.decode(row[1:]) for row in b.ids]
    assert all(t.endswith("?") and t.count("#") == 1 and len(t) == 31 for t in texts)
    for row, text in enumerate(texts):
        assert text[text.index("#") + 1] == TOK.decode([b.answers[row, 0]]) in task.values
        assert b.ids[row, b.key_pos[row, 0]] == TOK.encode("#")[0]
        assert b.value_pos[row, 0] == b.key_pos[row, 0] + 1
    hay = "".join(t[:-1].replace("#", "") for t in texts)
    assert set(hay) <= set(task.filler) and sum(c.isdigit() for c in hay) > 64 * 5  # about 8 distractors a row
    where = task.batch(32, 2000, seed=1).key_pos
    assert where.min() == 1 and where.max() == 29  # the marker can follow <bos> or sit right before the last digit
    with pytest.raises(ValueError, match="too short"):
        task.batch(3, 1)
    picked = b.select(b.answers[:, 0] == TOK.encode("7")[0])
    assert 0 < len(picked.ids) < 64 and (picked.answers == TOK.encode("7")[0]).all()
    assert torch.equal(picked.ids[:, picked.answer_pos[0]], torch.full((len(picked.ids),), TOK.encode("?")[0]))
    split = lc.crosses_chunk(b, 8)
    assert torch.equal(split[:, 0], b.key_pos[:, 0] % 8 == 7)  # "#" last in its chunk, the digit first in the next
    assert 0 < split.sum() < 64 and not lc.crosses_chunk(b, 1024).any()


def test_key_value_task_lengths_and_structure():
    task = lc.KeyValueTask()
    assert [task.pairs_for(n) for n in (36, 72, 144)] == [8, 20, 44]
    with pytest.raises(ValueError, match="seq_len=37"):
        task.pairs_for(37)
    assert lc.KeyValueTask(sep="=", n_queries=1).pairs_for(1 + 4 * 5 + 2) == 5
    b = task.batch(72, 16, seed=7)
    assert b.ids.shape == (16, 72) and b.answers.shape == (16, 4)
    assert b.answer_pos.tolist() == [62, 65, 68, 71]
    assert torch.equal(b.ids, task.batch(72, 16, seed=7).ids)
    for row in range(16):
        text = TOK.decode(b.ids[row, 1:])
        pairs, queries = text[:60].split(" ")[:-1], text[60:].split("?")[1:]
        assert len(pairs) == 20 and all(p[0] in task.keys and p[1] in task.values for p in pairs)
        keys = [p[0] for p in pairs]
        asked = [q[0] for q in queries]
        assert len(set(asked)) == 4 and all(keys.count(k) == 1 for k in asked)  # each asked key once
        for j, k in enumerate(asked):
            value = pairs[keys.index(k)][1]
            assert TOK.decode([b.answers[row, j]]) == value
            assert TOK.decode([b.ids[row, b.key_pos[row, j]]]) == k
            assert TOK.decode([b.ids[row, b.value_pos[row, j]]]) == value
            assert TOK.decode([b.ids[row, b.answer_pos[j]]]) == k  # the answer follows "?k"
        assert [q[1:] for q in queries[:-1]] == [TOK.decode([a]) for a in b.answers[row, :3]]


# ------------------------------------------------------------------------------ variants
def test_variant_configs():
    rope, irope = lc.variant_config("all_rope"), lc.variant_config("irope", chunk=8, floor_scale=32)
    assert rope.text.no_rope_layers == [1, 1, 1, 1] and rope.text.attention_chunk_size is None
    assert irope.text.no_rope_layers == [1, 1, 1, 0] and irope.text.attention_chunk_size == 8
    assert not rope.text.attn_temperature_tuning and not irope.text.attn_temperature_tuning
    assert irope.text.floor_scale == 32 and irope.text.use_qk_norm
    with pytest.raises(ValueError, match="variant"):
        lc.variant_config("nope")


def test_with_text_config_switches_the_temperature_on_nope_layers_only():
    ids = lc.PasskeyTask().batch(32, 2, seed=0).ids
    with torch.no_grad():
        for variant, changes in (("irope", True), ("all_rope", False)):
            model = ml4.Llama4Text.random(lc.variant_config(variant, floor_scale=8), seed=0)
            hot = lc.with_text_config(model, attn_temperature_tuning=True, attn_scale=1.0)
            assert hot.cfg.attn_temperature_tuning and not model.cfg.attn_temperature_tuning
            base, warm = model(ids), hot(ids)
            assert torch.equal(base[:, :6], warm[:, :6])  # s(p) = 1 for p < floor_scale - 1
            assert bool((base - warm).abs().max() > 1e-4) == changes  # all-RoPE has no NoPE query
    with pytest.raises(ValueError, match="layout"):
        lc.with_text_config(model, no_rope_layers=[1, 1, 1, 0])


# ------------------------------------------------------------------------------ attention read-outs
@pytest.mark.parametrize("layer", [0, 3])
def test_attention_probs_reproduce_the_layer(layer):
    cfg = small_text(moe_layers=[])  # chunk 8; layer 3 NoPE with temperature, floor_scale 2
    model = ml4.Llama4Text.random(cfg, seed=2)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    probs = lc.attention_probs(model, ids, layer)
    assert probs.shape == (2, 4, 20, 20)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 20))
    pos = torch.arange(20)
    allowed = (pos[None] <= pos[:, None]) & ((pos[None] // 8 == pos[:, None] // 8) | (layer == 3))
    assert (probs[:, :, ~allowed] == 0).all()
    rows = torch.tensor([3, 17, 19])
    torch.testing.assert_close(lc.attention_probs(model, ids, layer, rows), probs[:, :, rows])
    x = lc.layer_input(model, ids, layer)
    assert x.shape == (2, 20, 64)
    torch.testing.assert_close(lc.attention_probs(model, ids, layer, x=x), probs)
    attn = model.model.layers[layer].self_attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    v = attn.v_proj(seen["x"]).view(2, 20, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)  # [b, h, s, dh]
    out = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 20, 64))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)


def test_needle_attention_shape():
    model = ml4.Llama4Text.random(lc.variant_config("irope"), seed=0)
    batch = lc.KeyValueTask().batch(36, 3, seed=0)
    w = lc.needle_attention(model, batch, 3)
    assert w.shape == (3, 4, 4) and (w >= 0).all() and (w <= 1).all()
    probs = lc.attention_probs(model, batch.ids, 3)
    assert w[1, 0, 2] == probs[1, 0, batch.answer_pos[2], batch.value_pos[1, 2]]
    passkey = lc.PasskeyTask().batch(32, 2, seed=0)
    assert lc.needle_attention(model, passkey, 3).shape == (2, 4, 1)
    by_len = lc.needle_attention_by_length(model, {36: batch, 32: passkey}, 3)
    assert list(by_len) == [36, 32] and by_len[36].shape == (4,)
    torch.testing.assert_close(by_len[36], w.mean(dim=(0, 2)))
    # the layer input is shared by temperature settings: reusing it gives the same read-out
    hot = lc.with_text_config(model, attn_temperature_tuning=True, floor_scale=4, attn_scale=1.0)
    inputs = {36: lc.layer_input(model, batch.ids, 3)}
    reused = lc.needle_attention_by_length(hot, {36: batch}, 3, inputs)[36]
    torch.testing.assert_close(reused, lc.needle_attention_by_length(hot, {36: batch}, 3)[36])
    assert not torch.allclose(reused, by_len[36])


def test_readouts_refuse_layers_the_model_does_not_have():
    model = ml4.Llama4Text.random(lc.variant_config("irope"), seed=0)
    batch = lc.PasskeyTask().batch(32, 2, seed=0)
    with pytest.raises(ValueError, match="layer=99: the model has 4 layers, 0 to 3"):
        lc.needle_attention(model, batch, 99)
    with pytest.raises(ValueError, match="layer=-5"):
        lc.layer_input(model, batch.ids, -5)
    with pytest.raises(TypeError, match="layer=1.0"):
        lc.attention_probs(model, batch.ids, 1.0)
    torch.testing.assert_close(lc.attention_probs(model, batch.ids, -1), lc.attention_probs(model, batch.ids, 3))


def test_temperature_formula_in_the_readout():
    """The NoPE query scale used by attention_probs is the documented formula."""
    p = torch.arange(200)
    s = nope_temperature(p, 32, 0.1)
    expected = 1 + 0.1 * torch.log(torch.floor((p.double() + 1) / 32) + 1)
    torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=1e-6)
    assert (s[:31] == 1).all() and s[31] > 1


# ------------------------------------------------------------------------------ training and evaluation
FAST = lc.ExperimentConfig(seeds=(0,), train_len=28, eval_lens=(28, 56), chunk=8, floor_scale=28,
                           attn_scales=(0.0, 0.5), steps=25, batch_size=8, warmup=5, eval_examples=24)
SMALL_TASK = lc.PasskeyTask()


def test_training_learns_the_answer_format_and_is_seeded():
    model = ml4.Llama4Text.random(lc.variant_config("irope"), seed=0)
    hist = lc.train_retrieval(model, FAST, seed=0, task=SMALL_TASK)
    assert len(hist["loss"]) == len(hist["accuracy"]) == 25
    # from about log(272) = 5.6 (any byte) to about log(10) = 2.3 (some digit) within 25 steps
    assert np.mean(hist["loss"][:3]) > 4.5 and np.mean(hist["loss"][-5:]) < 3.2
    # seeded: the same first steps again (warmup makes the first 5 learning rates independent of `steps`)
    again = lc.train_retrieval(ml4.Llama4Text.random(lc.variant_config("irope"), seed=0),
                               dataclasses.replace(FAST, steps=5), 0, SMALL_TASK)
    assert again["loss"] == hist["loss"][:5]


def test_run_experiment_results_and_json(tmp_path):
    cfg = dataclasses.replace(FAST, steps=10)
    res = lc.run_experiment(cfg, SMALL_TASK, checkpoint_dir=tmp_path / "ckpt", progress=False)
    path = tmp_path / "results.json"
    lc.save_results(res, path)
    assert lc.load_results(path) == json.loads(json.dumps(res))
    assert lc.load_results(path)["config"] == lc.config_dict(cfg) != lc.config_dict(FAST)
    assert set(res["runs"]) == {"all_rope", "irope"} and res["config"]["train_len"] == 28
    assert set(res["runs"]["irope"]["0"]["accuracy"]) == {"0", "0.5"}
    assert set(res["runs"]["all_rope"]["0"]["accuracy"]) == {"0"}  # no NoPE layer: nothing to tune
    assert len(res["runs"]["irope"]["0"]["train_loss"]) == 1  # one 25-step window over 10 steps
    rows = lc.accuracy_table(res)
    assert len(rows) == 2 * 2 + 2
    for r in rows:  # one seed: the mean is that seed's accuracy, read from the results
        acc = res["runs"][r["variant"]]["0"]["accuracy"][f"{r['attn_scale']:g}"][str(r["seq_len"])]
        assert r["seeds"] == [acc] and r["mean"] == acc
    assert {(r["variant"], r["attn_scale"], r["seq_len"]) for r in rows} == {
        ("all_rope", 0.0, 28), ("all_rope", 0.0, 56), ("irope", 0.0, 28), ("irope", 0.0, 56),
        ("irope", 0.5, 28), ("irope", 0.5, 56)}
    loaded = ml4.from_pretrained(tmp_path / "ckpt" / "irope")
    assert loaded.cfg.attention_chunk_size == 8 and loaded.cfg.no_rope_layers == [1, 1, 1, 0]
    acc = lc.retrieval_accuracy(loaded, 28, cfg.eval_examples, cfg.eval_seed, SMALL_TASK)
    assert acc == res["runs"]["irope"]["0"]["accuracy"]["0"]["28"]


def test_accuracy_table_averages_over_seeds():
    results = {"runs": {
        "irope": {"0": {"accuracy": {"0": {"28": 0.5, "56": 0.25}, "0.5": {"28": 1.0, "56": 0.75}}},
                  "1": {"accuracy": {"0": {"28": 0.75, "56": 0.0}, "0.5": {"28": 0.5, "56": 0.25}}}},
        "all_rope": {"0": {"accuracy": {"0": {"28": 1.0, "56": 0.5}}},
                     "1": {"accuracy": {"0": {"28": 0.0, "56": 0.25}}}}}}
    assert lc.accuracy_table(results) == [
        {"variant": "irope", "attn_scale": 0.0, "seq_len": 28, "mean": 0.625, "seeds": [0.5, 0.75]},
        {"variant": "irope", "attn_scale": 0.0, "seq_len": 56, "mean": 0.125, "seeds": [0.25, 0.0]},
        {"variant": "irope", "attn_scale": 0.5, "seq_len": 28, "mean": 0.75, "seeds": [1.0, 0.5]},
        {"variant": "irope", "attn_scale": 0.5, "seq_len": 56, "mean": 0.5, "seeds": [0.75, 0.25]},
        {"variant": "all_rope", "attn_scale": 0.0, "seq_len": 28, "mean": 0.5, "seeds": [1.0, 0.0]},
        {"variant": "all_rope", "attn_scale": 0.0, "seq_len": 56, "mean": 0.375, "seeds": [0.5, 0.25]}]


class _Retriever(torch.nn.Module):
    """A stub whose greedy answers are known. At every position it puts `logit` on one token (the
    rest 0): the passkey after "#", or for a key-value query "?k" the value stored after key k
    ("right"); "?" there instead ("wrong"); or nothing (all logits 0, "uniform"). `wrong_query`:
    the query (0-based, per row) answered with "?" anyway. `seen` records every true answer."""

    def __init__(self, mode="right", logit=30.0, wrong_query=None, only_below=None):
        super().__init__()
        self.mode, self.logit, self.wrong_query, self.only_below, self.seen = mode, logit, wrong_query, only_below, []

    def forward(self, ids):
        b, t = ids.shape
        logits = torch.zeros(b, t, TOK.vocab_size)
        if self.mode == "uniform":
            return logits
        mark, qmark = TOK.encode("#")[0], TOK.encode("?")[0]
        for r, row in enumerate(ids.tolist()):
            if mark in row:  # passkey: one answer, predicted at every position
                key = row[row.index(mark) + 1]
                self.seen.append(key)
                right = self.mode == "right" and (self.only_below is None or key < self.only_below)
                logits[r, :, key if right else qmark] = self.logit
                continue
            queries = [i for i in range(1, t) if row[i - 1] == qmark]
            for q, i in enumerate(queries):  # key-value: the value after the key's first (its only) pair
                value = row[row.index(row[i]) + 1]
                right = self.mode == "right" and q != self.wrong_query
                logits[r, i, value if right else qmark] = self.logit
        return logits


def test_retrieval_accuracy_and_answer_loss_with_known_answers():
    n = 20  # batches of 7, 7 and 6
    assert lc.retrieval_accuracy(_Retriever("right"), 28, n, seed=3, task=SMALL_TASK, batch_size=7) == 1.0
    assert lc.retrieval_accuracy(_Retriever("wrong"), 28, n, seed=3, task=SMALL_TASK, batch_size=7) == 0.0
    stub = _Retriever("right", only_below=TOK.encode("5")[0])  # right on passkeys 0-4 only
    acc = lc.retrieval_accuracy(stub, 28, n, seed=3, task=SMALL_TASK, batch_size=7)
    below = sum(k < TOK.encode("5")[0] for k in stub.seen)
    assert len(stub.seen) == n and 0 < below < n and acc == below / n
    kv = lc.KeyValueTask()  # 4 queries per example: every answer counts
    assert lc.retrieval_accuracy(_Retriever("right"), 36, 10, seed=0, task=kv) == 1.0
    assert lc.retrieval_accuracy(_Retriever("right", wrong_query=1), 36, 10, seed=0, task=kv) == 0.75
    # answer_loss by hand: all logits 0 -> log(vocab); logit L on the answer -> log(1 + (V - 1) e^-L)
    batch = kv.batch(36, 3, seed=0)
    loss, right = lc.answer_loss(_Retriever("uniform"), batch)
    assert float(loss) == pytest.approx(math.log(TOK.vocab_size)) and right.shape == (3, 4) and not right.any()
    loss, right = lc.answer_loss(_Retriever("right", logit=2.0), batch)
    assert float(loss) == pytest.approx(math.log(1 + (TOK.vocab_size - 1) * math.exp(-2.0)), rel=1e-6)
    assert right.all()
    loss, right = lc.answer_loss(_Retriever("right", logit=2.0, wrong_query=3), batch)
    assert right[:, :3].all() and not right[:, 3].any()
    assert float(loss) == pytest.approx(math.log(1 + (TOK.vocab_size - 1) * math.exp(-2.0)) * 3 / 4
                                        + (math.log(TOK.vocab_size - 1 + math.exp(2.0))) / 4, rel=1e-6)


def test_experiment_config_refuses_bad_fields():
    for changes, error, match in [({"variants": ("irope", "allrope")}, ValueError, r"variants\[1\]='allrope'"),
                                  ({"eval_examples": 0}, ValueError, "eval_examples=0"),
                                  ({"curve_every": 0}, ValueError, "curve_every=0"),
                                  ({"eval_lens": ()}, ValueError, r"eval_lens=\(\)"),
                                  ({"attn_scales": (0.0, float("nan"))}, ValueError, r"attn_scales\[1\]=nan"),
                                  ({"attn_scales": (0.0, 1e3)}, ValueError, r"attn_scales\[1\]=1000.0"),  # > 100
                                  ({"lr": 0}, ValueError, "lr=0"),
                                  ({"steps": 2.5}, TypeError, "steps=2.5")]:
        with pytest.raises(error, match=match):
            dataclasses.replace(FAST, **changes)


def test_run_experiment_checks_everything_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a model trained before every setting was checked")

    monkeypatch.setattr(lc, "train_variant", no_training)
    kv = dataclasses.replace(FAST, train_len=36, eval_lens=(36, 56))  # 56 tokens make no whole pairs
    with pytest.raises(ValueError, match="eval_lens: seq_len=56: needs 12 [+] 3 n tokens"):
        lc.run_experiment(kv, lc.KeyValueTask(), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        lc.run_experiment(FAST, SMALL_TASK, checkpoint_dir=tmp_path / "file", progress=False)
    with pytest.raises(TypeError, match="task must be a PasskeyTask or KeyValueTask"):
        lc.run_experiment(FAST, "passkey", progress=False)
    model = ml4.Llama4Text.random(lc.variant_config("irope"), seed=0)
    with pytest.raises(ValueError, match="n_examples=0"):
        lc.retrieval_accuracy(model, 28, n_examples=0)
    with pytest.raises(ValueError, match="^seq_len=3: too short"):
        lc.retrieval_accuracy(model, 3, n_examples=4)


def test_training_stops_at_a_nan_loss():
    model = ml4.Llama4Text.random(lc.variant_config("irope"), seed=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="step 0"):
        lc.train_retrieval(model, FAST, task=SMALL_TASK)
    for n, p in model.named_parameters():  # no update was made
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ figures and widget
def _fake_results():
    runs = {"all_rope": {"0": {"accuracy": {"0": {"32": 0.9, "64": 0.5}}, "train_accuracy": [0.2, 0.9]},
                         "1": {"accuracy": {"0": {"32": 0.7, "64": 0.3}}, "train_accuracy": [0.1, 0.8]}},
            "irope": {"0": {"accuracy": {"0": {"32": 0.8, "64": 0.6}, "0.1": {"32": 0.8, "64": 0.7}},
                            "train_accuracy": [0.3, 0.9]},
                      "1": {"accuracy": {"0": {"32": 0.6, "64": 0.4}, "0.1": {"32": 0.6, "64": 0.5}},
                            "train_accuracy": [0.3, 0.7]}}}
    return {"config": {"train_len": 32}, "task": {"values": "0123456789"}, "runs": runs, "curve_every": 50}


def test_extrapolation_and_training_figures():
    fig = lviz.extrapolation_figure(_fake_results())
    names = [t.name for t in fig.data]
    assert names == ["all-RoPE (full attention)", "iRoPE, no temperature", "iRoPE, temperature attn_scale 0.1"]
    assert list(fig.data[0].y) == pytest.approx([0.8, 0.4]) and list(fig.data[0].x) == [32, 64]
    assert list(fig.data[0].error_y.array) == pytest.approx([0.1, 0.1])
    assert list(fig.data[2].y) == pytest.approx([0.7, 0.6])
    assert fig.layout.shapes[0].x0 == 32 and fig.layout.xaxis.type == "log"  # training length: data units
    label = next(a for a in fig.layout.annotations if "training length" in a.text)
    assert label.x == pytest.approx(np.log10(32))  # annotations on a log axis take log10
    curves = lviz.training_curves(_fake_results())
    assert len(curves.data) == 4 and list(curves.data[0].x) == [50, 100]


def test_experiment_figures_refuse_empty_results():
    with pytest.raises(ValueError, match=r"results lacks \['config', 'task', 'runs'\]"):
        lviz.extrapolation_figure({})
    with pytest.raises(ValueError, match="no runs to show"):
        lviz.training_curves({**_fake_results(), "runs": {}})


def test_kv_cache_figure_marks_scout_contexts():
    fig = lviz.kv_cache_figure(ml4.configs.scout())
    full, ring = fig.data[0], fig.data[1]
    i = list(full.x).index(131072)
    assert full.y[i] == pytest.approx(24) and ring.y[i] == pytest.approx(7.125)
    labels = [t.text[0] for t in fig.data[2:]]
    assert labels == ["128K: 24 GiB", "1M: 192 GiB", "10M: 1.875 TiB"]


def test_attention_figures():
    fig = lviz.needle_attention_figure({"off": {32: 0.5, 64: 0.3}, "on": {32: 0.5, 64: 0.4}}, train_len=32,
                                       colours={"on": "red"})
    assert [t.name for t in fig.data] == ["off", "on", "1 / length (uniform)"]
    assert fig.data[1].line.color == "red" and fig.data[0].line.color != "red"
    assert fig.layout.yaxis.type != "log"
    assert lviz.needle_attention_figure({"a": {8: 0.5}}, log_y=True).layout.yaxis.type == "log"
    assert list(fig.data[2].y) == [1 / 32, 1 / 64]
    assert list(lviz.needle_attention_figure({"a": {32.0: 0.5, np.int64(64): 0.25}}).data[0].x) == [32.0, 64]
    # a bare list failed on .items(); lengths that are not positive integers drew 1 / length wrongly
    with pytest.raises(TypeError, match="weights must be a Mapping, got list"):
        lviz.needle_attention_figure([0.5, 0.3])
    with pytest.raises(ValueError, match="weights is empty"):
        lviz.needle_attention_figure({})
    with pytest.raises(TypeError, match=r"weights\['a'\] must be a Mapping, got list"):
        lviz.needle_attention_figure({"a": [0.5]})
    with pytest.raises(ValueError, match=r"weights\['a'\] has keys \['32'\]: expected sequence lengths"):
        lviz.needle_attention_figure({"a": {"32": 0.5}})
    row = lviz.attention_row_figure(torch.tensor([0.1, 0.6, 0.3]), ["a", "=", "3"], {"value": [2]})
    assert list(row.data[1].x) == [2] and list(row.data[1].y) == pytest.approx([0.3])
    with pytest.raises(ValueError, match="tokens"):
        lviz.attention_row_figure([0.5, 0.5], ["a"])


def test_kv_memory_explorer_follows_controls():
    ex = lviz.kv_memory_explorer(ml4.configs.scout())
    assert (ex.chunk.value, ex.interval.value, ex.context.value) == (8192, 4, 131072)
    assert ex.full.total == 24 * lc.GIB and ex.ring.total == int(7.125 * lc.GIB)
    assert "7.125 GiB" in ex.table.value and "192 KiB" in ex.table.value
    ex.interval.value = 0  # no NoPE layer: every layer chunked, the ring buffer is all there is
    assert ex.ring.total == 48 * 8192 * 4096
    ex.number_format.value = "fp8"
    assert ex.full.total == 12 * lc.GIB
    ex.interval.value, ex.chunk.value, ex.context.value = 1, 1024, 10485760  # every layer NoPE
    assert ex.ring.total == ex.full.total
    assert ex.output.outputs[0]["data"][PLOTLY_MIME]["layout"]["title"]["text"].startswith("KV cache")
    # gpu_gib draws its line (it was checked, then never passed on); None draws none
    lines = lambda e: [a["text"] for a in e.figure.layout.annotations if "GPU" in a["text"]]  # noqa: E731
    assert lines(ex) == ["one 80 GiB GPU"]
    assert lines(lviz.kv_memory_explorer(ml4.configs.scout(), gpu_gib=141)) == ["one 141 GiB GPU"]
    assert lines(lviz.kv_memory_explorer(ml4.configs.scout(), gpu_gib=None)) == []
