"""Bilinear x2 upsampling of a channels-last map (the decoder's): reference (spec) and Triton backends."""
