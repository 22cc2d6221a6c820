"""Decode steps with static shapes and no host sync, optionally replayed as a CUDA graph.

Eager decode (`generate`'s default off CUDA) runs the ordinary forward for each new token. On a
GPU at batch 1 that is slow for reasons that have nothing to do with arithmetic: Python launches
a couple of thousand small kernels per token, and the MoE dispatch (without the W4A16 kernel)
and the id check ask the host for values: a device-to-host sync each (the eager KV cache update
asked too, once per layer, until 2026-11-28). Measured on an H100 80GB with full Scout in int4: about 10 ms of
GPU work per token, but eager decode ran at 8-9 tokens/s; the replayed graph below at 97
(docs/benchmarks.md).

A `DecodeStep` runs one token per sequence in a form whose kernels and shapes never change:
  * the position is a device tensor; the RoPE angles and the NoPE temperature are computed from
    it on the device;
  * the KV cache is written in place (slot = position % slots: a ring of one chunk for chunked
    layers, position p in slot p for full-attention layers), and attention reads the whole
    static buffer, with empty slots (position -1), future positions and other chunks masked;
  * the MoE layers use the "gather" dispatch (moe.py): the router's choice stays on the device
    and the chosen experts' weights are gathered by index.
So the step can be captured once in a CUDA graph and replayed (torch.cuda.CUDAGraph): one launch
per token instead of hundreds. Sampling stays outside the graph, on the device.

    step = DecodeStep(model, cache, graph=True)   # after a prefill has filled `cache`
    logits = step(next_ids)                        # [b, 1] -> [b, v]; cache.length += 1

With a RouterTrace active, the MoE layers copy their router outputs into fixed device buffers
inside the step (a graph can record copies, not host reads: a second graph is captured for
traced steps), and after the step the buffers go to the trace in three host copies.

Checks: the step refuses ids that are not an integer tensor of shape [b, 1] before doing anything.
It checks their range (0 <= id < vocab_size) only when they are on the CPU: on a GPU that would be a
host sync every token. generate() feeds it sampled ids, which are in range by construction.

Simplifications: full-attention layers attend over all `max_len` slots of the cache (masked)
rather than the filled ones, so off CUDA a cache much longer than the context costs attention
reads (on CUDA fused.decode_attention skips blocks with no visible key).

Axes: b batch, v vocab.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

from .layers import rope_angles, rope_inv_freq
from .moe import MoE

DECODE_MODES = ("eager", "static", "graph")
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def host_reads():
    """Count the times Python reads a tensor's value while the block runs (.item(), .tolist(),
    bool(), int(), float(), index use); yields a Counter by method. On a GPU each read is a
    device-to-host sync: Python waits for the queue to drain, then launches the next kernel, and
    a CUDA graph cannot be captured across it. (Reads inside torch's own C++ ops, such as
    `unique`, are not counted here; torch.cuda.set_sync_debug_mode shows those on a GPU.)"""
    counts, originals = Counter(), {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        for name, original in originals.items():  # put back exactly what was there (or inherited)
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


class _DeviceRecorder:
    """Stands in for the RouterTrace inside a decode step: each MoE layer's router logits, chosen
    experts and gates are copied into fixed device buffers, and `flush` hands them to the trace."""

    def __init__(self, moes: list, rows: int, device):
        self.index = {m.layer: i for i, m in enumerate(moes)}
        layers, experts, k = len(moes), moes[0].n_experts, moes[0].top_k
        self.logits = torch.zeros(layers, rows, experts, dtype=torch.float32, device=device)
        self.ids = torch.zeros(layers, rows, k, dtype=torch.long, device=device)
        self.gates = torch.zeros(layers, rows, k, dtype=torch.float32, device=device)

    def record(self, layer: int, logits: torch.Tensor, top_ids: torch.Tensor, gates: torch.Tensor) -> None:
        i = self.index[layer]
        self.logits[i].copy_(logits)
        self.ids[i].copy_(top_ids)
        self.gates[i].copy_(gates)

    def flush(self, trace) -> None:
        """Three device-to-host copies for all layers, then the trace's usual per-layer record."""
        # copies even on the CPU: the trace keeps what it is given, and the next step overwrites the buffers
        logits, ids, gates = (t.to("cpu", copy=True) for t in (self.logits, self.ids, self.gates))
        for layer, i in self.index.items():
            trace.record(layer, logits[i], ids[i], gates[i])


class DecodeStep:
    """One-token decode steps on a filled KV cache; `graph=True` replays a CUDA graph (CUDA only)."""

    def __init__(self, model, cache, graph: bool = False):
        self.text = model.language_model if hasattr(model, "language_model") else model
        self.text.check_cache(cache)
        device = self.text.device
        if graph and device.type != "cuda":
            raise ValueError(f"decode='graph' needs the model on a CUDA device; it is on {device} "
                             f"(decode='static' runs the same step without a graph)")
        self.cache, self.use_graph = cache, graph
        self.inv_freq = rope_inv_freq(self.text.cfg, device)
        # the step's inputs live in fixed device buffers: a replayed graph reads them from there
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = {}  # traced (bool) -> (CUDA graph, its logits buffer), captured on first use
        self.moes = [m for m in self.text.modules() if isinstance(m, MoE)]
        self.recorder = _DeviceRecorder(self.moes, cache.batch, device) if self.moes else None

    def _check_ids(self, ids) -> None:
        """Integer ids of the step's shape; their range too, but only on the CPU (no sync there)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            got = f"dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else repr(ids)
            raise TypeError(f"a decode step takes integer token ids (a torch.long tensor), got {got}")
        if tuple(ids.shape) != tuple(self.ids.shape):
            raise ValueError(f"a decode step takes ids of shape {tuple(self.ids.shape)}, got {tuple(ids.shape)}")
        if ids.device.type == "cpu":
            # read through numpy: a CPU tensor's value costs no device sync, and host_reads (which
            # stands in for syncs in the CPU tests) should count none here
            values = ids.detach().numpy()
            bad = values[(values < 0) | (values >= self.text.cfg.vocab_size)]
            if bad.size:
                raise ValueError(f"token id {int(bad[0])} is out of range for vocab_size={self.text.cfg.vocab_size}")

    def _forward(self) -> torch.Tensor:
        text = self.text
        h = text.model.embed_tokens(self.ids)
        freqs_cis = rope_angles(self.pos, self.inv_freq)
        for layer in text.model.layers:
            h = layer(h, self.pos, freqs_cis, self.cache)
        return text.lm_head(text.model.norm(h))[:, -1]

    @contextmanager
    def _static(self, traced: bool):
        """For this step only: the cache writes in place, the MoE layers gather, and with a trace
        they record into the device buffers instead of the trace."""
        previous = [(m.dispatch, m.trace) for m in self.moes]
        self.cache.static = True
        for m in self.moes:
            m.dispatch = "gather"
            m.trace = self.recorder if traced else None
        try:
            yield
        finally:
            self.cache.static = False
            for m, (mode, trace) in zip(self.moes, previous):
                m.dispatch, m.trace = mode, trace

    def _capture(self, traced: bool) -> torch.Tensor:
        """Run the step once for real on a side stream (warm-up: lazy kernel layouts, cuBLAS
        workspaces, kernel choices), then record it. Recording launches nothing, so the cache
        (and the trace buffers) see one step."""
        side = torch.cuda.Stream(device=self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):
            logits = self._forward()
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward()
        self.graphs[traced] = (graph, out)
        return logits

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, 1] (device tensor, e.g. the last sampled tokens) -> next-token logits [b, v]."""
        self._check_ids(ids)
        self.cache.check_room(1, ids.shape[0])
        self.ids.copy_(ids)
        self.pos.fill_(self.cache.length)  # a device-side fill: no sync
        trace = self.text.trace
        traced = trace is not None and self.recorder is not None
        if trace is not None:
            # copies: on the CPU the trace would otherwise keep views of buffers the next step overwrites
            trace.begin(self.ids.clone(), self.pos.clone(), torch.zeros_like(self.ids, dtype=torch.bool))
        with self._static(traced):
            if not self.use_graph:
                logits = self._forward()
            elif traced not in self.graphs:
                logits = self._capture(traced)
            else:
                graph, out = self.graphs[traced]
                graph.replay()
                logits = out.clone()  # the graph's output buffer is reused by the next replay
        if traced:
            self.recorder.flush(trace)
        self.cache.length += 1
        return logits
