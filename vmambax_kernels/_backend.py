"""The one place that picks a backend: explicit argument, then $VMAMBAX_BACKEND, then the machine.

Each op names the modules that implement it; a backend module exposes ``availability()`` returning
``None`` when it can run here, or a sentence saying why not. Modules are imported lazily so a
missing Triton or extension only matters when that backend is asked for.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

BACKENDS = ("cuda", "triton", "reference")

# op -> backend -> module implementing it (relative to vmambax_kernels)
_IMPLS = {
    "selective_scan_2d": {
        "cuda": ".selective_scan.cuda",
        "triton": ".selective_scan.triton",
        "reference": ".selective_scan.reference",
    },
    "cgm_gate": {
        "triton": ".cgm.triton",
        "reference": ".cgm.reference",
    },
    "norm_gate": {
        "triton": ".norm_gate.triton",
        "reference": ".norm_gate.reference",
    },
    "dwconv_silu": {
        "triton": ".dwconv.triton",
        "reference": ".dwconv.reference",
    },
    "layer_norm": {
        "triton": ".layer_norm.triton",
        "reference": ".layer_norm.reference",
    },
    "up2_bilinear": {
        "triton": ".upsample.triton",
        "reference": ".upsample.reference",
    },
}

OPS = tuple(_IMPLS)


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _module(op: str, backend: str):
    return importlib.import_module(_IMPLS[op][backend], __package__)


def _status(op: str, backend: str) -> BackendStatus:
    if backend not in _IMPLS[op]:
        return BackendStatus(False, f"no {backend} implementation of {op}")
    try:
        mod = _module(op, backend)
    except ImportError as exc:
        return BackendStatus(False, f"{backend} backend cannot be imported: {exc}")
    why = mod.availability()
    return BackendStatus(why is None, why or "available")


def available_backends(op: str = "selective_scan_2d") -> dict[str, BackendStatus]:
    """What this install can run for ``op`` (a key of _IMPLS: "selective_scan_2d", "cgm_gate",
    "norm_gate", "dwconv_silu", "layer_norm", "up2_bilinear"), and why not.

    >>> {k: s.available for k, s in available_backends().items()}  # doctest: +SKIP
    {'cuda': False, 'triton': False, 'reference': True}
    """
    if op not in _IMPLS:
        raise ValueError(f"op: expected one of {sorted(_IMPLS)}, got {op!r}")
    return {b: _status(op, b) for b in BACKENDS}


def _runs_on(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` (None if it can)."""
    if backend == "reference":
        return None
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}"
    return None


def resolve(op: str, requested: str | None, device: torch.device):
    """Return the backend module to run ``op`` on ``device``. Raises with the reason if impossible."""
    name = _choose(op, requested, device.type)
    return _LOADED[(op, name)]


_LOADED: dict = {}
_ALL_LOADED = False


def _load_all() -> None:
    # Every importable implementation is loaded together, once: under torch.compile, Dynamo
    # snapshots _LOADED at its first lookup in a graph, so an entry added later (the CGM gate's,
    # after the scan's) was missing in the traced copy (KeyError, seen compiling the whole model).
    global _ALL_LOADED
    if _ALL_LOADED:
        return
    _ALL_LOADED = True
    for op, impls in _IMPLS.items():
        for backend in impls:
            if (op, backend) not in _LOADED:
                try:
                    _LOADED[(op, backend)] = _module(op, backend)
                except ImportError:
                    pass


# Evaluated once at trace time under torch.compile (its result is a constant string), so the
# importlib/environment work here never enters a compiled graph.
@torch.compiler.assume_constant_result
def _choose(op: str, requested: str | None, device_type: str) -> str:
    device = torch.device(device_type)
    source = "backend argument"
    if requested is None and os.environ.get("VMAMBAX_BACKEND"):
        requested, source = os.environ["VMAMBAX_BACKEND"], "VMAMBAX_BACKEND"
        # The variable sets every op at once; an op with no such implementation (cgm_gate has no
        # CUDA C++ kernel) keeps the automatic choice, as the model does for backend="cuda". A
        # training run with VMAMBAX_BACKEND=cuda failed on the CGM gate before this.
        if requested in BACKENDS and requested not in _IMPLS[op]:
            requested = None
    chosen = None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}: expected one of {BACKENDS} or None, got {requested!r}")
        status = _status(op, requested)
        why = status.reason if not status.available else _runs_on(requested, device)
        if why is not None:
            raise RuntimeError(f"{op}: {source} asks for {requested!r}, which cannot run here: {why}")
        chosen = requested
    else:
        for backend in BACKENDS:  # fastest first
            if backend == "triton" and device.type != "cuda":
                continue  # the interpreter is for tests, never an automatic choice
            if _runs_on(backend, device) is None and _status(op, backend).available:
                chosen = backend
                break
    _load_all()
    _LOADED[(op, chosen)] = _module(op, chosen)  # raises here if the chosen one failed to import
    return chosen
