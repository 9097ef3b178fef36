"""nn.Modules built on the fused ops."""
from .ss2d import SS2D

__all__ = ["SS2D"]
