// Device helpers shared by the forward and backward kernels: loads, the four walks, lane scans.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ss2d.h"

namespace vmambax {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store_out(void *out, int64_t i, float v, OutType t) {
  if (t == OutType::kFloat) static_cast<float *>(out)[i] = v;
  else if (t == OutType::kBFloat16) static_cast<__nv_bfloat16 *>(out)[i] = __float2bfloat16(v);
  else static_cast<__half *>(out)[i] = __float2half(v);
}

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative.
__device__ __forceinline__ float softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }
__device__ __forceinline__ float softplus_grad(float z) { return z > 20.f ? 1.f : 1.f / (1.f + expf(-z)); }

// Step t of walk k (SPEC.md section 1: k = 0 row-major, 1 column-major, 2 and 3 the same read
// backwards) as the index into the walk's own side (row walks: the plane; column walks: the
// transposed plane), and the position p = h*W + w of that index in the original plane.
__device__ __forceinline__ int walk_index(int k, int t, int L) { return k >= 2 ? L - 1 - t : t; }
__device__ __forceinline__ int orig_pos(int k, int tt, int H, int W) {
  if (k & 1) {
    const int w = tt / H;
    return (tt - w * H) * W + w;
  }
  return tt;
}

// z = delta + bias (before softplus) at index i of the side: delta given, or formed from the
// low-rank dt in fp32.
template <typename T>
__device__ __forceinline__ float load_z(const SS2DSide &sd, int R, const T *dl, const float *Wk, int i, float bias) {
  float z = bias;
  if (R > 0) {
    for (int r = 0; r < R; ++r) z = fmaf(Wk[r], to_f(dl[r * sd.dl_c + i]), z);
  } else {
    z += to_f(dl[i]);
  }
  return z;
}

// Lanes j = 0..LP-1 of a group hold consecutive chunks of one walk. Each chunk is the affine map
// h -> P*h + h0 (P: product of the decays, h0: its end state from zero). After this call h0 holds
// the state entering the lane's chunk and carry the state after the whole span.
template <int NMAX>
__device__ __forceinline__ void scan_forward(float (&P)[NMAX], float (&h0)[NMAX], float (&carry)[NMAX], int j, int LP) {
  for (int off = 1; off < LP; off *= 2) {
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      float Pu = __shfl_up_sync(kFull, P[n], off, LP);
      float hu = __shfl_up_sync(kFull, h0[n], off, LP);
      if (j >= off) {
        h0[n] = fmaf(P[n], hu, h0[n]);
        P[n] *= Pu;
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    float Pe = __shfl_up_sync(kFull, P[n], 1, LP);
    float he = __shfl_up_sync(kFull, h0[n], 1, LP);
    if (j == 0) { Pe = 1.f; he = 0.f; }
    float total = fmaf(P[n], carry[n], h0[n]);
    h0[n] = fmaf(Pe, carry[n], he);
    carry[n] = __shfl_sync(kFull, total, LP - 1, LP);
  }
}

// The same for the reverse recurrence of the backward (lane LP-1 first): e -> e0 + P*e_right.
template <int NMAX>
__device__ __forceinline__ void scan_reverse(float (&P)[NMAX], float (&e0)[NMAX], float (&carry)[NMAX], int j, int LP) {
  for (int off = 1; off < LP; off *= 2) {
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      float Pd = __shfl_down_sync(kFull, P[n], off, LP);
      float ed = __shfl_down_sync(kFull, e0[n], off, LP);
      if (j + off < LP) {
        e0[n] = fmaf(P[n], ed, e0[n]);
        P[n] *= Pd;
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    float Pr = __shfl_down_sync(kFull, P[n], 1, LP);
    float er = __shfl_down_sync(kFull, e0[n], 1, LP);
    if (j == LP - 1) { Pr = 1.f; er = 0.f; }
    float total = fmaf(P[n], carry[n], e0[n]);
    e0[n] = fmaf(Pr, carry[n], er);
    carry[n] = __shfl_sync(kFull, total, 0, LP);
  }
}

// Sum over the LP lanes of a group (groups are aligned, so xor stays inside).
__device__ __forceinline__ float group_sum(float v, int LP) {
  for (int off = LP / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off, LP);
  return v;
}

}  // namespace vmambax
