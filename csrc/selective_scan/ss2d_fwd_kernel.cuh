// Forward: one launch walks all four directions and merges them.
//
// A group of LP lanes owns one (b, d) plane for the four walks, so the merge y = sum_k y_k is an
// ordered read-add-write by its owner: deterministic, no atomics, no (Bt, 4, Dm, L) buffer. A lane
// takes CH consecutive steps of a walk; per span of LP*CH steps each lane scans its chunk from zero
// (one exp2 per step and state, decays and inputs kept in registers), the group combines the chunks
// with a shuffle scan, and each lane replays its chunk from the true entering state to form y.
// Tiny planes (DCIM's 4x4 windows) get small LP, so one warp packs up to 32 planes.
#pragma once
#include "common/static_switch.h"
#include "ss2d_common.cuh"

namespace vmambax {

constexpr int kFwdThreads = 128;
// 3 blocks of 128 threads per SM caps registers at 168 (ptxas, N=16: ~100 B spilled; at 128 the
// decays spill, 480 B): 12 warps/SM to hide latency (255 registers, 8 warps/SM: enc1 27 ms, H100).
constexpr int kFwdMinBlocks = 3;

template <typename T, int NMAX>
__global__ void __launch_bounds__(kFwdThreads, kFwdMinBlocks) ss2d_fwd_kernel(const SS2DParams p) {
  constexpr int CH = ss2d_chunk(NMAX);
  const int LP = p.LP, L = p.L, N = p.N, R = p.R, span = p.LP * CH;
  const int j = threadIdx.x & (LP - 1);
  const int64_t bd = int64_t(blockIdx.x) * (kFwdThreads / LP) + threadIdx.x / LP;
  const bool active = bd < int64_t(p.Bt) * p.Dm;
  const int b = active ? int(bd / p.Dm) : 0, d = active ? int(bd % p.Dm) : 0;
  float *acc = p.acc + (active ? bd : 0) * L;

  for (int k = 0; k < 4; ++k) {
    const SS2DSide &sd = p.side[k & 1];
    const int kd = k * p.Dm + d, kk = k >> 1;
    const T *u = static_cast<const T *>(sd.u) + b * sd.u_b + d * sd.u_d;
    const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + (R > 0 ? 0 : d * sd.dl_c);
    const T *Bp = static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k;
    const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k;
    const float *Wk = p.Wdt ? p.Wdt + int64_t(kd) * R : nullptr;
    float A2[NMAX];  // A * log2(e): one exp2 (MUFU ex2) per step and state
#pragma unroll
    for (int n = 0; n < NMAX; ++n) A2[n] = n < N ? p.A[kd * N + n] * kLog2e : 0.f;
    const float Dk = p.D ? p.D[kd] : 0.f, bk = p.bias ? p.bias[kd] : 0.f;
    float carry[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; ++n) carry[n] = 0.f;

    for (int s = 0; s < p.nsp; ++s) {
      if (p.states && s > 0 && active) {
        float *st = p.states + ((bd * 4 + k) * (p.nsp - 1) + (s - 1)) * N;
#pragma unroll
        for (int n = 0; n < NMAX; ++n)
          if (n < N && (n & (LP - 1)) == j) st[n] = carry[n];
      }
      int ix[CH];  // index into the side's plane; -1 past the end (identity step: decay 1, input 0)
      float uu[CH], dlt[CH], du[CH];
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int t = s * span + j * CH + i;
        ix[i] = (active && t < L) ? walk_index(k, t, L) : -1;
        uu[i] = dlt[i] = du[i] = 0.f;
        if (ix[i] >= 0) {
          uu[i] = to_f(u[ix[i]]);
          const float z = load_z(sd, R, dl, Wk, ix[i], bk);
          dlt[i] = p.softplus ? softplus(z) : z;
          du[i] = dlt[i] * uu[i];
        }
      }
      // Chunk scan from zero; decays kept, inputs B*delta*u reloaded (cheaper than 64 more registers).
      float dA[CH][NMAX], P[NMAX], h[NMAX];
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        P[n] = 1.f;
        h[n] = 0.f;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
          dA[i][n] = exp2f(dlt[i] * A2[n]);
          const float bu = (n < N && ix[i] >= 0) ? du[i] * to_f(Bp[n * sd.B_n + ix[i]]) : 0.f;
          h[n] = fmaf(dA[i][n], h[n], bu);
          P[n] *= dA[i][n];
        }
      }
      scan_forward<NMAX>(P, h, carry, j, LP);
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        float y = 0.f;
#pragma unroll
        for (int n = 0; n < NMAX; ++n) {
          const bool on = n < N && ix[i] >= 0;
          const float bu = on ? du[i] * to_f(Bp[n * sd.B_n + ix[i]]) : 0.f;
          h[n] = fmaf(dA[i][n], h[n], bu);
          if (on) y = fmaf(to_f(Cp[n * sd.C_n + ix[i]]), h[n], y);
        }
        if (ix[i] >= 0) {
          const int pos = orig_pos(k, ix[i], p.H, p.W);
          y = fmaf(Dk, uu[i], y);
          if (k > 0) y += acc[pos];
          if (k < 3) acc[pos] = y;
          else store_out(p.out, (active ? bd : 0) * L + pos, y, p.out_type);
        }
      }
    }
    __syncwarp();  // the next walk reads acc entries other lanes of the group wrote
  }
}

template <typename T>
void ss2d_fwd_launch(const SS2DParams &p, cudaStream_t stream) {
  const int64_t groups = int64_t(p.Bt) * p.Dm;
  const int per_block = kFwdThreads / p.LP;
  const unsigned grid = unsigned((groups + per_block - 1) / per_block);
  SS2D_NMAX_SWITCH(p.N, NMAX, [&] { ss2d_fwd_kernel<T, NMAX><<<grid, kFwdThreads, 0, stream>>>(p); });
}

}  // namespace vmambax
