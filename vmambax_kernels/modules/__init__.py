"""nn.Modules built on the fused ops."""
from .layer_norm import LayerNorm
from .ss2d import SS2D

__all__ = ["LayerNorm", "SS2D"]
