"""The training step replayed from one CUDA graph (``vmambax train --cuda-graph``).

A training step launches several thousand kernels; a compiled step still waits on the host that
launches them. Replaying the whole step (forward, loss, backward, AdamW) from one CUDA graph removes
that wait: batch 8 at 512x512, bf16, compiled, on one H200 (commit eccf39e, `benchmarks/bench_model.py
--graph`, one call), 216-221 ms per step launched by the host against 200 ms replayed.

What it needs (``check_graph_step`` says which is missing): a CUDA device, one process (DDP's
gradient hooks are not captured here), bf16 or fp32 (fp16's GradScaler reads the gradients'
finiteness on the host every step), and one batch shape (the trainer crops to one size and drops an
epoch's last partial batch).

How: AdamW runs fused and capturable, with its learning rate a device tensor that the cosine
schedule fills in place (``make_capturable``); each batch is copied into static input buffers; the
first ``warmup`` steps run eagerly on a side stream (lazy initialisation, Triton and torch.compile
compiling), the next one is captured and then replayed, and so is every later one. A replay runs the
same kernels in the same order as an eager step, and a graph's random numbers (drop path) are drawn
from the same generator offsets, so the two give the same values; only the optimizer's scalars come
from device tensors instead of host numbers. One difference: an eager step checks the loss before
the backward, a replayed one after the whole step (the run stops either way, and the weights in
memory are not saved). If the capture fails (an op that syncs with the host), the reason is
logged and the run goes on with eager steps.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from vmambax.engine.common import autocast, seg_loss

log = logging.getLogger(__name__)

INPUTS = ("ct", "pet", "mask")


def check_graph_step(device: torch.device, dtype: torch.dtype | None, world: int) -> None:
    """Raise ValueError naming what keeps ``--cuda-graph`` from running here."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a CUDA device, got {device}")
    if world > 1:
        raise ValueError(f"cuda_graph: runs in one process, got {world} (torchrun); drop --cuda-graph for DDP")
    if dtype == torch.float16:
        raise ValueError("cuda_graph: fp16's GradScaler syncs with the host every step; use --amp bf16 or off")


def make_capturable(opt: torch.optim.Optimizer) -> None:
    """AdamW capturable, its learning rate a tensor on the parameters' device: the schedule then
    fills it in place (torch's schedulers do so for tensor learning rates) and a replay reads it."""
    for group in opt.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def portable_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with host-number learning rates and capturable off, so that a checkpoint
    resumes the same with or without ``--cuda-graph`` (make_capturable turns both back on)."""
    state = opt.state_dict()
    for group in state["param_groups"]:   # new dicts: the optimizer's own groups stay as they are
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
        group["capturable"] = False
    return state


def _release_generator(device: torch.device) -> None:
    """After a failed capture: torch (2.11) leaves the device's CUDA generator in capture mode when
    the capture ends in an error, and every later random op (drop path, dropout) then fails with
    "Offset increment outside graph capture". A clone of the generator's state keeps its seed and
    offset and is not capturing; the generator takes it in place."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    gen.graphsafe_set_state(gen.clone_state())


class GraphedTrainStep:
    """``step(batch) -> loss``: one optimizer step on ``batch`` (a dict of CPU or CUDA tensors ct,
    pet, mask, as the loader gives them), replayed from a CUDA graph after ``warmup`` eager steps.
    The returned loss is a 0-d tensor overwritten by the next step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                 dtype: torch.dtype | None, warmup: int = 3):
        self.model, self.opt, self.device, self.dtype, self.warmup = model, opt, device, dtype, warmup
        make_capturable(opt)
        self.side = torch.cuda.Stream(device)
        self.static: dict | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.steps = 0
        self.failed = False   # a capture failed: every later step runs eagerly
        self.held_bytes = 0   # device memory the captured graph holds (after the capture)

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    def _fill(self, batch: dict) -> None:
        if self.static is None:
            self.static = {k: torch.empty_like(batch[k], device=self.device) for k in INPUTS}
        for k in INPUTS:
            if batch[k].shape != self.static[k].shape:
                raise ValueError(f"cuda_graph: every batch must have the captured shape; {k} is "
                                 f"{tuple(batch[k].shape)}, the graph's {tuple(self.static[k].shape)}")
            self.static[k].copy_(batch[k], non_blocking=True)

    def _step(self) -> torch.Tensor:
        s = self.static
        with autocast(self.device, self.dtype):
            logits = self.model(s["ct"], s["pet"])
        loss = seg_loss(logits, s["mask"])
        loss.backward()
        self.opt.step()
        return loss

    def _eager(self) -> torch.Tensor:
        """One step on the current stream (after a failed capture)."""
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return self._step().detach()

    def _warmup(self) -> torch.Tensor:
        """One step on the side stream that the capture will use: the parameters' AccumulateGrad nodes
        remember the stream they were made on, and a capture that meets nodes made on another stream
        waits on it and is invalidated."""
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.stream(self.side):
            loss = self._step().detach()   # detached: no autograd node outlives the step
        current.wait_stream(self.side)
        self.steps += 1
        return loss

    def _capture(self) -> bool:
        """Capture the step (nothing runs yet); False, with the reason logged, where it fails."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        self.opt.zero_grad(set_to_none=True)   # backward then allocates .grad in the graph's pool
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread allocates pinned host memory and
            # queries events while the step is captured; the default ("global") lets those calls
            # invalidate the capture (batch 8 at 512 with workers did, every time, on an H200).
            with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
                self.loss = self._step().detach()
        except Exception as exc:  # an op that cannot be captured (one that syncs with the host)
            log.warning("cuda_graph: capturing the training step failed (%s: %s); the run goes on eagerly",
                        type(exc).__name__, exc)
            _release_generator(self.device)
            self.failed = True
            return False
        self.graph = graph
        # The graph's private pool keeps the step's memory; replays never meet the allocator, so
        # the trainer's later per-epoch peaks would leave it out. The peak of a step, held from now on.
        self.held_bytes = torch.cuda.max_memory_allocated(self.device)
        log.info("cuda_graph: the training step was captured after %d eager steps; it replays from now on",
                 self.steps)
        return True

    def __call__(self, batch: dict) -> torch.Tensor:
        self._fill(batch)
        if self.graph is None:
            if self.failed:
                return self._eager()
            if self.steps < self.warmup:
                return self._warmup()
            if not self._capture():
                return self._eager()
        self.graph.replay()
        self.steps += 1
        return self.loss
