"""vMambaX (SPEC.md section 3): dual-branch VMamba-T encoder with shared weights, CGM and DCIM fusion
at each of the 4 stages, CVSS decoder, 1x1 classifier.

Order (timm's): the dual-branch backbone, the model, checkpoint handling, constructors. Attribute
names mirror the published implementation (arco-group/vMambaX: ``backbone.vssm``,
``backbone.modal_fusion``, ``backbone.region_patch``, ``backbone.channel_attn_mamba``,
``decode_head``), so its state dicts load with no key remapping.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vmambax_kernels.modules import SS2D

from .decoder import FinalUpsampleX4, MambaDecoder, UpsampleExpand
from .encoder import VSSEncoder
from .fusion import CGM, RegionBlock, RegionStem, dcim

logger = logging.getLogger(__name__)

STRIDE = 32  # the encoder downsamples 32x: H and W must be multiples of it


def _cgm_backend(backend: str | None, cgm_backend: str | None) -> str | None:
    """CGM follows the scans' backend unless told otherwise; cgm_gate has no CUDA C++ kernel (its
    GPU implementation is the Triton one), so "cuda" for the scans means automatic for CGM."""
    if cgm_backend != "same":
        return cgm_backend
    return None if backend == "cuda" else backend


def set_backend(module: nn.Module, backend: str | None, cgm_backend: str | None = "same") -> nn.Module:
    """Every SS2D inside ``module`` (itself included) on ``backend``, every CGM on ``cgm_backend``; the
    decoder's upsamplings follow ``backend`` ("reference" keeps PyTorch's backward)."""
    cgm_backend = _cgm_backend(backend, cgm_backend)
    for m in module.modules():
        if isinstance(m, (SS2D, UpsampleExpand, FinalUpsampleX4)):
            m.backend = backend
        elif isinstance(m, CGM):
            m.backend = cgm_backend
    return module


class DualBackbone(nn.Module):
    """forward(ct, pet), (Bt, 3, H, W) each -> 4 fused features (Bt, dims[i], H / 2^(i+2), W / 2^(i+2)).

    One encoder (weights shared by the two modalities) runs once on both inputs stacked along the
    batch; per stage, CGM gates each modality with context from the other, then the two are summed
    with DCIM's output. With ``use_cgm``/``use_dcim`` off the modules still exist (as in the
    published model, so its checkpoints load either way) but are skipped.
    """

    def __init__(self, depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), d_state: int = 16,
                 drop_path_rate: float = 0.0, use_cgm: bool = True, use_dcim: bool = True,
                 cgm_reduction: int = 4, cgm_min_channel: int = 32, cgm_residual: bool = True,
                 backend: str | None = None, cgm_backend: str | None = "same"):
        super().__init__()
        self.use_cgm, self.use_dcim = use_cgm, use_dcim
        cgm_backend = _cgm_backend(backend, cgm_backend)
        self.vssm = VSSEncoder(3, depths, dims, d_state, drop_path_rate=drop_path_rate, backend=backend)
        self.modal_fusion = nn.ModuleList(
            CGM(d, cgm_reduction, cgm_min_channel, cgm_residual, backend=cgm_backend) for d in dims)
        self.channel_attn_mamba = nn.ModuleList(RegionBlock(d, d_state, backend=backend) for d in dims)
        self.region_patch = nn.ModuleList(RegionStem(d) for d in dims)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> list[torch.Tensor]:
        Bt = ct.shape[0]
        fused = []
        for i, feat in enumerate(self.vssm(torch.cat([ct, pet]))):
            f_ct, f_pet = feat[:Bt], feat[Bt:]
            if self.use_cgm:
                f_ct, f_pet = self.modal_fusion[i](f_ct, f_pet)
            out = f_ct + f_pet
            if self.use_dcim:  # the CT map gives DCIM's windows, the PET map its coarse context
                out = out + dcim(self.region_patch[i], self.channel_attn_mamba[i], f_ct, f_pet)
            fused.append(out)
        return fused


class VMambaX(nn.Module):
    """The vMambaX segmentation model (paper defaults: CGM and DCIM on; 53,403,682 parameters).

    Args:
        num_classes: output channels of the logits.
        depths, dims, d_state: the encoder (VMamba-T v0: 2-2-9-2, 96-192-384-768, 16).
        decoder_depth, decoder_d_state: CVSS blocks per decoder stage (4) and their state size (4).
        drop_path_rate, decoder_drop_path_rate: stochastic depth of encoder (0) and decoder (0.1).
        use_cgm, use_dcim: the two fusion modules (the published command line defaults them off).
        cgm_reduction, cgm_min_channel, cgm_residual: CGM's channel MLP width max(C / r, min) and
            its residual form Y = X * (1 + gate).
        backend: backend of every scan (None = automatic, "cuda", "triton", "reference").
        cgm_backend: backend of the CGM gates; "same" follows ``backend`` ("cuda" -> automatic:
            cgm_gate's GPU kernel is the Triton one). See ``set_backend``.

    forward(ct, pet): (Bt, 1 or 3, H, W) each, H and W multiples of 32 (1 channel is repeated to 3)
    -> logits (Bt, num_classes, H, W). Training needs Bt >= 2 per device (CGM's BatchNorm).
    """

    def __init__(self, num_classes: int = 1, depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), d_state: int = 16,
                 decoder_depth: int = 4, decoder_d_state: int = 4, drop_path_rate: float = 0.0,
                 decoder_drop_path_rate: float = 0.1, use_cgm: bool = True, use_dcim: bool = True,
                 cgm_reduction: int = 4, cgm_min_channel: int = 32, cgm_residual: bool = True,
                 backend: str | None = None, cgm_backend: str | None = "same"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.backbone = DualBackbone(depths, dims, d_state, drop_path_rate, use_cgm, use_dcim,
                                     cgm_reduction, cgm_min_channel, cgm_residual, backend, cgm_backend)
        self.decode_head = MambaDecoder(num_classes, dims, decoder_depth, decoder_d_state,
                                        decoder_drop_path_rate, backend=backend)

    def set_backend(self, backend: str | None, cgm_backend: str | None = "same") -> "VMambaX":
        """Run every scan on ``backend`` and every CGM gate on ``cgm_backend`` (as in __init__)."""
        return set_backend(self, backend, cgm_backend)

    @staticmethod
    def _check_inputs(ct, pet) -> None:
        for name, x in (("ct", ct), ("pet", pet)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
            if x.dim() != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"{name}: expected shape (Bt, 1 or 3, H, W), got {tuple(x.shape)}")
            H, W = x.shape[-2:]
            if H % STRIDE or W % STRIDE or H == 0 or W == 0:
                raise ValueError(f"{name}: expected H and W to be positive multiples of {STRIDE}, got {H}x{W}")
        if ct.shape[0] != pet.shape[0] or ct.shape[-2:] != pet.shape[-2:]:
            raise ValueError(f"pet: expected the batch size and size of ct ({ct.shape[0]}, {tuple(ct.shape[-2:])}), "
                             f"got ({pet.shape[0]}, {tuple(pet.shape[-2:])})")
        if ct.device != pet.device:
            raise ValueError(f"pet: expected device {ct.device} (the device of ct), got {pet.device}")
        if ct.dtype != pet.dtype:
            raise TypeError(f"pet: expected dtype {ct.dtype} (the dtype of ct), got {pet.dtype}")

    def forward_features(self, ct: torch.Tensor, pet: torch.Tensor) -> list[torch.Tensor]:
        self._check_inputs(ct, pet)
        ct, pet = ct.expand(-1, 3, -1, -1), pet.expand(-1, 3, -1, -1)  # 1 channel -> 3 (a view)
        return self.backbone(ct, pet)

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_head(feats)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(ct, pet))


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_filter_fn(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict inside a published checkpoint, keyed as ours (pure; no I/O).

    Accepts a raw state dict, ``{"model": sd}`` or a Lightning checkpoint (``{"state_dict": sd}``
    whose model keys start with ``model.``). Our module names are the published ones, so beyond
    unwrapping the container no key changes.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint: expected a dict (state dict or checkpoint), got {type(checkpoint).__name__}")
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        sd = checkpoint["state_dict"]
        if any(k.startswith("model.") for k in sd):  # Lightning: PETCTLightningModule.model
            return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        return dict(sd)
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return dict(checkpoint["model"])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise ValueError("checkpoint: expected a state dict, {'model': state_dict} or a Lightning checkpoint "
                     f"with 'state_dict'; got a dict with keys {sorted(checkpoint)[:8]}")


def _read_checkpoint(path) -> dict:
    # The one checkpoint reader (weights_only=True; errors name the file: missing, Git LFS pointer,
    # unreadable), imported late because the engine builds models from this module.
    from vmambax.engine.checkpoint import load
    path = os.fspath(path)
    obj = load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"path: expected a checkpoint dict in {path!r}, got {type(obj).__name__}")
    return obj


def _list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def from_reference_checkpoint(path_or_state_dict, **model_kwargs) -> VMambaX:
    """A ``VMambaX`` holding the weights of a checkpoint written by the published implementation.

    ``path_or_state_dict``: a path (loaded with ``weights_only=True``), a state dict, ``{"model": sd}``
    or a Lightning checkpoint dict. Loading is strict: every tensor of the checkpoint is used and
    every parameter and buffer of the model filled, else ValueError names the keys (a missing file:
    FileNotFoundError; an unreadable one: ``vmambax.engine.checkpoint.CheckpointError``, a
    ValueError). ``num_classes``
    is read from the checkpoint; ``model_kwargs`` go to ``VMambaX`` (e.g. ``use_cgm=False`` for a
    model trained without CGM, ``backend=``). Returned in eval mode, fp32, on the CPU.
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = _read_checkpoint(obj)
    sd = checkpoint_filter_fn(obj)
    head = sd.get("decode_head.output.weight")
    if isinstance(head, torch.Tensor) and "num_classes" not in model_kwargs:
        model_kwargs["num_classes"] = head.shape[0]
    with torch.device("meta"):  # no initialisation work: every tensor comes from the checkpoint
        model = VMambaX(**model_kwargs)
    own = model.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    if missing or unexpected:
        raise ValueError("state dict: expected exactly the published vMambaX keys; "
                         f"missing {len(missing)}: [{_list(missing)}]; "
                         f"unexpected {len(unexpected)}: [{_list(unexpected)}]")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"state dict: {len(wrong)} tensors have the wrong shape: {_list(wrong, 8)}")
    # copies, so the model never aliases the caller's tensors; floating tensors as float32
    sd = {k: v.to(device="cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for name, p in model.named_parameters():  # VMamba's marks, lost when parameters are assigned
        if name.endswith(("A_logs", "Ds")):
            p._no_weight_decay = True
    return model.eval()


# VMamba v0 classification checkpoints predate the names VMamba uses now (and vMambaX inherits);
# VMamba renames them on load the same way.
_V0_PREFIXES = (("patch_embed.proj.", "patch_embed.0."), ("patch_embed.norm.", "patch_embed.2."))


def _rename_v0(key: str) -> str:
    for old, new in _V0_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
    return key.replace(".ln_1.", ".norm.").replace(".self_attention.", ".op.")


@dataclass
class BackboneLoadReport:
    """What ``load_vmamba_backbone`` did: checkpoint keys used (renamed), skipped (with the reason),
    and encoder keys the checkpoint did not fill (left as they were)."""
    used: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def load_vmamba_backbone(model: nn.Module, path) -> BackboneLoadReport:
    """Load VMamba-T v0 ImageNet weights (``{"model": sd}``, e.g. vssmtiny_dp01_ckpt_epoch_292.pth)
    into the shared encoder of ``model`` (a VMambaX or its VSSEncoder). Old key names
    (``patch_embed.proj``, ``layers.i.blocks.j.ln_1``, ``self_attention``) are renamed as VMamba does;
    the classifier (``norm``, ``head``) and tensors of another shape are skipped. Logs and returns
    a report. Raises ValueError for a Git LFS pointer, a file that is not a checkpoint, or one
    that fills nothing of the encoder.
    """
    encoder = model.backbone.vssm if isinstance(model, VMambaX) else model
    if not isinstance(encoder, VSSEncoder):
        raise TypeError(f"model: expected a VMambaX or a VSSEncoder, got {type(model).__name__}")
    obj = _read_checkpoint(path)
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"path: expected a VMamba checkpoint {{'model': state_dict}} in {os.fspath(path)!r}, "
                         f"got a dict with keys {sorted(obj)[:8]}")
    own = encoder.state_dict()
    report, chosen = BackboneLoadReport(), {}
    for key, tensor in sd.items():
        new = _rename_v0(key)
        if new not in own:
            report.skipped[key] = "not part of the encoder (classifier or unknown)"
        elif tuple(tensor.shape) != tuple(own[new].shape):
            report.skipped[key] = f"shape {tuple(tensor.shape)} != encoder's {tuple(own[new].shape)}"
        else:
            chosen[new] = tensor
            report.used.append(key)
    if not chosen:
        raise ValueError(f"path: {os.fspath(path)!r} holds no tensor of the VMamba-T encoder "
                         f"(first keys: {_list(sd.keys(), 6)})")
    report.missing = sorted(own.keys() - chosen.keys())
    encoder.load_state_dict(chosen, strict=False)
    logger.info("VMamba backbone from %s: %d tensors used, %d skipped, %d encoder tensors not in the file",
                os.fspath(path), len(report.used), len(report.skipped), len(report.missing))
    if report.skipped:
        logger.info("skipped: %s", _list(report.skipped, 20))
    if report.missing:
        logger.info("not in the file (kept): %s", _list(report.missing, 20))
    return report


# ---------------------------------------------------------------------------------------------
# constructors


def vmambax_tiny(**kwargs) -> VMambaX:
    """The paper's model (VMamba-T v0 encoder, CGM + DCIM, CVSS decoder)."""
    return VMambaX(**kwargs)
