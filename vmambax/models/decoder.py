"""vMambaX's decoder: channel-aware VSS (CVSS) blocks, d_state 4, with skip connections from the
fused encoder features. Module names follow the published ``MambaDecoder`` (``layers_up``,
``norm_up``, ``up``, ``output``) so its state-dict keys are ours too. Channels last inside.

``norm_layer`` (every LayerNorm's class when given; layers.py says what None picks): the CVSS
blocks' norms feed SS2D's in_proj and the channel attention's first conv, ``norm_up`` and the final
upsampling's norm a Linear and the 1x1 classifier; the expanding norms' outputs meet the fp32 skip
connections, so those stay fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmambax_kernels import up2_bilinear
from vmambax_kernels.modules import SS2D
from vmambax_kernels.modules.glue import fused_up2

from .layers import DropPath, cast_norm, drop_path_schedule, fp32_norm


def _up2(x: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Bilinear x2 of a channels-last map: (Bt, H, W, C) -> (Bt, 2H, 2W, C). PyTorch's forward
    either way; on CUDA its backward gathers instead of scattering with atomics (``up2_bilinear``'s
    Triton backend; glue.fused_up2 says where), except in a model set to the "reference" backend,
    which stays the spec op for op (the GPU rule tests' ref32 model)."""
    fused = backend != "reference" and fused_up2(x.device.type)
    return up2_bilinear(x, backend="triton" if fused else "reference")


class ChannelAttention(nn.Module):
    """x * sigmoid(fc(avgpool x) + fc(maxpool x)), channels first."""

    def __init__(self, dim: int, squeeze: int = 30):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(dim, dim // squeeze, 1, bias=False), nn.SiLU(),
                                nn.Conv2d(dim // squeeze, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # amax, not adaptive_max_pool2d(x, 1): the same values, but CUDA's adaptive pooling kernel
        # gives each (b, c) plane one thread (4.7 ms of a 512x512 batch-8 step on the H100). Only
        # the gradient at tied maxima differs: shared evenly instead of all to the first.
        attn = self.fc(F.adaptive_avg_pool2d(x, 1)) + self.fc(x.amax((2, 3), keepdim=True))
        return x * torch.sigmoid(attn)


class ChannelAttentionBlock(nn.Module):
    def __init__(self, dim: int, compress: int = 3, squeeze: int = 30):
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, dim // compress, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(dim // compress, dim, 3, padding=1), ChannelAttention(dim, squeeze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class CVSSBlock(nn.Module):
    """Channel-aware VSS block, (Bt, H, W, C) -> same:
    x = s1 * in + SS2D(LN1(in));  out = CAB(LN2(x)) + s2 * x."""

    def __init__(self, dim: int, d_state: int = 4, drop_path: float = 0.0, norm_layer=None,
                 backend: str | None = None):
        super().__init__()
        self.norm1 = cast_norm(norm_layer, dim)
        self.scale1 = nn.Parameter(torch.ones(dim))
        self.op = SS2D(dim, d_state=d_state, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.conv_blk = ChannelAttentionBlock(dim)
        self.norm2 = cast_norm(norm_layer, dim)
        self.scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale1 + self.drop_path(self.op(self.norm1(x)))
        y = self.conv_blk(self.norm2(x).permute(0, 3, 1, 2))          # (Bt, C, H, W)
        return y.permute(0, 2, 3, 1) + x * self.scale2                # back to (Bt, H, W, C)


class PatchExpand(nn.Module):
    """Linear C -> 2C, depth-to-space 2x2: (Bt, H, W, C) -> (Bt, 2H, 2W, C/2), LayerNorm."""

    def __init__(self, dim: int, norm_layer=None):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = fp32_norm(norm_layer, dim // 2)   # added to the skip connection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        Bt, H, W, C = x.shape
        x = x.view(Bt, H, W, 2, 2, C // 4).permute(0, 1, 3, 2, 4, 5)   # (Bt, H, p1, W, p2, c)
        return self.norm(x.reshape(Bt, 2 * H, 2 * W, C // 4))


class UpsampleExpand(nn.Module):
    """Linear C -> C/2, bilinear x2, LayerNorm: (Bt, H, W, C) -> (Bt, 2H, 2W, C/2)."""

    def __init__(self, dim: int, norm_layer=None, backend: str | None = None):
        super().__init__()
        self.backend = backend                        # the model's; set_backend changes it
        self.linear = nn.Linear(dim, dim // 2, bias=False)
        self.norm = fp32_norm(norm_layer, dim // 2)   # added to the skip connection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_up2(self.linear(x), self.backend))


class FinalUpsampleX4(nn.Module):
    """(linear, bilinear x2) twice, LayerNorm: (Bt, H, W, C) -> (Bt, 4H, 4W, C)."""

    def __init__(self, dim: int, norm_layer=None, backend: str | None = None):
        super().__init__()
        self.backend = backend                        # the model's; set_backend changes it
        self.linear1 = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        self.norm = cast_norm(norm_layer, dim)        # the 1x1 classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_up2(self.linear2(_up2(self.linear1(x), self.backend)), self.backend))


class DecoderStage(nn.Module):
    def __init__(self, dim: int, depth: int, drop_paths, upsample: bool, d_state: int = 4,
                 norm_layer=None, backend: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList([CVSSBlock(dim, d_state, p, norm_layer, backend) for p in drop_paths[:depth]])
        self.upsample = UpsampleExpand(dim, norm_layer, backend) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.upsample(x) if self.upsample is not None else x


class MambaDecoder(nn.Module):
    """forward(feats): 4 fused features (Bt, dims[i], H / 2^(i+2), W / 2^(i+2)) -> logits
    (Bt, num_classes, H, W). The deepest is expanded, then each shallower one is added as a skip
    before a stage of CVSS blocks."""

    def __init__(self, num_classes: int = 1, dims=(96, 192, 384, 768), depth: int = 4, d_state: int = 4,
                 drop_path_rate: float = 0.1, norm_layer=None, backend: str | None = None):
        super().__init__()
        n = len(dims)
        dpr = drop_path_schedule(drop_path_rate, depth * n)
        self.layers_up = nn.ModuleList([PatchExpand(dims[-1], norm_layer)])
        for i in range(1, n):
            level = n - 1 - i  # the published schedule gives the shallowest stage the smallest rates
            self.layers_up.append(DecoderStage(dims[level], depth, dpr[level * depth:(level + 1) * depth],
                                               upsample=i < n - 1, d_state=d_state,
                                               norm_layer=norm_layer, backend=backend))
        self.norm_up = cast_norm(norm_layer, dims[0])     # FinalUpsampleX4's first Linear
        self.up = FinalUpsampleX4(dims[0], norm_layer, backend)
        self.output = nn.Conv2d(dims[0], num_classes, 1, bias=False)
        for m in self.modules():  # the published init: kaiming-normal convs, Linear left at PyTorch's
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.layers_up[0](feats[-1].permute(0, 2, 3, 1))        # (Bt, h, w, C) channels last
        for i in range(1, len(self.layers_up)):
            skip = feats[-1 - i].permute(0, 2, 3, 1)
            if y.shape[1:3] != skip.shape[1:3]:  # only for sides that are not multiples of 32
                y = F.interpolate(y.permute(0, 3, 1, 2), size=skip.shape[1:3], mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            y = self.layers_up[i](y + skip)
        y = self.up(self.norm_up(y))                                  # (Bt, H, W, C0)
        # the 1x1 conv reads the channels-last view as it is (no copy of the C0 channels; its input
        # gradient comes back channels last too); only its num_classes channels are made contiguous
        return self.output(y.permute(0, 3, 1, 2)).contiguous()        # (Bt, num_classes, H, W)
