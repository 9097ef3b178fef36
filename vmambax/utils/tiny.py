"""A tiny (ct, pet) -> logits network for fast CPU tests of the engine (not a model to use).

It keeps what matters to the engine: two inputs of 1 or 3 channels, BatchNorm (so the batch-1
rule applies), dropout (so RNG state matters on resume), a stride-32 bottleneck (so H and W must
be multiples of 32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vmambax.engine.checkpoint import register_model


class TinySegNet(nn.Module):
    def __init__(self, num_classes: int = 1, width: int = 8, plain: bool = False):
        super().__init__()
        # plain: no BatchNorm, no dropout, so a DDP run equals a one-process run at the same global batch
        norm = nn.Identity() if plain else nn.BatchNorm2d(width)
        self.stem = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), norm, nn.ReLU())
        self.down = nn.Conv2d(width, width, 32, stride=32)
        self.drop = nn.Identity() if plain else nn.Dropout2d(0.1)
        self.head = nn.Conv2d(2 * width, num_classes, 3, padding=1)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pet.expand(-1, 3, -1, -1), ct.expand(-1, 3, -1, -1)], dim=1)   # (Bt, 6, H, W)
        f = self.drop(self.stem(x))
        g = F.interpolate(self.down(f), size=f.shape[-2:], mode="nearest")            # (Bt, width, H, W)
        return self.head(torch.cat([f, g], dim=1))


register_model("tiny", TinySegNet)
register_model("tiny_plain", lambda **kw: TinySegNet(plain=True, **kw))
