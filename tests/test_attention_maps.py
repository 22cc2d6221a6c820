"""minillama4.attention_maps: the recomputed attention weights must be the ones the model uses.

The check: for every layer, weights @ v (GQA-expanded) through o_proj reproduces the output the
model's own Attention module produced in the same forward. The configs use chunk 8 and
floor_scale 2 so chunked masks and NoPE temperature tuning act at these short lengths.
"""

import pytest
import torch
from einops import rearrange, repeat
from helpers import small_text

import minillama4 as ml4
from minillama4 import image
from minillama4.attention import attention_mask
from minillama4.attention_maps import record_attention
from minillama4.model import Llama4

tok = ml4.ByteTokenizer()


def multimodal(seed=0, **text_changes):
    cfg = ml4.configs.tiny_multimodal().replace_text(attention_chunk_size=8, floor_scale=2, attn_scale=0.5,
                                                     initializer_range=0.1, **text_changes)
    return Llama4.random(cfg, seed=seed)


def prompt(model, width=84, question="colour?", batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    pics = [torch.randint(0, 256, (3, 84, width), dtype=torch.uint8, generator=g) for _ in range(batch)]
    texts, pixels = zip(*(image.prepare("<|begin_of_text|><|image|>" + question, [p], model.config.vision)
                          for p in pics))
    return torch.tensor([tok.encode(t) for t in texts]), torch.cat(pixels).float()


def attention_outputs(model, ids, pixels):
    """What each layer's Attention module returned in a plain forward (hooked), and its input."""
    got = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, args, out, i=i: got.__setitem__(i, (args, out.detach())))
        for i, layer in enumerate(model.language_model.model.layers)]
    with torch.no_grad():
        model(ids, pixel_values=pixels)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("changes", [{}, {"use_qk_norm": False, "num_key_value_heads": 4},
                                     {"num_key_value_heads": 1}])
def test_weights_times_values_reproduce_the_attention_output(changes):
    model = multimodal(**changes)
    ids, pixels = prompt(model, width=168, batch=2)  # 1x2 tiles + thumbnail: 27 image tokens, t > 8
    assert ids.shape[1] > 3 * model.cfg.attention_chunk_size
    maps = record_attention(model, ids, pixel_values=pixels)
    outputs = attention_outputs(model, ids, pixels)
    for layer, attn in enumerate(model.language_model.model.layers):
        attn = attn.self_attn
        (x, *_), out = outputs[layer]
        v = rearrange(attn.v_proj(x), "b s (k dh) -> b k s dh", dh=attn.dh)
        v = repeat(v, "b k s dh -> b (k g) s dh", g=attn.n_heads // attn.n_kv)
        o = torch.einsum("bhts,bhsd->bhtd", maps.probs[layer], v)
        mine = attn.o_proj(rearrange(o, "b h t dh -> b t (h dh)"))
        torch.testing.assert_close(mine, out, rtol=1e-4, atol=1e-5)


def test_rows_are_distributions_and_respect_the_masks():
    model = multimodal()
    ids, pixels = prompt(model, width=168)
    maps = record_attention(model, ids, pixel_values=pixels)
    t = ids.shape[1]
    pos = torch.arange(t)
    assert maps.layers == [0, 1, 2, 3]
    for layer in maps.layers:
        p = maps.probs[layer]
        assert p.shape == (1, model.cfg.num_attention_heads, t, t)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        chunk = model.cfg.attention_chunk_size if model.cfg.is_chunked(layer) else None
        allowed = attention_mask(pos, pos, chunk)
        assert (p[..., ~allowed] == 0).all()
        assert (p[..., allowed] > 0).all()
    assert not model.cfg.is_chunked(3)  # the NoPE layer sees the whole prefix
    assert (maps.probs[3][0, :, -1] > 0).all()


def test_brute_force_single_head():
    """Layer 0, head 0 from scratch: q = W_q x, k = W_k x, RoPE, QK norm, one softmax row."""
    model = multimodal()
    ids, pixels = prompt(model)
    maps = record_attention(model, ids, pixel_values=pixels, layers=[0])
    assert maps.layers == [0]
    (x, positions, freqs_cis, _), _ = attention_outputs(model, ids, pixels)[0]
    attn = model.language_model.model.layers[0].self_attn
    dh, q_row = attn.dh, ids.shape[1] - 1
    q = (x[0, q_row] @ attn.q_proj.weight.T)[:dh]  # head 0
    k = (x[0] @ attn.k_proj.weight.T)[:, :dh]  # kv head 0 serves query head 0

    def rope(v, p):
        c = torch.view_as_complex(v.reshape(-1, 2).contiguous()) * freqs_cis[p]
        return torch.view_as_real(c).reshape(-1)

    q = rope(q, q_row)
    k = torch.stack([rope(k[s], s) for s in range(k.shape[0])])
    q, k = q / q.pow(2).mean().add(1e-5).sqrt(), k / k.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    chunk = attn.chunk
    scores = (k @ q) / dh**0.5
    visible = torch.tensor([s // chunk == q_row // chunk and s <= q_row for s in range(k.shape[0])])
    expected = torch.where(visible, scores, torch.tensor(float("-inf"))).softmax(-1)
    torch.testing.assert_close(maps.probs[0][0, 0, q_row], expected, rtol=1e-4, atol=1e-6)


def test_image_views():
    model = multimodal()
    ids, pixels = prompt(model, width=168)  # 3 tiles of 9 tokens
    maps = record_attention(model, ids, pixel_values=pixels)
    grid = maps.to_image(3, query=-1)
    h = model.cfg.num_attention_heads
    assert grid.shape == (h, 3, 3, 3)
    share = maps.image_share(3)
    torch.testing.assert_close(grid.sum((1, 2, 3)), share[0, :, -1])
    assert maps.to_image(3, query=ids.shape[1] - 1).equal(grid)
    # a query before the image puts no weight on it
    assert share[0, :, 0].abs().max() == 0
    assert maps.is_image.sum() == 27 and maps.logits.shape == (1, ids.shape[1], model.cfg.vocab_size)
    with pytest.raises(IndexError, match=rf"query {ids.shape[1]} is outside the {ids.shape[1]}-token prompt"):
        maps.to_image(0, query=ids.shape[1])
    with pytest.raises(IndexError, match="batch=1: the recorded batch has 1 sequences"):
        maps.to_image(3, batch=1)
    some = record_attention(model, ids, pixel_values=pixels, layers=[0, 2])
    with pytest.raises(ValueError, match=r"layer 3 was not recorded; recorded layers: \[0, 2\]"):
        some.to_image(3)


def test_text_model_and_errors():
    model = ml4.Llama4Text.random(small_text(), seed=0)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    maps = record_attention(model, ids, layers=[1, 3])
    assert maps.layers == [1, 3] and maps.probs[1].shape == (2, 4, 20, 20)
    assert not maps.is_image.any()
    with pytest.raises(ValueError, match="text-only"):
        maps.to_image(1)
    with pytest.raises(ValueError, match="pixel_values"):
        record_attention(model, ids, pixel_values=torch.zeros(1, 3, 84, 84))
    with pytest.raises(ValueError, match=r"layer 0 was not recorded; recorded layers: \[1, 3\]"):
        maps.image_share(0)
    with pytest.raises(ValueError, match=r"layers=\[1, 99\]: \[99\] not a layer of this 4-layer model"):
        record_attention(model, ids, layers=[1, 99])
    with pytest.raises(TypeError, match="Llama4 or Llama4Text"):
        record_attention(model.model, ids)
    assert record_attention(model, ids, layers=[-1]).layers == [3]  # negative: counted from the end
    # hooks are removed afterwards, even after an error
    assert all(not layer.self_attn._forward_hooks for layer in model.model.layers)
