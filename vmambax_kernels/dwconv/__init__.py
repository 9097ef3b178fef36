"""SS2D's input glue (transpose, depthwise conv, SiLU) as one op: reference (spec) and Triton backends."""
