"""Four-direction 2D selective scan: reference (spec), CUDA and Triton backends."""
