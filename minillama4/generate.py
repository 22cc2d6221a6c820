"""Text generation: one prefill over the prompt, then one token at a time from the KV cache.

Greedy (temperature 0) by default; temperature and nucleus (top-p) sampling with a seed;
generation stops when every sequence has produced a stop token (then the finished rows are
padded with their stop token). The decode steps run the text model's ordinary forward ("eager"), or a
static-shape step with no host sync ("static"), replayed as a CUDA graph on a GPU ("graph");
see decode.py. Every argument is checked before the prefill, the KV cache's room and memory
included: a refused call leaves the model, the cache and a RouterTrace as they were.

Simplifications: the prompts of a batch have equal length (no padding or attention mask, unlike
transformers' generate); no beam search, top-k sampling, repetition penalty or streaming.

Axes: b batch, t tokens, v vocab.
"""

from __future__ import annotations

import math
import numbers

import torch

from .checks import check_int, check_seed, is_int

# Temperatures in (0, MIN_TEMPERATURE) sample as temperature 0 (greedy). Dividing the logits by them
# can overflow float32 to inf (NaN probabilities, or a uniform draw), and sampling at them already is
# the argmax: two logits that differ by more than 1e-28 differ in probability by more than e^100.
MIN_TEMPERATURE = 1e-30


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, v] -> next ids [b]. Nucleus sampling (Holtzman et al. 2020): keep the smallest
    set of most likely tokens whose probability mass reaches top_p, renormalise, sample."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
        drop = mass_before >= top_p
        # The nucleus is never empty: a top_p below float32's range (1e-300, say) compares as 0, and
        # 0 >= 0 dropped the most likely token too (every probability 0: multinomial raised).
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(temperature, top_p, seed) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}={value!r}: must be a number")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:  # NaN fails this too
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    check_seed(seed, allow_none=True)


def stop_ids(stop_tokens, vocab_size: int) -> list[int]:
    """None, one token id, or several (list, tuple, set, tensor, numpy array) -> sorted distinct
    ids, each an integer in [0, vocab_size); anything else is refused."""
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, torch.Tensor):  # before generation: a host read here is no per-token sync
        if stop_tokens.dtype.is_floating_point or stop_tokens.dtype.is_complex or stop_tokens.dtype == torch.bool:
            raise TypeError(f"stop_tokens={stop_tokens!r}: expected integer token ids, got dtype {stop_tokens.dtype}")
        items = stop_tokens.reshape(-1).tolist()
    elif is_int(stop_tokens):
        items = [stop_tokens]
    elif isinstance(stop_tokens, (list, tuple, set, frozenset, range)):
        items = list(stop_tokens)
    elif hasattr(stop_tokens, "tolist") and hasattr(stop_tokens, "reshape"):  # a numpy array
        items = stop_tokens.reshape(-1).tolist()
    else:
        raise TypeError(f"stop_tokens={stop_tokens!r}: expected None, a token id, or a list or tensor of token ids")
    for s in items:
        if not is_int(s) or not 0 <= s < vocab_size:
            raise ValueError(f"stop_tokens={stop_tokens!r}: {s!r} is not a token id; "
                             f"expected integers in [0, vocab_size={vocab_size})")
    return sorted({int(s) for s in items})


def _check_room(cache, batch: int, prompt: int, max_new_tokens: int) -> None:
    """The whole call must fit in a given cache: found here, not after the prefill and some steps."""
    need = prompt + max_new_tokens - 1  # the last new token is returned, never fed back
    if cache.batch != batch:
        raise ValueError(f"input_ids have a batch of {batch} but the KV cache's batch is {cache.batch}")
    if cache.length + need > cache.max_len:
        raise ValueError(f"prompt {prompt} + max_new_tokens {max_new_tokens} - 1 (the last token is not fed back) "
                         f"= {need} positions > KV cache of {cache.max_len} with {cache.length} already used; use "
                         f"model.new_cache({batch}, {cache.length + need}) or ask for fewer tokens")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop_tokens=None, cache=None, pixel_values=None,
             decode: str = "auto") -> torch.Tensor:
    """Returns prompt + generated tokens, [b, t + new] (new <= max_new_tokens). `pixel_values`
    (multimodal models) are used by the prefill, where the prompt's <|patch|> tokens are.
    `decode`: "eager", "static" or "graph" (CUDA only), the same tokens (decode.py); "auto" is
    "graph" on CUDA (an eager step is Python-bound there: ten times slower for full Scout,
    docs/benchmarks.md) and "eager" elsewhere. Temperatures below MIN_TEMPERATURE (1e-30) are
    greedy. `cache`: a model.new_cache(b, n) with room for the prompt + max_new_tokens - 1 positions
    (without one, a cache of prompt + max_new_tokens positions is made, if it fits in memory)."""
    from .decode import DECODE_MODES, DecodeStep

    check_int("max_new_tokens", max_new_tokens, 0)
    _check_sampling(temperature, top_p, seed)
    if not isinstance(decode, str) or decode not in DECODE_MODES + ("auto",):
        raise ValueError(f"decode={decode!r}: expected 'auto' or one of {DECODE_MODES}")
    if pixel_values is not None and not hasattr(model, "image_features"):
        raise ValueError("pixel_values need a multimodal model (Llama4); this one reads text only")
    if pixel_values is not None:  # type, shape and finite values, before a cache is made
        model.vision_model.check_pixels(pixel_values)
    stop_list = stop_ids(stop_tokens, model.cfg.vocab_size)
    ids = model.check_ids(input_ids)
    if decode == "auto":
        decode = "graph" if ids.is_cuda else "eager"
    b, t = ids.shape
    if cache is not None:
        model.check_cache(cache)
    if max_new_tokens == 0:
        return ids
    if cache is None:
        cache = model.new_cache(b, t + max_new_tokens)  # refused with MemoryPlanError if it does not fit
    else:
        _check_room(cache, b, t, max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    stops = torch.tensor(stop_list, dtype=torch.long, device=ids.device)
    out = [ids]
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    # decode steps read text only, as DecodeStep does: a generated <|patch|> is an ordinary token (the
    # images fill the prompt's <|patch|> slots in the prefill; transformers passes them only there too)
    text = getattr(model, "language_model", model)
    step = (lambda x: text(x, cache=cache)[:, -1]) if decode == "eager" else DecodeStep(model, cache, decode == "graph")
    logits = model(ids, cache=cache, **images)[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(finished, out[-1][:, -1], nxt)  # finished rows repeat their stop token
        out.append(nxt[:, None])
        finished |= torch.isin(nxt, stops)
        # the loop's only host read, and only with stop tokens: without them nothing finishes early
        if len(out) - 1 == max_new_tokens or (len(stops) and bool(finished.all())):
            break
        logits = step(nxt[:, None])
    return torch.cat(out, dim=1)
