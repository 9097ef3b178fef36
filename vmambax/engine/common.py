"""Shared by training, evaluation and prediction: devices, mixed precision, padded inference, losses."""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from vmambax.data.transforms import BACKGROUND

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
MULTIPLE = 32  # the model's H and W must be multiples of 32 (SPEC.md section 3)


def pick_device(device: str | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but torch.cuda.is_available() is False")
    return dev


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32). 'auto' is bf16 on a GPU that
    supports it, else fp32 (CPU autocast is slower than fp32 on most CPUs)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp: expected one of {AMP_CHOICES}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    """PyTorch's deterministic algorithms (cuDNN's and cuBLAS's included; a warning where an op has
    none) inside the block, and torch's process-wide switches as they were after it: a caller in
    the same process (a notebook, the next test) must not inherit them."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def check_writable(folder: str, what: str = "out"):
    """Create ``folder`` and prove it writable before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
        # a probe of its own per call: torchrun's processes check the same folder at once, and with
        # one shared name one process removed the file another was about to remove (CI, 2 ranks)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".vmambax-write-test-") as f:
            f.write("ok")
    except OSError as exc:
        raise ValueError(f"{what}: cannot write to the output folder {folder}: {exc.strerror or exc}") from None


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def forward_padded(model: nn.Module, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
    """Logits for inputs of any size: pad bottom/right with background to a multiple of 32, crop back."""
    H, W = ct.shape[-2:]
    ph, pw = (-H) % MULTIPLE, (-W) % MULTIPLE
    if ph or pw:
        ct = F.pad(ct, (0, pw, 0, ph), value=BACKGROUND)
        pet = F.pad(pet, (0, pw, 0, ph), value=BACKGROUND)
    return model(ct, pet)[..., :H, :W]


def seg_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per sample, smoothed by 1), computed in fp32."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    p = torch.sigmoid(logits)
    inter = (p * mask).sum((1, 2, 3))
    dice = (2 * inter + 1) / (p.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def same_size_batches(ds, indices: list[int], batch_size: int):
    """Items of ``ds`` in order, in batches of at most ``batch_size`` that share one image size
    (a split may mix sizes; a batch cannot)."""
    batch = []
    for i in indices:
        it = ds[i]
        if batch and (len(batch) == batch_size or batch[0]["ct"].shape != it["ct"].shape):
            yield batch
            batch = []
        batch.append(it)
    if batch:
        yield batch
