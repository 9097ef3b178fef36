// Device helpers shared by the forward and backward kernels: loads, the four walks, chunk geometry.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/static_switch.h"
#include "ss2d.h"

namespace vmambax {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> the output dtype (round to nearest even), for the kernels templated on it.
template <typename O> __device__ __forceinline__ O from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float4 ld4(const float *s) { return *reinterpret_cast<const float4 *>(s); }

// The position a thread takes in the (channel, position) tiles of kTile (forward) or kBwdTile
// (backward) positions: element e = tid + j * nth of a tile is (channel e / TILE, position e % TILE),
// and since nth is a multiple of 32 (ss2d_threads) and TILE divides 32, e % TILE == tid % TILE for
// every j. Loops over a tile therefore step channels by nth / TILE at a fixed position.
template <int TILE = kTile>
__device__ __forceinline__ int tile_lane(int tid) {
  static_assert(32 % TILE == 0, "tile_lane: the tile must divide the warp");
  return tid & (TILE - 1);
}

// 2^x by one MUFU.EX2 with flush-to-zero: exp2f adds a range test and two multiplies per call to
// keep results below 2^-126 as denormals, i.e. decays < 1e-38 (zero for the state either way).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x by one MUFU.RCP with flush-to-zero (about 1 ulp): a division compiles to a Newton-refined
// sequence with a slow path, which the softplus below does not need.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// torch.nn.functional.softplus (beta 1, threshold 20) as max(z, 0) + log1p(t), t = exp(-|z|) in (0, 1],
// log1p(t) = 2 atanh(s) with s = t / (2 + t) in (0, 1/3] by its series to s^13 (truncation < 2^-25
// relative). Branch-free, 18 instructions with two MUFU ops; log1pf(expf(z)) compiled to ~45 with two
// branches (PTX of the forward's output pass), once per element and walk in every pass, i.e. ~2.8
// instructions per element-state at N = 16 and ~11 at N = 4 next to the ~6 of the recurrence itself.
// exp(-|z|) splits |z| log2(e) into a rounded part for MUFU.EX2 and the exact remainder (one FFMA
// more): without it the rounding of that product alone made errors of up to 29 ulp at z = -30.
// Modelled in float64 (tests/ops/test_csrc_compile.py transcribes it) with the PTX error bounds of ex2
// and rcp.approx: <= 4.2 ulp with exact MUFU results, <= 10 ulp at their documented worst
// (log1pf(expf(z)): 2.7); for z > 20 the log1p term is under half an ulp of z, so the sum is z
// exactly, as torch's threshold gives. Timed (H200, same call):
// with tiles of 32 positions it made the kernels faster (enc1 fwd+bwd 9.90 -> 9.54 ms) but the model's
// inference slower (66.2 -> 69.2 ms from a graph; enc3 forward 0.86 -> 1.05); with tiles of 16 (kTile)
// it gains everywhere timed (inference 65.0 -> 64.4 ms against tiles of 16 alone).
__device__ __forceinline__ float softplus(float z) {
  constexpr float kLog2eLo = 1.92596298909109e-08f;  // log2(e) - kLog2e
  constexpr float kLn2 = 0.6931471805599453f;
  const float a = -fabsf(z), xh = a * kLog2e, xl = fmaf(a, kLog2eLo, fmaf(a, kLog2e, -xh));
  const float t0 = ex2(xh), t = fmaf(t0 * kLn2, xl, t0);  // exp(-|z|) = 2^xh 2^xl, 2^xl ~ 1 + xl ln 2
  const float s = t * rcp_approx(2.f + t), s2 = s * s;
  float q = 2.f / 13.f;  // 2 atanh(s) / s = sum 2 s^2k / (2k + 1)
  q = fmaf(q, s2, 2.f / 11.f);
  q = fmaf(q, s2, 2.f / 9.f);
  q = fmaf(q, s2, 2.f / 7.f);
  q = fmaf(q, s2, 2.f / 5.f);
  q = fmaf(q, s2, 2.f / 3.f);
  q = fmaf(q, s2, 2.f);
  return fmaf(s, q, fmaxf(z, 0.f));
}

// softplus'(z) = sigmoid(z) = 1 - exp(-delta) from delta = softplus(z) >= 0, as the backward holds it:
// below 1, delta P(delta) with P(x) = (1 - exp(-x)) / x by a degree-7 polynomial (a Chebyshev fit
// weighted for relative error on [0, 1]: truncation < 0.01 ulp; no cancellation for small delta), from
// 1 up, 1 - 2^(-delta log2 e) by one MUFU.EX2 (exp(-delta) <= 1/e there: the product's rounding and
// ex2's error move the result by ~1 ulp). 15 arithmetic instructions, branch-free (one SELP)
// against ~32 for -expm1f(-delta), per element and walk of the main pass; test_csrc_compile.py transcribes it.
__device__ __forceinline__ float sigmoid_from_softplus(float delta) {
  float q = -1.5913781680865213e-05f;  // Horner order, highest power first
  q = fmaf(q, delta, 1.8482263840269297e-04f);
  q = fmaf(q, delta, -1.377501175738871e-03f);
  q = fmaf(q, delta, 8.327873423695564e-03f);
  q = fmaf(q, delta, -4.166519641876221e-02f);
  q = fmaf(q, delta, 1.6666646301746368e-01f);
  q = fmaf(q, delta, -0.5f);
  q = fmaf(q, delta, 1.f);
  // One SELP rather than a branch: a C++ select here compiled to a branch per element.
  const float lo = delta * q, hi = 1.f - ex2(-delta * kLog2e);
  float r;
  asm("{\n\t.reg .pred lt;\n\tsetp.lt.f32 lt, %1, 0f3F800000;\n\tselp.f32 %0, %2, %3, lt;\n\t}"
      : "=f"(r) : "f"(delta), "f"(lo), "f"(hi));
  return r;
}

// 16-byte copies global -> shared memory that complete in the background (cp.async, sm_80+):
// src_bytes 0 writes zeros and reads nothing (src must still be a valid address). Older
// architectures copy synchronously.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#else
  *static_cast<uint4 *>(dst) = src_bytes ? *static_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

template <int NMAX>
__device__ __forceinline__ void load_A2(const SS2DParams &p, int k, int d, float (&A2)[NMAX]) {
  const int kd = k * p.Dm + (d < p.Dm ? d : 0);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) A2[n] = n < p.N ? p.A[kd * p.N + n] * kLog2e : 0.f;
}

// Asks L2 for the 32-byte sectors of elements [0, n) of row: one prefetch per sector, no register
// held and nothing waited for.
template <typename T>
__device__ __forceinline__ void prefetch_l2(const T *row, int n) {
  constexpr int kPer = 32 / int(sizeof(T));
  // once per block (cold): unrolled, the loops of prefetch_chunk's rows took ~500 SASS instructions
#pragma unroll 1
  for (int e = 0; e < n; e += kPer) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + e));
  if (n > 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + n - 1));
}

// At a block's start: positions [q0, q1) of what its two walks will stage, asked of L2 at once (the
// thread's own channel row of u, of dy and of the full-rank delta; the rows of B, C and dt of both
// walks spread over the threads). The staging itself reads a tile at a time, each load waiting for
// memory: at enc1 the forward output pass spent 28 % and the backward main pass 17 % of their stall
// samples on them (Nsight Compute, H100, 2b8050a; L2 hit rates 63 % and 74 %). With the whole chunk
// requested up front, only the first tile's loads still wait for DRAM.
template <typename T>
__device__ __forceinline__ void prefetch_chunk(const SS2DParams &p, const SS2DSide &sd, int b, int d0, int q0, int q1,
                                               bool withU, bool withB, bool withC, const float *dy) {
  const int tid = threadIdx.x, nth = blockDim.x, n = q1 - q0, d = d0 + tid, N = p.N, R = p.R;
  const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b;  // row bases: position 0
  if (d < p.Dm) {
    if (withU) prefetch_l2(static_cast<const T *>(sd.u) + b * sd.u_b + int64_t(d) * sd.u_d + q0, n);
    if (R == 0) {
#pragma unroll 1
      for (int kk = 0; kk < 2; ++kk) prefetch_l2(dl + kk * sd.dl_k + int64_t(d) * sd.dl_c + q0, n);
    }
    if (dy) prefetch_l2(dy + (int64_t(b) * p.Dm + d) * p.L + q0, n);
  }
  const int nb = withB ? N : 0, nc = withC ? N : 0, per = nb + nc + R;  // rows of one walk: B, C, dt
#pragma unroll 1
  for (int r = tid; r < 2 * per; r += nth) {
    const int kk = r / per, j = r - kk * per;
    const T *row = j < nb        ? static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k + j * sd.B_n
                   : j < nb + nc ? static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k + (j - nb) * sd.C_n
                                 : dl + kk * sd.dl_k + (j - nb - nc) * sd.dl_c;
    prefetch_l2(row + q0, n);
  }
}

// Geometry of a block: blockIdx.x = (b * sides + side) * nc + chunk, blockIdx.y = channel tile
// (b folded into x: grid.z would cap Bt at 65535).
struct ChunkBlock {
  int c, d0, b, side, q0, q1;
  __device__ __forceinline__ ChunkBlock(const SS2DParams &p, bool both_sides) {
    const int sides = both_sides ? 2 : 1;
    c = int(blockIdx.x % unsigned(p.nc));
    const int rest = int(blockIdx.x / unsigned(p.nc));
    b = rest / sides;
    side = both_sides ? rest % 2 : p.side;
    d0 = blockIdx.y * blockDim.x;
    q0 = c * p.T;
    q1 = min(q0 + p.T, p.L);
  }
};

// Index of (b, k, chunk c) rows in the carry buffers (S: [..][Dm]; e: [..][N][Dm]).
__device__ __forceinline__ int64_t chunk_row(const SS2DParams &p, int b, int k, int c) {
  return (int64_t(b) * 4 + k) * p.nc + c;
}

// The carry passes (ss2d_fwd_carry_kernel, ss2d_bwd_carry_kernel): one thread per (b, k, n, d) takes
// its walk's chunks in order, FWD from the walk's first chunk (buf = cE: e[c] <- the state entering
// chunk c), else from its last (buf = cQ: Q[c] <- the reverse carry entering chunk c's last step),
// x <- exp2(A2 * S_c) * x + buf[c], with the loads of kCarryBatch chunks issued before any store.
// Reading buf[c] and S[c] after storing into the neighbouring chunk costs one dependent global round
// trip per chunk, since the compiler cannot move a load above a store it cannot prove disjoint
// (nc = 256 at enc1: 256 round trips per thread; ~19 ms per training step in each pass's launches).
// Each thread has 2 * kCarryBatch independent loads in flight, then a batch of register-only steps;
// the operations and their order are those of the one-chunk-at-a-time loop (bitwise the same).
template <bool FWD>
__device__ __forceinline__ void carry_pass(const SS2DParams &p, float *buf) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.Bt) * 4 * p.Dm * p.N) return;
  const int d = int(idx % p.Dm);
  const int n = int((idx / p.Dm) % p.N);
  const int k = int((idx / (int64_t(p.Dm) * p.N)) % 4);
  const int b = int(idx / (int64_t(p.Dm) * p.N * 4));
  const float A2 = p.A[(k * p.Dm + d) * p.N + n] * kLog2e;
  const int nc = p.nc;
  // Chunk c of this walk: buf at e0[c * es], S at s0[c * Dm] (chunk_row is linear in c).
  const int64_t row0 = chunk_row(p, b, k, 0), es = int64_t(p.N) * p.Dm;
  float *e0 = buf + (row0 * p.N + n) * p.Dm + d;
  const float *s0 = p.cS + row0 * p.Dm + d;
  float x = 0.f;
  // Walk step j0 + i is chunk c. FWD: j counts up, and the walk's last chunk has no e, S; else j
  // counts down from nc - 1, and the walk's first chunk (j == 0) has no Q (only x is stored there).
  for (int j0 = 0; j0 < nc; j0 += kCarryBatch) {
    float ev[kCarryBatch], sv[kCarryBatch];
#pragma unroll
    for (int i = 0; i < kCarryBatch; ++i) {
      const int j = FWD ? j0 + i : nc - 1 - (j0 + i), c = k < 2 ? j : nc - 1 - j;
      const bool on = FWD ? j < nc - 1 : j > 0;
      ev[i] = on ? e0[c * es] : 0.f;
      sv[i] = on ? s0[int64_t(c) * p.Dm] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kCarryBatch; ++i) {
      const int j = FWD ? j0 + i : nc - 1 - (j0 + i), c = k < 2 ? j : nc - 1 - j;
      if (FWD ? j < nc : j >= 0) e0[c * es] = x;
      x = fmaf(exp2f(A2 * sv[i]), x, ev[i]);
    }
  }
}

}  // namespace vmambax
