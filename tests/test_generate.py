"""KV-cache decoding equals the full forward (also across chunk boundaries), sampling options,
and clear errors for bad input."""

import pytest
import torch
from helpers import small_text

import minillama4 as ml4


@pytest.fixture(scope="module")
def model():
    return ml4.Llama4Text.random(small_text(num_experts_per_tok=2), seed=1)


@pytest.mark.parametrize("prefill", [1, 5, 8, 13])
def test_decode_matches_full_forward_past_chunk_boundaries(model, prefill):
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        steps = [model(ids[:, :prefill], cache=cache)]
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, 30)]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_of_full_forward(model):
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, 12)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(out[0, 3:], logits[0, 2:].argmax(-1))


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    prompt = [[5, 6, 7]]
    a = model.generate(prompt, 10, temperature=1.0, seed=3)
    b = model.generate(prompt, 10, temperature=1.0, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=1e-6, seed=4),
                       model.generate(prompt, 10))


def test_top_p_keeps_only_the_nucleus():
    from minillama4.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the rest is cut


def test_top_p_below_float32_range_still_keeps_the_most_likely_token(model):
    """top_p=1e-300 is 0 in float32: the nucleus must still hold the top token (it was emptied,
    and multinomial refused the all-zero distribution)."""
    from minillama4.generate import sample_next

    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, 1e-300, g)) for _ in range(50)} == {1}
    prompt = [[5, 6, 7]]
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=1e-300, seed=4),
                       model.generate(prompt, 10))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    """Frequencies of 4,000 draws match softmax(logits / T) (a chi-square bound far from the
    other temperature's distribution: T = 0.5 gives [.70 .26 .03 .00], T = 2 gives [.42 .33 .16 .09])."""
    from minillama4.generate import sample_next

    logits = torch.tensor([[2.0, 1.5, 0.5, -0.5]]).repeat(4000, 1)
    draws = sample_next(logits, temperature, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 4000
    expected = torch.softmax(logits[0].double() / temperature, -1)
    chi2 = 4000 * ((freq - expected) ** 2 / expected).sum()
    assert chi2 < 16.3, (freq, expected)  # p = 0.001 for 3 degrees of freedom


def test_a_finished_row_repeats_its_stop_token_while_the_others_go_on(model):
    prompt = torch.tensor([[5, 6, 7], [9, 10, 11]])
    free = model.generate(prompt, 10)
    stop = int(free[0, 4])  # row 0's second new token; row 1 must not produce it
    assert stop not in free[1, 3:].tolist()
    out = model.generate(prompt, 10, stop_tokens=[stop])
    assert out.shape == free.shape  # row 1 never stops, so all 10 tokens are made
    first = 3 + (free[0, 3:] == stop).nonzero()[0].item()
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == stop).all()  # padded with its stop token after finishing
    assert torch.equal(out[1], free[1])  # the running row is unaffected


def test_stop_tokens_end_generation(model):
    prompt = torch.tensor([[5, 6, 7]])
    free = model.generate(prompt, 8)
    stop = int(free[0, 5])  # the third generated token
    out = model.generate(prompt, 8, stop_tokens=[stop])
    first = (out[0, 3:] == stop).nonzero()[0].item()
    assert out.shape[1] == 3 + first + 1 and out[0, -1] == stop


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="token id 320 is out of range for vocab_size=320"):
        model(torch.tensor([[1, 320]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 0, dtype=torch.long))
    cache = model.new_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="longer than the KV cache"):
        model(torch.tensor([[1, 2]]), cache=cache)
    assert cache.length == 3  # the refused call changed nothing
    with pytest.raises(ValueError, match="batch"):
        model(torch.tensor([[1], [2]]), cache=cache)
    for kwargs, match in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            model.generate([[1, 2]], **{"max_new_tokens": 3, **kwargs})


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_cache_too_small_is_refused_before_the_prefill(model, decode):
    """Prompt 3 + 5 new tokens needs 7 positions (the last token is never fed back): a cache of 4
    is refused up front, and the cache and the trace are as they were."""
    cache = model.new_cache(1, 4)
    with ml4.RouterTrace(model) as trace:
        with pytest.raises(ValueError, match=r"prompt 3 \+ max_new_tokens 5 - 1 .* = 7 positions > KV cache of 4"):
            model.generate([[1, 2, 3]], 5, cache=cache, decode=decode)
    assert cache.length == 0 and len(trace.token_ids()) == 0
    roomy = model.new_cache(1, 7)  # exactly enough
    assert torch.equal(model.generate([[1, 2, 3]], 5, cache=roomy, decode=decode), model.generate([[1, 2, 3]], 5))
    assert roomy.length == 7
    with pytest.raises(ValueError, match="7 positions > KV cache of 7 with 7 already used"):
        model.generate([[1, 2, 3]], 5, cache=roomy)  # a used cache counts what it holds
    with pytest.raises(ValueError, match="batch of 2 but the KV cache's batch is 1"):
        model.generate([[1, 2], [3, 4]], 2, cache=model.new_cache(1, 10))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_new_tokens": 2.5}, TypeError, r"max_new_tokens=2\.5: must be a non-negative integer"),
    ({"max_new_tokens": None}, TypeError, "max_new_tokens=None: must be a non-negative integer"),
    ({"max_new_tokens": "3"}, TypeError, "max_new_tokens='3': must be a non-negative integer"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens=True"),
    ({"temperature": float("nan")}, ValueError, "temperature=nan must be a finite number >= 0"),
    ({"temperature": float("inf")}, ValueError, "temperature=inf"),
    ({"temperature": "hot"}, TypeError, "temperature='hot': must be a number"),
    ({"top_p": float("nan")}, ValueError, r"top_p=nan must be in \(0, 1\]"),
    ({"stop_tokens": [256.7]}, ValueError, r"stop_tokens=\[256\.7\]: 256\.7 is not a token id; expected integers in \[0, vocab_size=320\)"),
    ({"stop_tokens": -1}, ValueError, "-1 is not a token id"),
    ({"stop_tokens": [3, 320]}, ValueError, "320 is not a token id"),
    ({"stop_tokens": torch.tensor([3.0])}, TypeError, "expected integer token ids, got dtype torch.float32"),
    ({"stop_tokens": "eos"}, TypeError, "stop_tokens='eos': expected None, a token id"),
    ({"seed": "a"}, TypeError, "seed='a': must be None or an integer"),
    ({"seed": 1.5}, TypeError, r"seed=1\.5"),
    ({"cache": "x"}, TypeError, "cache='x': expected a KVCache from model.new_cache"),
    ({"decode": None}, ValueError, "decode=None: expected 'auto'"),
    ({"pixel_values": torch.zeros(1, 3, 8, 8)}, ValueError, "pixel_values need a multimodal model"),
])
def test_bad_generate_arguments_are_refused_before_any_work(model, kwargs, error, match):
    cache = model.new_cache(1, 10)
    with ml4.RouterTrace(model) as trace:
        with pytest.raises(error, match=match):
            model.generate(**{"input_ids": [[1, 2, 3]], "max_new_tokens": 3, "cache": cache, **kwargs})
    assert cache.length == 0 and len(trace.token_ids()) == 0
    assert torch.equal(model.generate([[1, 2, 3]], 3, cache=cache), model.generate([[1, 2, 3]], 3))


def test_stop_tokens_take_a_tensor_and_tiny_temperatures_are_greedy(model):
    prompt = [[5, 6, 7]]
    stop = int(model.generate(prompt, 8)[0, 5])
    assert torch.equal(model.generate(prompt, 8, stop_tokens=torch.tensor([stop, 0])),
                       model.generate(prompt, 8, stop_tokens=[stop, 0]))
    # below MIN_TEMPERATURE logits / temperature would overflow to inf; sampling there is the argmax
    assert torch.equal(model.generate(prompt, 8, temperature=1e-40, seed=0), model.generate(prompt, 8))


def test_bad_token_id_containers_are_refused_clearly(model):
    for empty in ([], [[]], torch.zeros(0, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, tokens\].*batch > 0 and tokens > 0"):
            model.generate(empty, 3)
    with pytest.raises(TypeError, match="rows of equal length"):
        model.generate([[1, 2], [3]], 3)
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.bool"):
        model(torch.tensor([[True]]))
    for dtype in (torch.uint8, torch.int16, torch.int32):  # any integer dtype is accepted
        assert torch.equal(model.generate(torch.tensor([[5, 6, 7]], dtype=dtype), 4), model.generate([[5, 6, 7]], 4))


def test_a_cache_from_another_model_is_refused(model):
    others = {"torch.bfloat16": ml4.Llama4Text.random(small_text(num_experts_per_tok=2), dtype="bf16"),
              "another model": ml4.Llama4Text.random(small_text(attention_chunk_size=16))}
    for match, other in others.items():
        cache = other.new_cache(1, 10)
        with pytest.raises(ValueError, match=f"the KV cache (holds|was made for) {match}"):
            model.generate([[1, 2, 3]], 3, cache=cache)
        with pytest.raises(ValueError, match=match):
            model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert cache.length == 0
    for args, error, match in [((1, -3), ValueError, "max_len=-3: must be a positive integer"),
                               ((0, 10), ValueError, "batch=0: must be a positive integer"),
                               ((1, 2.5), TypeError, r"max_len=2\.5: must be a positive integer")]:
        with pytest.raises(error, match=match):
            model.new_cache(*args)


def test_a_cache_that_does_not_fit_says_how_much_it_needs(model, monkeypatch):
    from minillama4 import plan

    with pytest.raises(plan.MemoryPlanError, match=r"a KV cache of 1,000,000,000,003 positions x batch 1 needs [\d,.]+ GiB"):
        model.generate([[1, 2, 3]], 10**12)
    monkeypatch.setattr(plan, "available_bytes", lambda device="cpu": 2**20)  # 1 MiB free
    with pytest.raises(plan.MemoryPlanError, match="needs .* GiB .* on cpu but only 0.0 GiB is free"):
        model.new_cache(4, 10_000)
    monkeypatch.undo()
    assert model.new_cache(4, 10_000).max_len == 10_000


def test_forward_refuses_extras_that_do_not_match_the_ids(model):
    ids = torch.tensor([[1, 2, 3]])
    for embeds in (torch.zeros(1, 3, 7), torch.zeros(1, 2, 64), torch.zeros(1, 3, 64, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"inputs_embeds=.*expected a float tensor of shape \(1, 3, 64\)"):
            model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"is_image=\(1, 2\) torch.bool: expected a torch.bool tensor of shape \(1, 3\)"):
        model(ids, is_image=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="router_outputs='x': pass a list"):
        model(ids, router_outputs="x")
    cache = model.new_cache(1, 5)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(ids, cache=cache, inputs_embeds=torch.zeros(1, 3, 7))
    assert cache.length == 0


def test_ring_cache_mixing_single_tokens_and_chunks_of_tokens_equals_a_full_forward(model):
    """One-token updates (slot written first), several-token updates (cached slots + the new ones),
    and static steps in between, across several 8-token chunks of a ring: the logits of every
    position equal one forward over the whole sequence."""
    from minillama4.decode import DecodeStep

    ids = torch.randint(0, 320, (2, 41), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 41)
        assert cache.keys[0].shape[2] == 8 < cache.max_len  # layer 0 is a chunked ring of 8 slots
        got, i = [], 0
        for n in (3, 1, 1, 5, 1, 9, 1, 1, 1, 6, 2, 1, 1):  # ends at 33
            got.append(model(ids[:, i:i + n], cache=cache))
            i += n
        step = DecodeStep(model, cache)
        for _ in range(3):
            got.append(step(ids[:, i:i + 1])[:, None])
            i += 1
        for n in (1, 4):
            got.append(model(ids[:, i:i + n], cache=cache))
            i += n
    assert i == 41 and cache.length == 41
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)


def test_bad_model_construction_is_refused_before_allocating(monkeypatch):
    from minillama4 import plan
    from minillama4.model import Llama4

    with pytest.raises(TypeError, match=r"Llama4Text\('tiny'\): pass a TextConfig or Llama4Config, e.g. minillama4.configs.tiny\(\)"):
        ml4.Llama4Text("tiny")
    with pytest.raises(TypeError, match="Llama4Text.*pass a TextConfig"):
        ml4.Llama4Text.random("tiny")
    with pytest.raises(TypeError, match="pass a Llama4Config with a vision config"):
        Llama4.random(ml4.configs.tiny().text)
    assert ml4.Llama4Text.random(ml4.configs.tiny(), dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'"):
        ml4.Llama4Text.random(ml4.configs.tiny(), dtype="int8")
    with pytest.raises(TypeError, match="seed='a': must be an integer"):
        ml4.Llama4Text.random(ml4.configs.tiny(), seed="a")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
            ml4.Llama4Text.random(ml4.configs.tiny(), device="cuda")
    # full Scout in fp32 is ~400 GiB: refused, saying so, instead of the process being OOM-killed
    monkeypatch.setattr(plan, "available_bytes", lambda device="cpu": 64 * 2**30)
    with pytest.raises(plan.MemoryPlanError, match=r"scout with random fp32 weights needs 40\d\.\d GiB on cpu"):
        ml4.Llama4Text.random(ml4.configs.scout())
    with pytest.raises(plan.MemoryPlanError, match="scout with random bf16 weights needs"):
        Llama4.random(ml4.configs.scout(), dtype=torch.bfloat16)


def test_a_config_changed_after_it_was_made_is_checked_when_a_model_is_built():
    """Configs validate when made, but their fields can be set afterwards: 6 layers with the 4
    derived no_rope_layers crashed in the forward (IndexError); top-k 9 of 4 experts and chunk 0
    failed deep in torch. Building a model validates again, and says how to remake the config."""
    from minillama4.model import Llama4

    cfg = ml4.configs.tiny()
    cfg.text.num_hidden_layers = 6
    with pytest.raises(ValueError, match=r"no_rope_layers=\[1, 1, 1, 0\]: needs exactly one entry per layer \(6\) "
                                         r"\(a field changed after the config was made\? .*config\.replace_text"):
        ml4.Llama4Text.random(cfg)
    text = ml4.configs.tiny().text
    text.num_experts_per_tok = 9
    with pytest.raises(ValueError, match=r"num_experts_per_tok=9: top-k exceeds .*dataclasses\.replace\(config, "):
        ml4.Llama4Text(text)
    mm = ml4.configs.tiny_multimodal()
    mm.vision.patch_size = 5  # checked too, with the text config
    with pytest.raises(ValueError, match="patch_size"):
        Llama4(mm)


@pytest.mark.parametrize("prefill", [3, 8, 21])
def test_ring_buffer_cache_equals_full_cache_on_long_sequences(model, prefill):
    """Chunked layers keep only one chunk (8 slots) in a ring; over 60 tokens (7+ chunks) the
    logits equal a full cache and a full forward, and the ring uses less memory."""
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(prefill))
    outs = {}
    with torch.no_grad():
        full = model(ids)
        for ring in (True, False):
            cache = model.new_cache(1, 60, ring=ring)
            steps = [model(ids[:, :prefill], cache=cache)]
            steps += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, 60)]
            outs[ring] = (torch.cat(steps, 1), cache.nbytes())
    torch.testing.assert_close(outs[True][0], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[False][0], full, rtol=1e-5, atol=1e-5)
    # 3 chunked layers keep 8 slots instead of 60, the NoPE layer keeps 60
    assert outs[True][1] == outs[False][1] * (3 * 8 + 60) // (4 * 60)
