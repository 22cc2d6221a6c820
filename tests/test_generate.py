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
