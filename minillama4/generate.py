"""Text generation: one prefill over the prompt, then one token at a time from the KV cache.

Greedy (temperature 0) by default; temperature and nucleus (top-p) sampling with a seed;
generation stops when every sequence has produced a stop token (then the finished rows are
padded with their stop token). The decode steps run the ordinary forward ("eager"), or a
static-shape step with no host sync ("static"), replayed as a CUDA graph on a GPU ("graph");
see decode.py. Axes: b batch, t tokens, v vocab.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, v] -> next ids [b]. Nucleus sampling (Holtzman et al. 2020): keep the smallest
    set of most likely tokens whose probability mass reaches top_p, renormalise, sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop_tokens=None, cache=None, pixel_values=None,
             decode: str = "auto") -> torch.Tensor:
    """Returns prompt + generated tokens, [b, t + new] (new <= max_new_tokens). `pixel_values`
    (multimodal models) are used by the prefill, where the prompt's <|patch|> tokens are.
    `decode`: "eager", "static" or "graph" (CUDA only), the same tokens (decode.py); "auto" is
    "graph" on CUDA (an eager step is Python-bound there: ten times slower for full Scout,
    docs/benchmarks.md) and "eager" elsewhere."""
    from .decode import DECODE_MODES, DecodeStep

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if decode not in DECODE_MODES + ("auto",):
        raise ValueError(f"decode={decode!r}: expected 'auto' or one of {DECODE_MODES}")
    ids = model.check_ids(input_ids)
    if decode == "auto":
        decode = "graph" if ids.is_cuda else "eager"
    b, t = ids.shape
    if max_new_tokens == 0:
        return ids
    if cache is None:
        cache = model.new_cache(b, t + max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    stops = torch.tensor(sorted(set([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or [])),
                         dtype=torch.long, device=ids.device)
    out = [ids]
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    step = (lambda x: model(x, cache=cache)[:, -1]) if decode == "eager" else DecodeStep(model, cache, decode == "graph")
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
