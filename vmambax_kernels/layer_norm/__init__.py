"""LayerNorm over the last dimension whose fp32 result is written in the consumer's dtype: reference (spec) and Triton backends."""
