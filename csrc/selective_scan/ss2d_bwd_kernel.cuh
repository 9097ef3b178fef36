// Backward: one launch, all four walks, every gradient.
//
// Same split as the forward (a group of LP lanes owns one (b, d) plane), walking each direction's
// spans last to first. Saved from the forward: only the fp32 state at the start of each span after
// the first (N floats per LP*CH steps, e.g. 1/8 of a (Bt, 4, Dm, L) fp32 tensor at N = 16). Per
// span the kernel recomputes the decays, the states inside the span (chunk scans + shuffle scan
// from the saved state), then runs the reverse recurrence dh_t = C_t g_t + a_{t+1} dh_{t+1} the
// same way (local reverse scans + reverse shuffle scan, carried across spans).
// Gradient ownership: du, ddelta (full-rank form) are written by the plane's owner (ordered over
// the four walks, deterministic); dA, dD, dbias, dW are reduced over the group then added with
// atomics (Bt-fold); dB, dC and ddt (low rank) are sums over channels: the block's groups (same b,
// consecutive channels) add them in shared memory, then one global atomic per element and block.
// Float atomics make the backward non-deterministic in the last bits. Column walks read and write
// the transposed side (SS2DSide), so every access of a walk runs in memory order.
#pragma once
#include "common/static_switch.h"
#include "ss2d_common.cuh"

namespace vmambax {

constexpr int kBwdThreads = 256;

template <typename T, int NMAX>
__global__ void __launch_bounds__(kBwdThreads) ss2d_bwd_kernel(const SS2DParams p) {
  constexpr int CH = ss2d_chunk(NMAX);
  extern __shared__ float smem[];
  const int LP = p.LP, L = p.L, N = p.N, R = p.R, span = p.LP * CH;
  const int G = kBwdThreads / LP;                 // channels per block
  const int dgroups = (p.Dm + G - 1) / G;
  const int j = threadIdx.x & (LP - 1);
  const int b = blockIdx.x / dgroups;
  const int d_raw = (blockIdx.x % dgroups) * G + threadIdx.x / LP;
  const bool active = d_raw < p.Dm;
  const int d = active ? d_raw : 0;
  const int64_t bd = int64_t(b) * p.Dm + d;
  float *redB = smem, *redC = smem + N * span, *redW = smem + 2 * N * span;  // [n][i*LP + j]
  for (int idx = threadIdx.x; idx < (2 * N + R) * span; idx += kBwdThreads) smem[idx] = 0.f;
  __syncthreads();

  const float *dy = p.dy + bd * L;
  float *du_out = p.du + bd * L;

  for (int k = 0; k < 4; ++k) {
    const SS2DSide &sd = p.side[k & 1];
    const int kd = k * p.Dm + d, kk = k >> 1;
    float Ak[NMAX], A2[NMAX], dAacc[NMAX], ecarry[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      Ak[n] = n < N ? p.A[kd * N + n] : 0.f;
      A2[n] = Ak[n] * kLog2e;
      dAacc[n] = ecarry[n] = 0.f;
    }
    const float Dk = p.D ? p.D[kd] : 0.f, bk = p.bias ? p.bias[kd] : 0.f;
    float dDacc = 0.f, dbacc = 0.f;
    const T *u = static_cast<const T *>(sd.u) + b * sd.u_b + d * sd.u_d;
    const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + (R > 0 ? 0 : d * sd.dl_c);
    const T *Bp = static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k;
    const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k;
    const float *Wk = p.Wdt ? p.Wdt + int64_t(kd) * R : nullptr;

    for (int s = p.nsp - 1; s >= 0; --s) {
      int pos[CH];  // index into the side's plane; -1 past the end (identity step)
      float uu[CH], z[CH], dlt[CH], du[CH], g[CH];
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const int t = s * span + j * CH + i;
        pos[i] = (active && t < L) ? walk_index(k, t, L) : -1;
        uu[i] = z[i] = dlt[i] = du[i] = g[i] = 0.f;
        if (pos[i] >= 0) {
          uu[i] = to_f(u[pos[i]]);
          z[i] = load_z(sd, R, dl, Wk, pos[i], bk);
          dlt[i] = p.softplus ? softplus(z[i]) : z[i];
          du[i] = dlt[i] * uu[i];
          g[i] = dy[orig_pos(k, pos[i], p.H, p.W)];
        }
      }
      // 1. Decays and chunk scans from zero; 2. states entering each chunk.
      float dA[CH][NMAX], hs[CH][NMAX], P[NMAX], h[NMAX], carry[NMAX];
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        carry[n] = (s > 0 && n < N) ? p.states[((bd * 4 + k) * (p.nsp - 1) + (s - 1)) * N + n] : 0.f;
        P[n] = 1.f;
        h[n] = 0.f;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
          dA[i][n] = exp2f(dlt[i] * A2[n]);
          const float bu = (n < N && pos[i] >= 0) ? du[i] * to_f(Bp[n * sd.B_n + pos[i]]) : 0.f;
          h[n] = fmaf(dA[i][n], h[n], bu);
          P[n] *= dA[i][n];
        }
      }
      scan_forward<NMAX>(P, h, carry, j, LP);
      // 3. States before each step (hs) and after the chunk (h); chunk reverse scans from zero.
      float e[NMAX];
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        P[n] = 1.f;
        e[n] = 0.f;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
          hs[i][n] = h[n];
          const float bu = (n < N && pos[i] >= 0) ? du[i] * to_f(Bp[n * sd.B_n + pos[i]]) : 0.f;
          h[n] = fmaf(dA[i][n], h[n], bu);
          P[n] *= dA[i][n];
        }
#pragma unroll
        for (int i = CH - 1; i >= 0; --i) {
          const float c = (n < N && pos[i] >= 0) ? to_f(Cp[n * sd.C_n + pos[i]]) : 0.f;
          e[n] = dA[i][n] * fmaf(c, g[i], e[n]);
        }
      }
      scan_reverse<NMAX>(P, e, ecarry, j, LP);
      // 4. Gradients, last step of the chunk first; e enters as a_{t+1} dh_{t+1}.
      float dz[CH];
#pragma unroll
      for (int i = CH - 1; i >= 0; --i) {
        float ddl = 0.f, dui = 0.f;
#pragma unroll
        for (int n = 0; n < NMAX; ++n) {
          const bool on = n < N && pos[i] >= 0;
          const float c = on ? to_f(Cp[n * sd.C_n + pos[i]]) : 0.f;
          const float bv = on ? to_f(Bp[n * sd.B_n + pos[i]]) : 0.f;
          const float hi = i == CH - 1 ? h[n] : hs[i + 1 < CH ? i + 1 : i][n];  // state after step i
          const float dh = fmaf(c, g[i], e[n]);
          if (on) {
            atomicAdd(&redC[n * span + i * LP + j], g[i] * hi);
            atomicAdd(&redB[n * span + i * LP + j], dh * du[i]);
          }
          const float dh_a = dh * hs[i][n] * dA[i][n];  // dL/da_t * a_t
          ddl = fmaf(dh_a, Ak[n], fmaf(dh * bv, uu[i], ddl));
          dui = fmaf(dh * dlt[i], bv, dui);
          dAacc[n] = fmaf(dh_a, dlt[i], dAacc[n]);
          e[n] = dA[i][n] * dh;
        }
        dz[i] = 0.f;
        if (pos[i] >= 0) {
          dui = fmaf(Dk, g[i], dui);
          dDacc = fmaf(g[i], uu[i], dDacc);
          dz[i] = p.softplus ? ddl * softplus_grad(z[i]) : ddl;
          dbacc += dz[i];
          const int po = orig_pos(k, pos[i], p.H, p.W);
          du_out[po] = k == 0 ? dui : du_out[po] + dui;
          if (R == 0) sd.ddl[b * sd.ddl_b + kk * sd.ddl_k + int64_t(d) * L + pos[i]] = dz[i];
        }
      }
      // Low rank: ddt[r] += W[r] dz (channel sum, via shared memory); dW[r] += dz dt[r].
      for (int r = 0; r < R; ++r) {
        float w = 0.f;
#pragma unroll
        for (int i = 0; i < CH; ++i) {
          if (pos[i] < 0) continue;
          atomicAdd(&redW[r * span + i * LP + j], Wk[r] * dz[i]);
          w = fmaf(dz[i], to_f(dl[r * sd.dl_c + pos[i]]), w);
        }
        w = group_sum(w, LP);
        if (j == 0 && active) atomicAdd(&p.dW[int64_t(kd) * R + r], w);
      }
      __syncthreads();
      // Flush the block's channel sums: one global atomic per element of the span.
      for (int idx = threadIdx.x; idx < (2 * N + R) * span; idx += kBwdThreads) {
        const int row = idx / span, q = idx - row * span;
        const int t = s * span + (q % LP) * CH + q / LP;
        const float v = smem[idx];
        if (t < L && v != 0.f) {
          float *dst = row < N ? sd.dB + b * sd.g_b + kk * sd.g_k + int64_t(row) * L
                     : row < 2 * N ? sd.dC + b * sd.g_b + kk * sd.g_k + int64_t(row - N) * L
                     : sd.ddl + b * sd.ddl_b + kk * sd.ddl_k + int64_t(row - 2 * N) * L;
          atomicAdd(dst + walk_index(k, t, L), v);
        }
        smem[idx] = 0.f;
      }
      __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      const float v = group_sum(dAacc[n], LP);
      if (j == 0 && active && n < N) atomicAdd(&p.dA[kd * N + n], v);
    }
    dDacc = group_sum(dDacc, LP);
    dbacc = group_sum(dbacc, LP);
    if (j == 0 && active) {
      if (p.dD) atomicAdd(&p.dD[kd], dDacc);
      if (p.dbias) atomicAdd(&p.dbias[kd], dbacc);
    }
    __syncwarp();  // the next walk adds to du entries other lanes of the group wrote
  }
}

template <typename T>
void ss2d_bwd_launch(const SS2DParams &p, cudaStream_t stream) {
  const int G = kBwdThreads / p.LP;
  const unsigned grid = unsigned(int64_t(p.Bt) * ((p.Dm + G - 1) / G));
  const size_t smem = sizeof(float) * size_t(2 * p.N + p.R) * p.LP * ss2d_chunk(ss2d_nmax(p.N));
  SS2D_NMAX_SWITCH(p.N, NMAX, [&] {
    auto kernel = ss2d_bwd_kernel<T, NMAX>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  });
}

}  // namespace vmambax
