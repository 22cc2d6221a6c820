"""Static decode (minillama4.decode): the graph-capturable step gives eager decode's logits and
tokens on every layer kind (chunked ring-buffer layers past several chunks, NoPE layers with
temperature tuning, dense/MoE interleave, top-k > 1, int4, images in the prompt), and it asks the
host nothing while it runs. The CUDA-graph replay itself is tested in test_gpu.py."""


import pytest
import torch
from helpers import rel_err, small_text

import minillama4 as ml4
from minillama4.decode import DecodeStep, host_reads
from minillama4.moe import MoE
from minillama4.quant import quantize_model

CASES = {
    "scout-like": {},
    "top-2": dict(num_experts_per_tok=2),
    "maverick-like interleave": dict(interleave_moe_layer_step=2, use_qk_norm=False),
    "no temperature tuning": dict(attn_temperature_tuning=False),
}


def prompt(vocab, batch=2, tokens=5, seed=0):
    return torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def eager_and_static_logits(model, ids, steps, ring=True):
    """Greedy decode twice from the same prefill: the ordinary forward and the static step."""
    b, t = ids.shape
    eager_cache, static_cache = model.new_cache(b, t + steps, ring), model.new_cache(b, t + steps, ring)
    with torch.no_grad():
        logits = model(ids, cache=eager_cache)[:, -1]
        model(ids, cache=static_cache)
        step = DecodeStep(model, static_cache)
        pairs = []
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, cache=eager_cache)[:, -1]
            pairs.append((step(nxt), logits))
    assert static_cache.length == eager_cache.length == t + steps
    return pairs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ring", [True, False])
def test_static_step_matches_eager_decode_across_chunks(case, ring):
    cfg = small_text(**CASES[case])
    model = ml4.Llama4Text.random(cfg, seed=1)
    pairs = eager_and_static_logits(model, prompt(cfg.vocab_size), steps=30)  # positions 5..34: chunks of 8
    assert max(rel_err(s, e) for s, e in pairs) < 1e-5
    assert all(torch.equal(s.argmax(-1), e.argmax(-1)) for s, e in pairs)


@pytest.mark.parametrize("case", CASES)
def test_generate_static_gives_the_same_tokens(case):
    cfg = small_text(**CASES[case])
    model = ml4.Llama4Text.random(cfg, seed=2)
    ids = prompt(cfg.vocab_size, seed=2)
    assert torch.equal(model.generate(ids, 30, decode="static"), model.generate(ids, 30))
    sampled = [model.generate(ids, 20, temperature=0.9, top_p=0.9, seed=5, decode=d) for d in ("eager", "static")]
    assert torch.equal(*sampled)


def test_static_step_with_int4_weights():
    cfg = small_text(hidden_size=128, head_dim=32, intermediate_size=128, intermediate_size_mlp=256, num_experts_per_tok=2)
    model = quantize_model(ml4.Llama4Text.random(cfg, seed=3), which="all")
    pairs = eager_and_static_logits(model, prompt(cfg.vocab_size, seed=3), steps=20)
    assert max(rel_err(s, e) for s, e in pairs) < 1e-5


def test_static_decode_after_an_image_prompt():
    from minillama4 import image as img
    from minillama4.model import Llama4

    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=5)
    image = torch.randint(0, 256, (3, 84, 168), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    text, pixel_values = img.prepare("<|begin_of_text|>Look: <|image|> What is it?", [image], model.config.vision)
    ids = torch.tensor([ml4.ByteTokenizer().encode(text)])
    eager = model.generate(ids, 12, pixel_values=pixel_values)
    static = model.generate(ids, 12, pixel_values=pixel_values, decode="static")
    assert torch.equal(static, eager)


def test_static_step_asks_the_host_nothing_and_eager_does():
    """host_reads counts every way a tensor's value reaches Python (.item(), .tolist(), bool(),
    int(), float(), index use). The static step makes none; the eager forward several per token."""
    cfg = small_text(num_experts_per_tok=2, interleave_moe_layer_step=2)
    model = ml4.Llama4Text.random(cfg, seed=4)
    ids = prompt(cfg.vocab_size, seed=4)
    reads = {}
    for mode in ("eager", "static"):
        cache = model.new_cache(2, 40)
        with torch.no_grad():
            nxt = model(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
            step = (lambda t, cache=cache: model(t, cache=cache)[:, -1]) if mode == "eager" else DecodeStep(model, cache)
            with host_reads() as reads[mode]:
                for _ in range(12):  # crosses a chunk boundary: ring slots are reused
                    nxt = step(nxt).argmax(-1, keepdim=True)
        assert cache.length == ids.shape[1] + 12
    assert sum(reads["static"].values()) == 0
    assert sum(reads["eager"].values()) >= 12 * 2  # check_ids alone reads min and max every token
    assert torch.Tensor.item.__name__ == "item" and torch.Tensor.__bool__.__name__ == "__bool__"  # wrappers gone


def test_static_generate_reads_the_host_only_for_the_prefill():
    """Without stop tokens, generate(decode="static") makes the same number of host reads for 5
    or 25 new tokens: the eager prefill's, none per token."""
    cfg = small_text()
    model = ml4.Llama4Text.random(cfg, seed=9)
    ids = prompt(cfg.vocab_size, seed=9)
    counts = []
    for new in (5, 25):
        with host_reads() as reads:
            model.generate(ids, new, decode="static", temperature=0.8, top_p=0.9, seed=1)
        counts.append(sum(reads.values()))
    assert counts[0] == counts[1] > 0
    stop = [cfg.vocab_size - 1]
    with host_reads() as reads:  # with a stop token, one read per token decides whether to stop
        static = model.generate(ids, 25, decode="static", stop_tokens=stop)
    assert sum(reads.values()) == counts[0] + 24
    assert torch.equal(static, model.generate(ids, 25, decode="eager", stop_tokens=stop))


def test_router_trace_records_static_decode_like_eager():
    cfg = small_text()
    model = ml4.Llama4Text.random(cfg, seed=6)
    ids = prompt(cfg.vocab_size, batch=1, seed=6)
    traces = {}
    for mode in ("eager", "static"):
        with ml4.RouterTrace(model) as trace:
            model.generate(ids, 10, decode=mode)
        traces[mode] = trace
    for layer in traces["eager"].moe_layers:
        assert torch.equal(traces["static"].expert_ids(layer), traces["eager"].expert_ids(layer))
        assert rel_err(traces["static"].logits(layer), traces["eager"].logits(layer)) < 1e-5
        assert rel_err(traces["static"].gates(layer), traces["eager"].gates(layer)) < 1e-5
    assert torch.equal(traces["static"].positions(), traces["eager"].positions())
    assert torch.equal(traces["static"].token_ids(), traces["eager"].token_ids())


def test_router_trace_records_every_static_step_through_device_buffers():
    """Traced static steps copy the router outputs into device buffers (what a CUDA graph can
    record), hand them to the trace after the step, and give the layers their trace back."""
    cfg = small_text(interleave_moe_layer_step=2)  # dense and MoE layers: the buffers skip the dense ones
    model = ml4.Llama4Text.random(cfg, seed=8)
    ids = prompt(cfg.vocab_size, batch=2, seed=8)
    cache = model.new_cache(2, 20)
    with torch.no_grad(), ml4.RouterTrace(model) as trace:
        nxt = model(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
        step = DecodeStep(model, cache)
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        assert len(moes) < cfg.num_hidden_layers
        for _ in range(3):
            nxt = step(nxt).argmax(-1, keepdim=True)
        assert all(m.trace is trace for m in moes)  # the step put the trace back
    assert len(trace.token_ids()) == 2 * (ids.shape[1] + 3)
    for layer in trace.moe_layers:
        assert trace.expert_ids(layer).shape == (2 * (ids.shape[1] + 3), cfg.num_experts_per_tok)


def test_dispatch_is_restored_after_each_step():
    cfg = small_text()
    model = ml4.Llama4Text.random(cfg, seed=7).set_dispatch("reference")
    model.generate(prompt(cfg.vocab_size, seed=7), 4, decode="static")
    assert {m.feed_forward.dispatch for m in model.model.layers if hasattr(m.feed_forward, "dispatch")} == {"reference"}


def test_bad_decode_requests_are_refused_clearly():
    cfg = small_text()
    model = ml4.Llama4Text.random(cfg, seed=8)
    ids = prompt(cfg.vocab_size, seed=8)
    with pytest.raises(ValueError, match="decode='fast'"):
        model.generate(ids, 4, decode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            model.generate(ids, 4, decode="graph")
    cache = model.new_cache(2, 6)
    with torch.no_grad():
        model(ids, cache=cache)
    step = DecodeStep(model, cache)
    before = (cache.length, [k.clone() for k in cache.keys])
    with pytest.raises(ValueError, match="shape"):
        step(torch.zeros(1, 1, dtype=torch.long))
    assert cache.length == before[0] and all(torch.equal(a, b) for a, b in zip(cache.keys, before[1]))
    step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the KV cache"):
        step(torch.zeros(2, 1, dtype=torch.long))
    cache.static = True
    with pytest.raises(ValueError, match="one token per step"):
        k = v = torch.zeros(2, cfg.num_key_value_heads, 2, cfg.head_dim)  # two tokens at once
        cache.update(0, k, v, torch.arange(2))


def test_a_decode_step_refuses_bad_ids_and_keeps_the_cache():
    """dtype and shape always; the range on CPU ids (on a GPU that check would be a host sync per
    token). A refused step leaves the cache as it was: the next good step matches a fresh cache."""
    cfg = small_text()
    model = ml4.Llama4Text.random(cfg, seed=10)
    ids = prompt(cfg.vocab_size, seed=10)
    caches = [model.new_cache(2, 8), model.new_cache(2, 8)]
    with torch.no_grad():
        for cache in caches:
            model(ids, cache=cache)
    step = DecodeStep(model, caches[0])
    for bad, error, match in [(torch.tensor([[9999], [3]]), ValueError, "token id 9999 is out of range for vocab_size=320"),
                              (torch.tensor([[3], [-1]]), ValueError, "token id -1 is out of range"),
                              (torch.tensor([[3.0], [4.0]]), TypeError, "integer token ids .* got dtype torch.float32"),
                              ([[3], [4]], TypeError, r"integer token ids .* got \[\[3\], \[4\]\]")]:
        with pytest.raises(error, match=match):
            step(bad)
    assert caches[0].length == 5
    good = torch.tensor([[3], [4]])
    assert torch.equal(step(good), DecodeStep(model, caches[1])(good))
    with pytest.raises(TypeError, match="cache='x': expected a KVCache"):
        DecodeStep(model, "x")
    with pytest.raises(ValueError, match="the KV cache was made for another model"):
        DecodeStep(model, ml4.Llama4Text.random(small_text(num_hidden_layers=2)).new_cache(2, 8))


def test_a_multimodal_cache_too_small_is_refused_before_the_vision_tower():
    from minillama4 import image as img
    from minillama4.model import Llama4

    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=5)
    image = torch.randint(0, 256, (3, 84, 84), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    text, pixel_values = img.prepare("<|begin_of_text|><|image|>Hi", [image], model.config.vision)
    ids = torch.tensor([ml4.ByteTokenizer().encode(text)])
    t = ids.shape[1]
    cache = model.new_cache(1, t)
    for decode in ("eager", "static"):
        with pytest.raises(ValueError, match=rf"prompt {t} \+ max_new_tokens 4 - 1 .* = {t + 3} positions > KV cache of {t}"):
            model.generate(ids, 4, pixel_values=pixel_values, cache=cache, decode=decode)
    assert cache.length == 0
    with pytest.raises(ValueError, match="longer than the KV cache"):
        model(torch.cat([ids, ids], 1), pixel_values=torch.cat([pixel_values, pixel_values]), cache=cache)
    roomy = model.new_cache(1, t + 3)
    assert torch.equal(model.generate(ids, 4, pixel_values=pixel_values, cache=roomy),
                       model.generate(ids, 4, pixel_values=pixel_values))
