// Argument checks for the extension: every failure names the argument, the expected and the actual.
#pragma once
#include <torch/extension.h>

#define VMX_CHECK_CUDA(x) \
  TORCH_CHECK((x).is_cuda(), #x ": expected a CUDA tensor, got a tensor on ", (x).device())
#define VMX_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x ": expected dtype ", (dt), ", got ", (x).scalar_type())
#define VMX_CHECK_SHAPE(x, ...)                                                              \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x ": expected shape ",        \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define VMX_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x ": expected a contiguous tensor, got strides ", (x).strides())
// The H*W plane must be dense (row stride W, element stride 1); outer strides are free.
#define VMX_CHECK_PLANE(x)                                                                   \
  TORCH_CHECK((x).stride(-1) == 1 && ((x).size(-2) == 1 || (x).stride(-2) == (x).size(-1)), \
              #x ": expected a dense H*W plane (strides (W, 1) on the last two dims), got strides ", \
              (x).strides())
