"""CGM gate (Context-Gated Cross-Modal Perception): reference (spec) and Triton backends."""
