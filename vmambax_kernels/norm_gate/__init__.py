"""Norm-gate: SS2D's LayerNorm over channels + SiLU gate, reference (spec) and Triton backends."""
