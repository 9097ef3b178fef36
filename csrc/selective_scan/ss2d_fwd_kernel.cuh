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

template <typename T, int NMAX>
__global__ void __launch_bounds__(kFwdThreads) ss2d_fwd_kernel(const SS2DParams p) {
  constexpr int CH = ss2d_chunk(NMAX);
  const int LP = p.LP, L = p.L, N = p.N, span = p.LP * CH;
  const int j = threadIdx.x & (LP - 1);
  const int64_t bd = int64_t(blockIdx.x) * (kFwdThreads / LP) + threadIdx.x / LP;
  const bool active = bd < int64_t(p.Bt) * p.Dm;
  const int b = active ? int(bd / p.Dm) : 0, d = active ? int(bd % p.Dm) : 0;
  const T *u = static_cast<const T *>(p.u) + b * p.u_b + d * p.u_d;
  float *acc = p.acc + (active ? bd : 0) * L;

  for (int k = 0; k < 4; ++k) {
    const int kd = k * p.Dm + d;
    float A2[NMAX];  // A * log2(e): one exp2 (MUFU ex2) per step and state
#pragma unroll
    for (int n = 0; n < NMAX; ++n) A2[n] = n < N ? p.A[kd * N + n] * kLog2e : 0.f;
    const float Dk = p.D ? p.D[kd] : 0.f, bk = p.bias ? p.bias[kd] : 0.f;
    const T *dl = static_cast<const T *>(p.dl) + b * p.dl_b + k * p.dl_k + (p.R > 0 ? 0 : d * p.dl_c);
    const T *Bp = static_cast<const T *>(p.B) + b * p.B_b + k * p.B_k;
    const T *Cp = static_cast<const T *>(p.C) + b * p.C_b + k * p.C_k;
    const float *Wk = p.Wdt ? p.Wdt + int64_t(kd) * p.R : nullptr;
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
      int pos[CH];
      float uu[CH], dlt[CH], du[CH];
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int t = s * span + j * CH + i;
        pos[i] = (active && t < L) ? walk_pos(k, t, p.H, p.W, L) : -1;
        uu[i] = dlt[i] = du[i] = 0.f;  // a step outside the walk is the identity (decay 1, input 0)
        if (pos[i] >= 0) {
          uu[i] = to_f(u[pos[i]]);
          const float z = load_z(p, dl, Wk, pos[i], bk);
          dlt[i] = p.softplus ? softplus(z) : z;
          du[i] = dlt[i] * uu[i];
        }
      }
      float dA[CH][NMAX], dBu[CH][NMAX], P[NMAX], h[NMAX];
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        P[n] = 1.f;
        h[n] = 0.f;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
          const float a = exp2f(dlt[i] * A2[n]);
          const float bu = (n < N && pos[i] >= 0) ? du[i] * to_f(Bp[n * p.B_n + pos[i]]) : 0.f;
          dA[i][n] = a;
          dBu[i][n] = bu;
          h[n] = fmaf(a, h[n], bu);
          P[n] *= a;
        }
      }
      scan_forward<NMAX>(P, h, carry, j, LP);
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        float y = 0.f;
#pragma unroll
        for (int n = 0; n < NMAX; ++n) {
          h[n] = fmaf(dA[i][n], h[n], dBu[i][n]);
          if (n < N && pos[i] >= 0) y = fmaf(to_f(Cp[n * p.C_n + pos[i]]), h[n], y);
        }
        if (pos[i] >= 0) {
          y = fmaf(Dk, uu[i], y);
          if (k > 0) y += acc[pos[i]];
          if (k < 3) acc[pos[i]] = y;
          else store_out(p.out, (active ? bd : 0) * L + pos[i], y, p.out_type);
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
