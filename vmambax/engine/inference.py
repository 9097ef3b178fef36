"""The inference forward of evaluation and prediction: padded, under autocast, replayed from CUDA graphs.

An inference batch launches a few thousand kernels. Where the host launches them more slowly than
the GPU runs them, replaying them from a CUDA graph pays: batch 8 at 512x512, bf16, on an H200
(commit 626c9e3, `benchmarks/bench_model.py --graph`), 96.3 ms eager against 65.9 ms replayed in
the same run; on hosts that keep up it saves a few per cent. A graph replays the same kernels on the
same buffers, so its logits are those of the eager forward.

With ``compile``, the model goes through ``torch.compile`` first (Inductor fuses the glue between
the custom ops), and the graphs replay the compiled forward: batch 8 at 512x512, bf16, on H200s
(commits 9fed3de and 379d030, `bench_model.py --infer-only`), 70.9 ms eager, 66.1 ms replayed from a
graph, 59.0 ms compiled and 55.8 ms compiled and replayed, after about a minute of compiling, so it
pays on a dataset, not on a few slices. Each new input size compiles again; a batch smaller than
one already compiled at its image size (a split's last) runs padded to it instead. If compiling
fails (e.g. no C++ compiler for Inductor on a CPU), the reason is logged and the model runs
uncompiled.

A shape is captured the second time it is seen (a one-off shape, e.g. one odd-sized PNG, stays eager:
a capture costs two forwards), and at most ``max_graphs`` graphs are kept (each holds its own
memory pool; a split's last, smaller batch is the usual second shape). If a capture fails, the
reason is logged and the rest of the run is eager.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import torch
from torch import nn

from vmambax.engine.common import forward_padded

log = logging.getLogger(__name__)


class InferenceForward:
    """``forward_padded(model, ct, pet)`` under autocast in ``dtype`` (None: fp32), no gradients;
    on a CUDA device with ``graphs``, replayed from CUDA graphs; with ``compile`` (True: Inductor, or
    a ``torch.compile`` backend), through ``torch.compile``. Returns a tensor the caller owns."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None,
                 graphs: bool = True, max_graphs: int = 2, compile=False):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        # dynamic=False: a new shape compiles anew rather than into slower shape-generic kernels
        self.net = torch.compile(model, backend="inductor" if compile is True else compile,
                                 dynamic=False) if compile else model
        self._compile_checked = not compile
        self._batch: dict = {}   # image size -> the largest batch compiled for it
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.max_graphs = max_graphs
        self._seen: Counter = Counter()
        self._cache: OrderedDict = OrderedDict()   # key -> (graph, static ct, static pet, static logits)

    @property
    def replaying(self) -> bool:
        """Whether graphs are in use: a shape was captured (and no capture failed)."""
        return bool(self._cache)

    @property
    def compiled(self) -> bool:
        """Whether the forward runs through torch.compile (asked for, and compiling did not fail)."""
        return self.net is not self.model

    def _eager(self, ct, pet):
        if self._compile_checked:
            return self._forward(ct, pet)
        log.info("compiling the model's forward with torch.compile (about a minute on a GPU, again for "
                 "each new input size)")
        try:   # the first call compiles: where a missing compiler or an unsupported op shows
            out = self._forward(ct, pet)
        except Exception as exc:
            log.warning("torch.compile failed (%s: %s); inference runs uncompiled", type(exc).__name__, exc)
            self.net = self.model
            out = self._forward(ct, pet)
        self._compile_checked = True
        return out

    @torch.no_grad()
    def __call__(self, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self._run(ct, pet)
        # Compiled, a batch smaller than one seen at this image size (a split's or a volume's last)
        # runs padded to that size: another batch size would compile again (about a minute) and
        # take a graph of its own. Samples do not interact in the eval-mode model.
        n, size = ct.shape[0], (tuple(ct.shape[1:]), tuple(pet.shape[1:]))
        full = self._batch.get(size, 0)
        if n >= full:
            self._batch[size] = n
            return self._run(ct, pet)
        pad = lambda x: torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))])  # noqa: E731
        return self._run(pad(ct), pad(pet))[:n]

    def _run(self, ct, pet):
        if not self.graphs:
            return self._eager(ct, pet)
        key = (tuple(ct.shape), tuple(pet.shape), ct.dtype, pet.dtype)
        entry = self._cache.get(key)
        if entry is None:
            self._seen[key] += 1
            if self._seen[key] < 2:
                return self._eager(ct, pet)
            try:
                entry = self._capture(ct, pet)
            except Exception as exc:  # an op that cannot be captured: stay correct, stay eager
                log.warning("CUDA graph capture failed (%s: %s); inference runs eagerly", type(exc).__name__, exc)
                self.graphs = False
                self._cache.clear()
                return self._eager(ct, pet)
            self._cache[key] = entry
            while len(self._cache) > self.max_graphs:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        graph, s_ct, s_pet, s_out = entry
        s_ct.copy_(ct)
        s_pet.copy_(pet)
        graph.replay()
        return s_out.clone()

    def _forward(self, ct, pet):
        # autocast's weight cache off: the cast weights must be a graph's own buffers, not a cache
        # that autocast frees on exit (torch.cuda.make_graphed_callables asks the same); the eager
        # calls too, so that torch.compile sees one autocast state (the same values either way)
        if self.dtype is None:
            return forward_padded(self.net, ct, pet)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=False):
            return forward_padded(self.net, ct, pet)

    def _capture(self, ct, pet):
        s_ct, s_pet = ct.clone(), pet.clone()
        # warm-up on a side stream, as capture requires (lazy initialisation, Triton compiles)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(s_ct, s_pet)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = self._forward(s_ct, s_pet)
        return graph, s_ct, s_pet, s_out
