"""Checkpoints: written atomically, read with ``weights_only=True``, rebuilt from their model spec.

A training checkpoint is a dict of plain types and tensors: ``format``, ``version``, ``model_spec``
(``{"name", "kwargs"}``, how to rebuild the model), ``model`` (state dict), and for resuming
``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``best``, ``history``, ``config``, ``rng``.
A checkpoint of the published implementation is accepted where only weights are needed.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT, VERSION = "vmambax-checkpoint", 1
DEFAULT_MODEL = "VMambaX"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def register_model(name: str, factory: Callable[..., nn.Module]):
    """Make ``factory(**kwargs)`` buildable from a checkpoint's ``model_spec`` named ``name``."""
    _REGISTRY[name] = factory


def build_model(spec: dict) -> nn.Module:
    name, kwargs = spec.get("name", DEFAULT_MODEL), dict(spec.get("kwargs", {}))
    if name == DEFAULT_MODEL and name not in _REGISTRY:
        from vmambax.models import VMambaX  # imported late: the model pulls in the kernels
        register_model(DEFAULT_MODEL, VMambaX)
    if name in ("tiny", "tiny_plain") and name not in _REGISTRY:
        import vmambax.utils.tiny  # noqa: F401  the engine's test model registers itself
    if name not in _REGISTRY:
        raise CheckpointError(f"model_spec: unknown model {name!r}; known: {sorted(_REGISTRY) or [DEFAULT_MODEL]}")
    return _REGISTRY[name](**kwargs)


def save_atomic(obj, path: str):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a kill at any
    moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> dict:
    """torch.load(weights_only=True) on CPU, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"checkpoint {path} is a Git LFS pointer, not the weights: "
                              "fetch the file with git lfs pull")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  corrupt bytes fail wherever the unpickler trips (IndexError
        # on an empty stack, struct.error, UnicodeDecodeError, ...; a random-bytes test hit IndexError)
        raise CheckpointError(f"checkpoint {path} cannot be read as a PyTorch checkpoint "
                              f"(corrupt, truncated, or holding more than weights): {exc}. If it is a "
                              "checkpoint you trust that pickles other objects, load it yourself and "
                              "pass its state dict") from None


def is_ours(ckpt) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def load_weights(model: nn.Module, state: dict, path: str):
    """Strict load; a mismatch is reported as a checkpoint of another model."""
    missing, unexpected = _diff(model.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} holds a different model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        why = str(exc).splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} holds a different model: {why}") from None


def _diff(ref: dict, state: dict):
    return sorted(set(ref) - set(state)), sorted(set(state) - set(ref))


def load_model(path: str) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint (ours, or the published implementation's) in eval mode.
    Returns ``(model, ckpt)`` where ``ckpt`` is our checkpoint dict (``{}`` for a published one)."""
    ckpt = load(path)
    if is_ours(ckpt):
        if ckpt.get("version", 0) > VERSION:
            raise CheckpointError(f"checkpoint {path}: version {ckpt['version']} is newer than this "
                                  f"vmambax reads ({VERSION})")
        model = build_model(ckpt["model_spec"])
        load_weights(model, ckpt["model"], path)
        return model.eval(), ckpt
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict of weights, got {type(ckpt).__name__}")
    try:
        from vmambax.models import from_reference_checkpoint
        model = from_reference_checkpoint(ckpt)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is neither a vmambax training checkpoint nor a checkpoint "
                              f"of the published vMambaX: {exc}") from None
    return model.eval(), {}


def init_weights(model: nn.Module, path: str):
    """Start training from the weights of ``path`` (ours or the published implementation's)."""
    ckpt = load(path)
    if is_ours(ckpt):
        load_weights(model, ckpt["model"], path)
    else:
        ref, _ = load_model(path)
        load_weights(model, ref.state_dict(), path)
    log.info("initialised the model from %s", path)
