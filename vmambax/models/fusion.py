"""Cross-modal fusion of vMambaX: CGM (context-gated cross-modal perception) and DCIM (the region
Mamba that scans 4x4 windows of one modality and a coarse map of the other).

Module and parameter names follow the published ``ContextGatingModule``, ``Stem`` and
``Region_global_Block`` so their state-dict keys are ours too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmambax_kernels import cgm_gate
from vmambax_kernels.cgm import module_triton as cgm_module_triton
from vmambax_kernels.modules import SS2D

from .layers import cast_norm

WINDOW = 4  # DCIM windows are 4x4 positions ("visual words") of each stage's map


def _channel_mlp(dim: int, hidden: int) -> nn.Sequential:
    # GAP(cat) -> conv1x1 -> BN -> GELU -> conv1x1; the sigmoid is applied by the caller
    return nn.Sequential(nn.Conv2d(2 * dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
                         nn.Conv2d(hidden, dim, 1, bias=True))


class CGM(nn.Module):
    """Context-gated cross-modal perception (SPEC.md section 2), one per encoder stage.

    forward(x_ct, x_pet) with (Bt, C, H, W) each -> (y_ct, y_pet), same shapes.
    The channel MLP runs in PyTorch; both spatial 3x3 gates and the gating run in ``cgm_gate``.
    When the gate runs on Triton, the whole module runs in Triton launches instead
    (``vmambax_kernels.cgm.module_triton``: same parameters, buffers and results by STYLE.md's
    rule), except for SyncBatchNorm and the other cases its ``supported`` names.
    ``*_rgb`` names are the published ones for the CT branch.
    """

    def __init__(self, dim: int, reduction: int = 4, min_channel: int = 32, residual: bool = True,
                 backend: str | None = None):
        super().__init__()
        hidden = max(dim // max(reduction, 1), min_channel)
        self.residual, self.backend = residual, backend
        self.channel_gate_rgb = _channel_mlp(dim, hidden)
        self.channel_gate_pet = _channel_mlp(dim, hidden)
        # Sequentials of one conv keep the published keys (spatial_gate_*.0.weight); only the
        # weights are used, the convolution itself runs inside cgm_gate.
        self.spatial_gate_rgb = nn.Sequential(nn.Conv2d(2 * dim, 1, 3, padding=1, bias=False))
        self.spatial_gate_pet = nn.Sequential(nn.Conv2d(2 * dim, 1, 3, padding=1, bias=False))

    def forward(self, x_ct: torch.Tensor, x_pet: torch.Tensor):
        bn = self.channel_gate_rgb[1]
        if self.training and x_ct.shape[0] == 1 and not isinstance(bn, nn.SyncBatchNorm):
            raise ValueError("batch: CGM's channel gate has a BatchNorm over pooled features, so training "
                             "needs at least 2 samples per device (or SyncBatchNorm across devices); "
                             f"got batch size {x_ct.shape[0]}")
        if cgm_module_triton.supported(
                self.backend, x_ct, x_pet, self.channel_gate_rgb, self.channel_gate_pet) is None:
            # the whole module as one autograd node, a few launches each way (the PyTorch MLPs
            # below are 38 ATen ops per forward + backward: host-bound at every stage size)
            return cgm_module_triton.cgm_module(x_ct, x_pet, self.channel_gate_rgb, self.channel_gate_pet,
                                                self.spatial_gate_rgb[0].weight, self.spatial_gate_pet[0].weight,
                                                self.residual)
        # (Bt, C, 1, 1), in the MLP's dtype: 16-bit inputs outside autocast (autocast's convs cast back)
        wdt = self.channel_gate_rgb[0].weight.dtype
        p_ct, p_pet = x_ct.mean((2, 3), keepdim=True).to(wdt), x_pet.mean((2, 3), keepdim=True).to(wdt)
        # each gate sees cat([other, self]), so GAP(cat) = cat of the two pooled means
        c_ct = torch.sigmoid(self.channel_gate_rgb(torch.cat([p_pet, p_ct], 1))).flatten(1)   # (Bt, C)
        c_pet = torch.sigmoid(self.channel_gate_pet(torch.cat([p_ct, p_pet], 1))).flatten(1)
        return cgm_gate(x_ct, x_pet, c_ct, c_pet,
                        self.spatial_gate_rgb[0].weight, self.spatial_gate_pet[0].weight,
                        residual=self.residual, backend=self.backend)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1):
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class RegionStem(nn.Module):
    """DCIM's stem. forward(x_ct, x_pet), (Bt, C, H, W) each with H, W multiples of 4 ->
    inner (Bt*nwin, 4, 4, C): the CT map's 4x4 windows after two convs, windows in row-major order;
    outer (Bt, H/4, W/4, C): the PET map through a conv stack that downsamples 4x."""

    def __init__(self, dim: int):
        super().__init__()
        self.inner_convs = nn.Sequential(*_conv_bn_relu(dim, dim // 4), *_conv_bn_relu(dim // 4, dim))
        self.outer_convs = nn.Sequential(*_conv_bn_relu(dim, dim // 16), *_conv_bn_relu(dim // 16, dim // 8, 2),
                                         *_conv_bn_relu(dim // 8, dim // 4, 2), *_conv_bn_relu(dim // 4, dim))

    def forward(self, x_ct: torch.Tensor, x_pet: torch.Tensor):
        Bt, C, H, W = x_ct.shape
        Hg, Wg = H // WINDOW, W // WINDOW
        inner = self.inner_convs(x_ct).view(Bt, C, Hg, WINDOW, Wg, WINDOW)
        inner = inner.permute(0, 2, 4, 3, 5, 1)                    # (Bt, Hg, Wg, 4, 4, C)
        inner = inner.reshape(Bt * Hg * Wg, WINDOW, WINDOW, C)
        outer = self.outer_convs(x_pet).permute(0, 2, 3, 1)        # (Bt, C, Hg, Wg) -> (Bt, Hg, Wg, C)
        return inner, outer


class RegionBlock(nn.Module):
    """DCIM's region Mamba. forward(inner (Bt*nwin, 4, 4, C), outer (Bt, Hg, Wg, C)) -> (Bt, C, 4Hg, 4Wg).

    The outer map gets one SS2D pass; every window gets its own 4x4 SS2D pass, all windows in one
    call (Bt*nwin planes); each window's LayerNorm spans its 16 positions x C channels, as published.
    """

    def __init__(self, dim: int, d_state: int = 16, norm_layer=None, backend: str | None = None):
        super().__init__()
        # both norms feed only their SS2D's in_proj (the window's: over its rows of 16 C values)
        self.inner_norm1 = cast_norm(norm_layer, WINDOW * WINDOW * dim)
        self.inner_attn = SS2D(dim, d_state=d_state, backend=backend)
        self.outer_norm1 = cast_norm(norm_layer, dim)
        self.outer_attn = SS2D(dim, d_state=d_state, backend=backend)

    def forward(self, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
        Bt, Hg, Wg, C = outer.shape
        outer = outer + self.outer_attn(self.outer_norm1(outer))
        normed = self.inner_norm1(inner.reshape(-1, WINDOW * WINDOW * C)).view_as(inner)
        x = inner + self.inner_attn(normed) + outer.reshape(-1, 1, 1, C)   # (Bt*nwin, 4, 4, C)
        x = x.view(Bt, Hg, Wg, WINDOW, WINDOW, C).permute(0, 5, 1, 3, 2, 4)  # (Bt, C, Hg, 4, Wg, 4)
        return x.reshape(Bt, C, Hg * WINDOW, Wg * WINDOW)


def dcim(stem: RegionStem, block: RegionBlock, x_ct: torch.Tensor, x_pet: torch.Tensor) -> torch.Tensor:
    """DCIM at one stage: (Bt, C, H, W) each -> (Bt, C, H, W). Maps whose sides are not multiples of
    4 are zero-padded at the bottom and right and the result cropped back (SPEC.md section 3); the
    published code only takes multiples of 4 (and square maps: it reshapes with H and W swapped)."""
    H, W = x_ct.shape[-2:]
    ph, pw = -H % WINDOW, -W % WINDOW
    if ph or pw:
        x_ct, x_pet = F.pad(x_ct, (0, pw, 0, ph)), F.pad(x_pet, (0, pw, 0, ph))
    out = block(*stem(x_ct, x_pet))
    return out[..., :H, :W] if ph or pw else out
