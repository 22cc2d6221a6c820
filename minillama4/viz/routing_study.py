"""What did the experts learn? Analysis helpers and figures for notebook 02 (MoE routing).

    from minillama4.viz import routing_study as rs
    windows = rs.held_out_windows(val_data, seq_len=128)          # ids, domains [w, t]
    study = rs.trace_windows(model, windows)                      # a RouterTrace over all windows
    classes = rs.token_classes(windows.ids)                       # [w, t] index into TOKEN_CLASSES
    rs.group_share(study.expert_ids(0)[:, 0], classes.flatten(), len(rs.TOKEN_CLASSES), 16)  # [g, e]
    rs.predictability(top1, {"domain": d, "token id": ids, ...})  # how well each key guesses the expert

The questions follow the routing analyses of Mixtral (Jiang et al. 2024, §5) and OLMoE
(Muennighoff et al. 2024, §5): does an expert's share of the tokens depend on the domain
(topic), on the kind of token (digits, whitespace, keywords...), on the token id itself, and do
consecutive tokens keep their expert?

Measures (all on top-1 experts; with top-k > 1 only the first choice is used):
  group share      share[g, e] = #(tokens of group g sent to e) / #(tokens of group g)
                   (OLMoE's "domain specialization" when g is a domain, its "vocabulary
                   specialization" when g is a token id)
  predictability   fit the most frequent expert of each key value (domain, token class, token
                   id, ...) on the first half of the tokens, report how often it is right on the
                   second half; the no-information baseline is the busiest expert's share
  context shift    for one token id in two contexts (domains), the total variation distance
                   between its expert shares, averaged over token ids (0 = the context never
                   changes where a token goes)
  repeat rate      P(expert of token t = expert of token t-1) within a window, against the rate
                   Σ_e p_e² that independent draws with the same load would give (Mixtral Table 5)

Token classes are assigned per byte from its context in the window: a byte of a Python keyword or
`self` written as a whole word is "keyword" (English "and", "in", "is", "for"... count too), a
space between a newline and the first non-space of the line is "indent" (a row that
starts mid-line cannot tell, so its leading spaces are "space"), then digit / letter / space / newline /
punctuation, and "other" for non-ASCII bytes and special tokens.

Gate variants (for the Llama 4 vs Mixtral contrast): from router logits z [n, e] and top-k
  llama4   s_i = sigmoid(z_i) for the top-k i, no renormalisation (Llama 4)
  mixtral  s = softmax(z_topk) over the chosen k only (Mixtral eq. for G(x)); 1.0 when k = 1
  softmax  s_i = softmax(z)_i over all e experts, top-k kept, no renormalisation (Switch, OLMoE)

Also here: `moe_inputs` (what an MoE layer receives, by a forward pre-hook), `input_vs_output_gating`
(E(s x) against s E(x)), `time_dispatch` (MoE._reference against MoE._fast on the same tokens), the
figures `expert_share_heatmap`, `predictability_figure`, `gate_histogram`, and `snippet_explorer`
(a text dropdown and a layer dropdown over `viz.token_expert_html`).

Simplifications: one byte is one token (the course tokenizer), so "token id" has at most 272
values and words span several tokens; keywords are matched case-sensitively on ASCII text;
halves for predictability are split by window order, not
by document.

Axes: w windows, t tokens per window, n tokens (w and t flattened), e experts, k top-k slot,
g groups (domains, token classes, token ids), d model dim.
"""

from __future__ import annotations

import keyword
import re
import time
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from einops import rearrange

from ..data import DOMAINS, TokenCorpus
from ..moe import MoE
from ..tokenizer import ByteTokenizer
from ..trace import RouterTrace
from ..checks import check_int
from .plots import _check_ids, _expert_axis, _style, expert_load_bar, token_expert_html
from .widgets import _Explorer, show_figure

TOKEN_CLASSES = ("digit", "letter", "keyword", "space", "indent", "newline", "punctuation", "other")
KEYWORDS = tuple(sorted(set(keyword.kwlist) | {"self"}))
_KEYWORD_RE = re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(KEYWORDS) + r")(?![A-Za-z0-9_])")
_INDENT_RE = re.compile(r"(?<=\n) +")  # spaces right after a newline


# ------------------------------------------------------------------------------ data
@dataclass
class Windows:
    """Held-out text cut into non-overlapping windows, with one domain label per token."""

    ids: torch.Tensor  # [w, t] token ids
    domain: torch.Tensor  # [w, t] index into `domains`
    domains: tuple[str, ...] = DOMAINS  # label names


def held_out_windows(corpus: TokenCorpus, seq_len: int = 128, max_windows: int | None = None) -> Windows:
    """The stream cut into consecutive windows of seq_len tokens (the tail is left out)."""
    w = len(corpus.ids) // seq_len
    if max_windows is not None:
        w = min(w, max_windows)
    if w == 0:
        raise ValueError(f"{len(corpus.ids)} tokens are too few for one window of {seq_len}")
    cut = w * seq_len
    return Windows(rearrange(corpus.ids[:cut], "(w t) -> w t", t=seq_len),
                   rearrange(corpus.domain[:cut], "(w t) -> w t", t=seq_len), corpus.domains)


@torch.no_grad()
def trace_windows(model, windows: Windows | torch.Tensor, batch: int = 32) -> RouterTrace:
    """Run the model over the windows [w, t] in batches inside one RouterTrace and return it
    (tokens in window order, batch-major: row w*t + i is window w, token i)."""
    ids = windows.ids if isinstance(windows, Windows) else windows
    was_training = model.training
    model.eval()
    with RouterTrace(model) as trace:
        for start in range(0, len(ids), batch):
            model(ids[start:start + batch].to(model.device))
    model.train(was_training)
    return trace


def document_snippets(corpus: TokenCorpus, per_domain: int = 3, length: int = 96,
                      min_length: int = 48) -> dict[str, list[int]]:
    """Held-out snippets that start at a document start: {"code 1": ids, ...}, `per_domain`
    for each domain (the first ones in stream order), each the <|end_of_text|> before the
    document and then up to `length` tokens of it (documents shorter than min_length skipped)."""
    tok = ByteTokenizer()
    ids, dom = corpus.ids.tolist(), corpus.domain.tolist()
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
    found: dict[str, list[list[int]]] = {d: [] for d in corpus.domains}
    for a, b in zip(ends, ends[1:]):  # a document is ids[a + 1 : b + 1] (its own eos at b)
        domain = corpus.domains[dom[a + 1]]
        if b - a - 1 >= min_length and len(found[domain]) < per_domain:
            found[domain].append(ids[a:a + 1 + min(length, b - a - 1)])
    return {f"{d} {j + 1}": s for d in corpus.domains for j, s in enumerate(found[d])}


def token_classes(ids) -> torch.Tensor:
    """Class of every token (index into TOKEN_CLASSES), from its context in its row.
    ids [t] or [w, t] of byte-tokenizer ids; returns the same shape."""
    ids = torch.as_tensor(ids)
    rows = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 0 else ids.reshape(1, 1)
    out = torch.empty_like(rows)
    c = {name: j for j, name in enumerate(TOKEN_CLASSES)}
    for r, row in enumerate(rows.tolist()):
        # one character per token: ASCII bytes as themselves, anything else as a placeholder
        text = "".join(chr(i) if i < 128 else "\x00" for i in row)
        labels = []
        for ch in text:
            if ch.isdigit():
                labels.append(c["digit"])
            elif ch.isalpha() or ch == "_":
                labels.append(c["letter"])
            elif ch == "\n":
                labels.append(c["newline"])
            elif ch in " \t":
                labels.append(c["space"])
            elif ch == "\x00" or not ch.isprintable():
                labels.append(c["other"])
            else:
                labels.append(c["punctuation"])
        for m in _INDENT_RE.finditer(text):
            labels[m.start():m.end()] = [c["indent"]] * (m.end() - m.start())
        for m in _KEYWORD_RE.finditer(text):
            labels[m.start():m.end()] = [c["keyword"]] * (m.end() - m.start())
        out[r] = torch.tensor(labels)
    return out.reshape(ids.shape)


def class_names_of(labels) -> list[str]:
    """Index labels -> class names."""
    labels = torch.as_tensor(labels).flatten().long()
    _check_ids("labels", labels.numpy(), len(TOKEN_CLASSES), "indices into TOKEN_CLASSES")
    return [TOKEN_CLASSES[i] for i in labels.tolist()]


# ------------------------------------------------------------------------------ measures
def group_share(expert_ids, groups, n_groups: int, n_experts: int) -> torch.Tensor:
    """share[g, e]: fraction of group g's tokens whose expert is e (rows with no tokens are 0).
    expert_ids [n] (top-1) or [n, k] (every slot counts), groups [n] ints in 0..n_groups-1."""
    check_int("n_groups", n_groups, 1)
    check_int("n_experts", n_experts, 1)
    ids = torch.as_tensor(expert_ids)
    ids = ids[:, None] if ids.dim() == 1 else ids
    g = torch.as_tensor(groups).flatten()
    if len(g) != len(ids):
        raise ValueError(f"{len(g)} groups but {len(ids)} rows of expert_ids: expected one group per token")
    _check_ids("expert_ids", ids.numpy(), n_experts, "expert ids", f"n_experts={n_experts}")
    _check_ids("groups", g.numpy(), n_groups, "group ids", f"n_groups={n_groups}")
    counts = torch.zeros(n_groups, n_experts)
    for slot in range(ids.shape[1]):
        counts.index_put_((g, ids[:, slot]), torch.ones(len(g)), accumulate=True)
    totals = counts.sum(1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), torch.zeros_like(counts))


def _codes(key) -> torch.Tensor:
    """A key [n] of ints, or a tuple of such keys (combined), -> one int code per token."""
    if isinstance(key, tuple):
        code = torch.zeros_like(torch.as_tensor(key[0]).flatten())
        for part in key:
            part = torch.as_tensor(part).flatten().long()
            code = code * (int(part.max()) + 1 if len(part) else 1) + part
        return code
    return torch.as_tensor(key).flatten().long()


def predictability(top1, keys: dict, split: float = 0.5) -> dict[str, float]:
    """How often the expert is guessed right from each key alone.

    top1 [n] experts; keys {name: [n] ints, or a tuple of [n] ints for a combined key}. For each
    key: the most frequent expert of every key value on the first `split` of the tokens, applied
    to the rest (a key value unseen in the first part gets the overall busiest expert). The entry
    "no information" is the busiest expert's share (always guess it)."""
    top1 = torch.as_tensor(top1).flatten().long()
    n = len(top1)
    cut = int(n * split)
    if not 0 < cut < n:
        raise ValueError(f"split {split} leaves nothing to fit or to test on {n} tokens")
    n_experts = int(top1.max()) + 1
    fit, test = top1[:cut], top1[cut:]
    busiest = int(torch.bincount(fit, minlength=n_experts).argmax())
    out = {"no information": float((test == busiest).float().mean())}
    for name, key in keys.items():
        code = _codes(key)
        if len(code) != n:
            raise ValueError(f"key {name!r} has {len(code)} values for {n} tokens")
        n_values = int(code.max()) + 1
        table = torch.zeros(n_values, n_experts)
        table.index_put_((code[:cut], fit), torch.ones(cut), accumulate=True)
        guess = torch.where(table.sum(1) > 0, table.argmax(1), torch.full((n_values,), busiest))
        out[name] = float((guess[code[cut:]] == test).float().mean())
    return out


def repeat_rate(top1, positions, mask=None) -> tuple[float, float]:
    """(observed, chance): how often a token's expert equals the previous token's, over pairs of
    consecutive positions (positions [n] restart at each window), and Σ_e p_e² for the load p.
    mask [n] (optional): count only the pairs whose later token has mask True."""
    top1 = torch.as_tensor(top1).flatten()
    pos = torch.as_tensor(positions).flatten()
    pair = pos[1:] == pos[:-1] + 1
    if mask is not None:
        pair &= torch.as_tensor(mask).flatten()[1:].bool()
    observed = float((top1[1:] == top1[:-1])[pair].float().mean())
    p = torch.bincount(top1, minlength=int(top1.max()) + 1).float() / len(top1)
    return observed, float((p ** 2).sum())


def gate_variants(logits: torch.Tensor, top_k: int = 1) -> dict[str, torch.Tensor]:
    """Gates [n, k] of the chosen experts (top-k by raw logit) under three router designs:
    "llama4" sigmoid per expert, "mixtral" softmax over the chosen k, "softmax" softmax over all
    experts without renormalisation (Switch, OLMoE). See the module docstring."""
    check_int("top_k", top_k, 1)  # top_k=0 returned empty gates
    if top_k > logits.shape[-1]:
        raise ValueError(f"top_k={top_k}: must be at most the number of experts, {logits.shape[-1]} "
                         f"(logits of shape {tuple(logits.shape)})")
    logits = logits.float()
    top, _ = torch.topk(logits, top_k, dim=-1)
    return {
        "llama4": torch.sigmoid(top),  # s_i = σ(z_i), Llama 4
        "mixtral": torch.softmax(top, dim=-1),  # G(x) = softmax(TopK(z)), Mixtral §2.1
        "softmax": torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1).values,  # p_i(x), Switch eq. 1
    }


def context_shift(top1, token_ids, contexts, n_contexts: int, n_experts: int, min_count: int = 20) -> float:
    """How much the context (e.g. the domain) moves one token id to other experts: the total
    variation distance ½ Σ_e |share_a[e] - share_b[e]| between the expert shares of the same token
    id in two contexts a, b (0 = the same experts, 1 = disjoint ones), averaged over every token id
    and pair of contexts where both have at least `min_count` occurrences, weighted by the smaller
    count. NaN if no pair qualifies. top1, token_ids, contexts [n]."""
    top1 = torch.as_tensor(top1).flatten()
    ids = torch.as_tensor(token_ids).flatten()
    ctx = torch.as_tensor(contexts).flatten()
    total, weight = 0.0, 0.0
    for token in ids.unique().tolist():
        mask = ids == token
        counts = torch.bincount(ctx[mask], minlength=n_contexts)
        share = group_share(top1[mask], ctx[mask], n_contexts, n_experts)
        for a in range(n_contexts):
            for b in range(a + 1, n_contexts):
                w = float(min(counts[a], counts[b]))
                if w >= min_count:
                    total += w * 0.5 * float((share[a] - share[b]).abs().sum())  # total variation
                    weight += w
    return total / weight if weight else float("nan")


def same_token_contexts(trace: RouterTrace, layer: int, token_ids, contexts, token: int,
                        n_contexts: int) -> torch.Tensor:
    """share[c, e]: where one token id goes in each context (e.g. domain): rows are contexts
    0..n_contexts-1 (their tokens of id `token` only; a row with none is 0)."""
    ids = torch.as_tensor(token_ids).flatten()
    mask = ids == token
    top1 = trace.expert_ids(layer)[:, 0]
    return group_share(top1[mask], torch.as_tensor(contexts).flatten()[mask], n_contexts, trace.n_experts)


@torch.no_grad()
def time_dispatch(moe, x: torch.Tensor, repeats: int = 5) -> dict:
    """Run MoE._reference and MoE._fast of one MoE layer on the same tokens x [n, d]: their
    largest absolute difference and the best of `repeats` wall times (seconds) of each."""
    _, top_ids, gates = moe.route(x)
    ref, fast = moe._reference(x, top_ids, gates), moe._fast(x, top_ids, gates)
    times = {}
    for name, fn in (("reference", moe._reference), ("fast", moe._fast)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x, top_ids, gates)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return {"max_abs_diff": float((ref - fast).abs().max()), "max_abs_value": float(ref.abs().max()),
            "seconds": times, "tokens": x.shape[0], "experts_used": int(top_ids.unique().numel())}


@torch.no_grad()
def moe_inputs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The tokens x [n, d] that MoE layer `layer` receives (after its RMSNorm) when the model
    runs on ids [b, t] (n = b * t), captured with a forward pre-hook."""
    moe = next((m for m in model.modules() if isinstance(m, MoE) and m.layer == layer), None)
    if moe is None:
        raise ValueError(f"layer {layer} is not an MoE layer")
    captured = []
    handle = moe.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        model(ids.to(model.device))
    finally:
        handle.remove()
    return rearrange(captured[0], "w t d -> (w t) d")


@torch.no_grad()
def input_vs_output_gating(moe, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Llama 4 scales the chosen expert's INPUT by its gate s; a Mixtral-style router scales the
    OUTPUT. For tokens x [n, d] and their top-1 expert: gate s [n], the relative difference
    ||E(s x) - s E(x)|| / ||s E(x)|| [n], and the output norm ratio ||E(s x)|| / ||E(x)|| [n]
    (SwiGLU is not homogeneous: near zero it grows like s², so this ratio is not s)."""
    _, top_ids, gates = moe.route(x)
    e_of, s = top_ids[:, 0], gates[:, 0].float()
    gated_in, plain = torch.empty_like(x), torch.empty_like(x)
    for e in e_of.unique().tolist():
        rows = e_of == e
        gated_in[rows] = moe.experts.one(e, x[rows] * s[rows, None])  # E(s x), Llama 4
        plain[rows] = moe.experts.one(e, x[rows])  # E(x)
    gated_out = plain * s[:, None]  # s E(x), gate on the output
    return {"gate": s, "relative_difference": (gated_in - gated_out).norm(dim=-1) / gated_out.norm(dim=-1),
            "norm_ratio": gated_in.norm(dim=-1) / plain.norm(dim=-1)}


# ------------------------------------------------------------------------------ figures
def expert_share_heatmap(share, row_names: list[str], *, layer: int | None = None, what: str = "group",
                         counts=None) -> go.Figure:
    """share [g, e] (rows sum to 1, `group_share`) as a heatmap: rows are `row_names`, columns
    experts, with the uniform share 1/e in the title; optional counts [g] go in the row labels."""
    z = np.asarray(torch.as_tensor(share), dtype=float)
    g, n_experts = z.shape
    if len(row_names) != g:
        raise ValueError(f"{len(row_names)} row names for {g} rows of share")
    labels = list(row_names) if counts is None else [f"{r} ({int(c):,})" for r, c in zip(row_names, counts)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_experts)), y=labels, colorscale="Viridis", zmin=0,
        colorbar=dict(title="share", tickformat=".0%"), texttemplate="%{z:.0%}" if z.size <= 256 else None,
        hovertemplate="%{y} -> expert %{x}: %{z:.1%}<extra></extra>"))
    fig.update_xaxes(**_expert_axis(n_experts))
    fig.update_yaxes(autorange="reversed")
    where = f", layer {layer}" if layer is not None else ""
    return _style(fig, f"Share of each {what}'s tokens per expert{where} (uniform = {1 / n_experts:.0%})",
                  "expert", what, height=max(260, 120 + 34 * g))


def predictability_figure(results: dict[int, dict[str, float]]) -> go.Figure:
    """Grouped bars: for each MoE layer (x), how often each key guesses the expert
    (`predictability` per layer: {layer: {key: accuracy}})."""
    layers = list(results)
    keys = list(next(iter(results.values()))) if results else []
    fig = go.Figure([go.Bar(name=k, x=[f"layer {i}" for i in layers], y=[results[i][k] for i in layers],
                            text=[f"{results[i][k]:.0%}" for i in layers], textposition="outside",
                            hovertemplate=k + ", %{x}: %{y:.1%}<extra></extra>") for k in keys])
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05])
    return _style(fig, "How often the expert is guessed from one piece of information (held-out half)",
                  "MoE layer", "expert guessed right", barmode="group", height=380,
                  legend_title_text="guess from")


def gate_histogram(gates: dict[str, torch.Tensor], nbins: int = 40) -> go.Figure:
    """Overlaid histograms of the gate value each design would give the chosen expert
    (`gate_variants`), `nbins` equal bins on [0, 1] (the last one closed), counted here so the
    figure holds nbins numbers per design, not one per token."""
    check_int("nbins", nbins, 1)
    edges = np.linspace(0.0, 1.0, nbins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure([go.Bar(x=centres, y=np.histogram(np.asarray(v.flatten(), dtype=float), bins=edges)[0],
                            width=1 / nbins, name=k, opacity=0.6,
                            hovertemplate=k + ": %{y} tokens with gate near %{x:.3f}<extra></extra>")
                     for k, v in gates.items()])
    return _style(fig, "Gate of the chosen expert under three router designs (same logits)",
                  "gate value", "tokens", barmode="overlay", height=340, legend_title_text="router")


# ------------------------------------------------------------------------------ widget
@dataclass(repr=False, eq=False)
class SnippetExplorer(_Explorer):
    ui: widgets.VBox  # the controls, the coloured snippet and the plot
    text: widgets.Dropdown  # which snippet
    layer: widgets.Dropdown  # which MoE layer
    html: widgets.HTML  # the snippet coloured by top-1 expert, hover titles with router scores
    output: widgets.Output  # shows `figure`
    traces: dict  # snippet name -> RouterTrace of that snippet alone
    tokens: dict  # snippet name -> token strings
    figure: go.Figure | None = None  # the snippet's expert load in the chosen layer


def _refresh_snippet(ex: SnippetExplorer) -> None:
    trace, layer = ex.traces[ex.text.value], ex.layer.value
    ex.html.value = token_expert_html(ex.tokens[ex.text.value], trace.expert_ids(layer), n_experts=trace.n_experts,
                                      gates=trace.gates(layer), logits=trace.logits(layer),
                                      positions=trace.positions(), layer=layer)
    ex.figure = expert_load_bar(trace.load(layer), layer=layer,
                                title=f"{ex.text.value}: tokens per expert in layer {layer}")
    show_figure(ex.output, ex.figure)


@torch.no_grad()
def snippet_explorer(model, snippets: dict[str, list[int]], tokenizer=None) -> SnippetExplorer:
    """Two dropdowns, text and MoE layer: the chosen snippet coloured by each token's top-1
    expert in that layer (hover a token for its gate and router scores) and its load per expert.
    Each snippet is traced once, alone, when the explorer is built."""
    if not snippets:
        raise ValueError("no snippets to show")
    tok = tokenizer or ByteTokenizer()
    traces, tokens = {}, {}
    was_training = model.training
    model.eval()
    for name, ids in snippets.items():
        with RouterTrace(model) as trace:
            model(torch.tensor([list(ids)], device=model.device))
        traces[name], tokens[name] = trace, tok.token_strings(list(ids))
    model.train(was_training)
    layers = next(iter(traces.values())).moe_layers
    if not layers:
        raise ValueError("the model has no MoE layers to show")
    text = widgets.Dropdown(options=list(snippets), value=next(iter(snippets)), description="text")
    layer = widgets.Dropdown(options=[(f"layer {i}", i) for i in layers], value=layers[0], description="MoE layer")
    view, output = widgets.HTML(), widgets.Output()
    ex = SnippetExplorer(widgets.VBox([widgets.HBox([text, layer]), view, output]), text, layer, view, output,
                         traces, tokens)
    for control in (text, layer):
        control.observe(lambda _change: _refresh_snippet(ex), names="value")
    _refresh_snippet(ex)
    return ex

