"""The VMamba-T v0 encoder (depths 2-2-9-2, dims 96-192-384-768, d_state 16, no MLP) that vMambaX
shares between its CT and PET branches. Module names follow the published ``Backbone_VSSM`` so its
state-dict keys (``patch_embed.0``, ``layers.i.blocks.j.op``, ``outnorm{i}``...) are ours too.

``norm_layer`` (every LayerNorm's class when given; layers.py says what None picks): the blocks' and
the patch merging's norms feed only a Linear (SS2D's in_proj, the reduction); the patch embedding's
feeds the first block's residual and the stage outputs' the fusion modules, so those stay fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

from vmambax_kernels.modules import SS2D

from .layers import DropPath, Permute, cast_norm, drop_path_schedule, fp32_norm


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(LayerNorm(x))), channels last (Bt, H, W, C)."""

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0, drop_path: float = 0.0,
                 norm_layer=None, backend: str | None = None):
        super().__init__()
        self.norm = cast_norm(norm_layer, dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, backend=backend)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging2D(nn.Module):
    """2x2 space-to-depth, LayerNorm, linear 4C -> 2C: (Bt, H, W, C) -> (Bt, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int, out_dim: int, norm_layer=None):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = cast_norm(norm_layer, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # VMamba's order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class EncoderStage(nn.Module):
    """``depth`` VSS blocks, then the downsampling that feeds the next stage (Identity for the last)."""

    def __init__(self, dim: int, depth: int, out_dim: int | None, drop_paths, norm_layer=None,
                 **block_kw):
        super().__init__()
        self.blocks = nn.Sequential(*[VSSBlock(dim, drop_path=p, norm_layer=norm_layer, **block_kw)
                                      for p in drop_paths[:depth]])
        self.downsample = PatchMerging2D(dim, out_dim, norm_layer) if out_dim else nn.Identity()

    def forward(self, x: torch.Tensor):
        x = self.blocks(x)
        return x, self.downsample(x)


class VSSEncoder(nn.Module):
    """forward(x (Bt, 3, H, W)) -> 4 stage features (Bt, dims[i], H / 2^(i+2), W / 2^(i+2)),
    each through its ``outnorm{i}`` LayerNorm."""

    def __init__(self, in_chans: int = 3, depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), d_state: int = 16,
                 ssm_ratio: float = 2.0, drop_path_rate: float = 0.0, patch_size: int = 4,
                 norm_layer=None, backend: str | None = None):
        super().__init__()
        self.dims = list(dims)
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            Permute(0, 2, 3, 1),                                   # (Bt, C, h, w) -> (Bt, h, w, C)
            fp32_norm(norm_layer, dims[0]),                        # the first block's residual
        )
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(EncoderStage(
                dims[i], depth, dims[i + 1] if i + 1 < len(dims) else None, dpr[start:start + depth],
                norm_layer=norm_layer, d_state=d_state, ssm_ratio=ssm_ratio, backend=backend))
        for i, d in enumerate(dims):
            self.add_module(f"outnorm{i}", fp32_norm(norm_layer, d))   # CGM, DCIM and the sums
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # VMamba's VSSM init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)                                    # (Bt, H/4, W/4, C0)
        outs = []
        for i, layer in enumerate(self.layers):
            feat, x = layer(x)
            feat = getattr(self, f"outnorm{i}")(feat)
            outs.append(feat.permute(0, 3, 1, 2).contiguous())     # (Bt, h, w, C) -> (Bt, C, h, w)
        return outs
