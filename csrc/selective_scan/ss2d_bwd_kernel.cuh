// Backward: threads over channels, the forward's chunks, carries by separate passes.
//
// Per walk k and channel d the gradients follow from the reverse recurrence
//   dh_t = C_t g_t + a_{t+1} dh_{t+1}      (g = dy at the walk's position, a_t = exp(delta_t A))
// and the states h_{t-1}, h_t of the forward:
//   dC_t += g_t h_t, dB_t += dh_t delta_t u_t             (sums over channels)
//   du_t += delta_t X_t + D g_t, ddelta_t = u_t X_t + Y_t  with X_t = sum_n dh_t B_t, Y_t = sum_n dh_t a_t h_{t-1} A
//   dA += dh_t a_t h_{t-1} delta_t, dD += g_t u_t, dbias += dz_t (dz = ddelta softplus'(z)),
//   low rank: ddt_t[r] += W[r] dz_t (sum over channels), dW[r] += dz_t dt_t[r].
// Saved by the forward: the state entering each chunk of T positions (cE). Launches:
//   1. chunk pass (when a walk has several chunks): each chunk's reverse recurrence from zero gives
//      Q_c = a_first dh_first (N floats) and the chunk's sum of delta S_c. Where the rows allow
//      (ss2d.h:ss2d_bwd_async_ok) its next sub-tile is copied by cp.async during the current one.
//   2. carry pass: per (b, k, d, n), last chunk of the walk first, X_c (the value a_{t+1} dh_{t+1}
//      entering chunk c's last step) = Q_{c+1} + exp2(A2 S_{c+1}) X_{c+1}, written over Q.
//   3. main pass, row side then column side (du a read-add-write over each side's two walks, in the
//      side's own layout; a 4th launch, the forward's merge pass, adds the column side's into du). A block
//      is nth channels of one (b, chunk); per walk it replays the chunk forward once to keep the
//      state entering each sub-tile of kBwdTile positions (shared memory), then takes the
//      sub-tiles last to first. Per sub-tile and state n (runtime loop, N exactly): the forward
//      replay keeps h_t and a_t of the sub-tile in registers, the reverse recurrence forms every
//      term; each warp sums the per-channel values of dB and dC over its 32 channels with shuffles
//      into shared memory, and after the last state one global atomic per element and block adds
//      the warps' sums. dA, dW: per thread in shared memory, one atomic per block at the end.
// Exps per element: chunk pass 1, main pass 1 + 3/4 (sweep of all but the last sub-tile).
// Atomics: each block adds its fp32 partial of a cross-block sum with one atomic per element. dA,
// dD, dbias, dW always go into float64 buffers; dB, dC and the low-rank ddt into SS2DAcc<T>::type
// ones (ss2d.h): float64 for fp32 inputs, so there every cross-block sum is exact (or rounded far
// below fp32's last place) before the host's single rounding to fp32, and the fp32 backward is
// bitwise deterministic in practice (an order-dependent result needs a near-tie at that rounding);
// float for bf16 / fp16 inputs, where dB, dC and ddt round in the blocks' order (not bitwise
// deterministic). Everything else (du, the full-rank ddelta) is written in a fixed order.
#pragma once
#include <type_traits>

#include "ss2d_common.cuh"

namespace vmambax {

constexpr int TB = kBwdTile;
// Channels per thread whose staging loads are in flight together (bwd_stage; a divisor of TB), by
// pass, from ptxas (sm_90, bf16 and fp32): the main pass 8 (168 registers, no spill at NMAX 4..32; 4
// spilled 16 bytes at NMAX 32), the chunk pass 4 (96 registers at NMAX 16 as before; 8 took 128).
constexpr int kStageBatchMain = 8, kStageBatchChunk = 4;
// B, C and dt elements per thread whose staging loads are in flight together (bwd_stage), from
// ptxas (sm_90): 4 keeps the main pass at 168 registers without spills at NMAX 4..16 (fp32's 24-byte
// spill at NMAX 16 goes away); at NMAX 32 batches of 4, 2 and 1 spilled 100-152 bytes, so NMAX >= 32
// keeps the one-element-at-a-time loops.
constexpr int kStageBatchBC = 4;
static_assert(2 * TB == 32, "the dB / dC reduction gives each lane of a warp one of 2 * TB rows");

// Shared memory of the backward kernels (sizes in ss2d.h:ss2d_bwd_smem). The main pass keeps no
// softplus' tile (softplus' = 1 - exp(-delta), formed in registers) and no separate chunk-entry state
// or dA: hS has kBwdSub - 1 slots, the state entering sub-tile j >= 1 at slot j - 1; before sub-tile
// 0, slot 0 (sub-tile 1's state, consumed) is refilled from the saved chunk state; dA lives in slot
// kBwdSub - 2 (for sub-tile kBwdSub - 1, each state's h is read before its dA is written: same slot,
// same n, same thread; the walk's first processed sub-tile initialises dA). 54.3 KB at enc1 (N 16,
// R 6, nth 96) instead of 74.4 with those arrays separate: 4 blocks per SM instead of 3.
static_assert(kBwdSub >= 3, "the chunk-entry state and dA share hS slots 0 and kBwdSub - 2: distinct");
struct BwdSmem {
  float *sB, *sC;  // NMAJOR: [n][TB]; else [i][NS] (float4 over states)
  float *sDt;      // [R][TB]
  float *t0, *t1;  // [nth][TB + 1]: delta (raw, then after softplus), dy; later du, dz of the sub-tile
  float *tU;       // [nth][TB + 1]: u
  float *hS;       // [kBwdSub - 1][N][nth]: state entering sub-tiles 1.. (slot 0 then sub-tile 0's)
  float *sE;       // [N][nth]: reverse carry a_{t+1} dh_{t+1}
  float *sDA;      // [N][nth]: hS slot kBwdSub - 2
  float *sP;       // [nth / 32][N][32]: each warp's channel sums of dC (rows 0..TB-1), dB (TB..2TB-1)
  float *sDW;      // [R][nth]
  float *sDl;      // [kBwdSub - 1][nth][TB + 1]: delta of the replayed sub-tiles, when p.keep_delta
  // The chunk pass (main = false) has only the staged tiles (ss2d.h:ss2d_bwd_smem).
  __device__ __forceinline__ BwdSmem(float *smem, int N, int R, int nth, int NS, bool main) {
    const int tile = nth * (TB + 1), m = main ? 1 : 0;
    sB = smem;
    sC = sB + TB * NS;
    sDt = sC + TB * NS;
    t0 = sDt + R * TB;
    t1 = t0 + tile;
    tU = t1 + tile;
    hS = tU + tile;
    sE = hS + m * (kBwdSub - 1) * N * nth;
    sDA = hS + m * (kBwdSub - 2) * N * nth;
    sP = sE + m * N * nth;
    sDW = sP + m * (nth / 32) * N * 32;
    sDl = sDW + m * R * nth;
  }
};

// Stages positions [q, q + cnt) of the side's plane for walk k (kk = k >> 1), channels d0 ..:
// B (and C), dt (low rank), u, the raw delta + bias (full rank) and dy, as requested.
template <typename T, int NMAX, bool NMAJOR, int SB>
__device__ __forceinline__ void bwd_stage(const SS2DParams &p, const SS2DSide &sd, const BwdSmem &m, int b, int k,
                                          int d0, int q, int cnt, bool withU, bool withB, bool withC, bool withG) {
  constexpr int NS = ss2d_ns(NMAX);
  const int tid = threadIdx.x, nth = blockDim.x, N = p.N, R = p.R, kk = k >> 1;
  const T *Bp = static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k + q;
  const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k + q;
  const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + q;
  // B, C and the low-rank dt: element e = e0 + s nth of each; the loads of kStageBatchBC elements
  // (and of the thread's first kStageBatchBC dt elements) are issued before any of their stores. One
  // element at a time, each LDG waited for the STS before it (the compiler keeps a load after a store
  // it cannot prove disjoint): at enc1 (N 16, R 6, nth 96) 3 B / C round trips and one of dt per
  // staging, where this takes one (Nsight Compute, H100, 2b8050a: the waits on these loads were ~20 %
  // of the main pass's stall samples).
  const int rows = NMAJOR ? N : NMAX, nbc = rows * TB, ndt = R * TB;
  if constexpr (NMAX >= 32) {  // one element at a time: batching spilled 100-152 bytes at NMAX 32
    for (int e = tid; e < nbc; e += nth) {
      const int n = e / TB, i = e - n * TB;
      const bool on = n < N && i < cnt;
      const int o = NMAJOR ? e : i * NS + n;
      if (withB) m.sB[o] = on ? to_f(Bp[n * sd.B_n + i]) : 0.f;
      if (withC) m.sC[o] = on ? to_f(Cp[n * sd.C_n + i]) : 0.f;
    }
    for (int e = tid; e < ndt; e += nth) {
      const int r = e / TB, i = e - r * TB;
      m.sDt[e] = i < cnt ? to_f(dl[r * sd.dl_c + i]) : 0.f;
    }
  } else {
#pragma unroll 1
    for (int e0 = tid; e0 < max(nbc, ndt); e0 += kStageBatchBC * nth) {
      float vb[kStageBatchBC], vc[kStageBatchBC], vt[kStageBatchBC];
#pragma unroll
      for (int s = 0; s < kStageBatchBC; ++s) {
        const int e = e0 + s * nth, n = e / TB, i = e - n * TB;  // n: the state, or the rank r for dt
        const bool on = e < nbc && n < N && i < cnt;
        vb[s] = withB && on ? to_f(Bp[n * sd.B_n + i]) : 0.f;
        vc[s] = withC && on ? to_f(Cp[n * sd.C_n + i]) : 0.f;
        vt[s] = e < ndt && i < cnt ? to_f(dl[n * sd.dl_c + i]) : 0.f;
      }
#pragma unroll
      for (int s = 0; s < kStageBatchBC; ++s) {
        const int e = e0 + s * nth, n = e / TB, i = e - n * TB;
        const int o = NMAJOR ? e : i * NS + n;
        if (e < nbc && withB) m.sB[o] = vb[s];
        if (e < nbc && withC) m.sC[o] = vc[s];
        if (e < ndt) m.sDt[e] = vt[s];
      }
    }
  }
  // A fixed position per thread (tile_lane) and its TB channels c0 + j cstep (nth = TB cstep), the
  // first jend of them real (i < cnt, d < Dm; the rest get zeros). The loads of SB channels
  // are all issued before their shared-memory stores: taken one channel at a time (LDG, then the STS
  // waiting on it), each was a dependent global round trip, and at dec3 (N 4) the main pass spent
  // 3.3 of its 8 cycles per issued instruction waiting on them (Nsight Compute, H100, 52b052e).
  const int i = tile_lane<TB>(tid), cstep = nth / TB, c0 = tid / TB;
  const int cend = i < cnt ? min(nth, p.Dm - d0) : 0;
  const int jend = cend > c0 ? (cend - c0 + cstep - 1) / cstep : 0;
  const T *up = static_cast<const T *>(sd.u) + b * sd.u_b + q + i + int64_t(d0 + c0) * sd.u_d;
  const T *zp = dl + i + int64_t(d0 + c0) * sd.dl_c;
  const float *gp = sd.dy + (int64_t(b) * p.Dm + d0 + c0) * p.L + q + i;
  const int64_t su = cstep * sd.u_d, sz = cstep * sd.dl_c, sg = int64_t(cstep) * p.L;
  const int so = cstep * (TB + 1);  // shared-memory step between the thread's channels
  float *ou = m.tU + c0 * (TB + 1) + i, *o0 = m.t0 + c0 * (TB + 1) + i, *o1 = m.t1 + c0 * (TB + 1) + i;
  const float *bp = (R == 0 && p.bias) ? p.bias + k * p.Dm + d0 + c0 : nullptr;
  // Z: the full-rank z (+ bias) too; a compile-time flag, so that the low-rank path issues none of
  // its predicated-off loads
  auto batches = [&](auto z_flag) {
    constexpr bool Z = decltype(z_flag)::value;
#pragma unroll 1
    for (int j0 = 0; j0 < TB; j0 += SB) {  // (unrolled, the compiler hoisted every batch's loads)
      float vu[SB], vz[SB], vg[SB];
      // running pointers: indexed by j = j0 + s, each address was a 64-bit product (~45 SASS
      // instructions per element instead of ~18)
      const T *u1 = up, *z1 = zp;
      const float *g1 = gp;
#pragma unroll
      for (int s = 0; s < SB; ++s, u1 += su, z1 += sz, g1 += sg) {
        const bool on = j0 + s < jend;
        vu[s] = withU && on ? to_f(*u1) : 0.f;
        vz[s] = Z && on ? to_f(*z1) : 0.f;
        vg[s] = withG && on ? *g1 : 0.f;
        if (Z && bp && on) vz[s] += bp[s * cstep];  // the same z + bias as before
      }
#pragma unroll
      for (int s = 0; s < SB; ++s) {
        if (withU) ou[s * so] = vu[s];
        if (Z) o0[s * so] = vz[s];
        if (withG) o1[s * so] = vg[s];
      }
      up += SB * su, gp += SB * sg, ou += SB * so, o1 += SB * so;
      if (Z) zp += SB * sz, o0 += SB * so;
      if (Z && bp) bp += SB * cstep;
    }
  };
  if (R == 0) batches(std::true_type{});
  else batches(std::false_type{});
}

// After bwd_stage and a barrier: delta (after softplus; 0 past the end and for channels >= Dm) of the
// thread's channel into row (TB floats: its own row of t0, or of the main pass's delta cache). The
// full-rank z + bias is read from the thread's row of t0.
__device__ __forceinline__ void bwd_delta(const SS2DParams &p, const BwdSmem &m, int k, int d, int cnt, float *row) {
  const int c = threadIdx.x, R = p.R;
  if (d >= p.Dm) {
    for (int i = 0; i < TB; ++i) row[i] = 0.f;
    return;
  }
  float z[TB];
  if (R > 0) {
    const float *Wk = p.Wdt + int64_t(k * p.Dm + d) * R;
    const float z0 = p.bias ? p.bias[k * p.Dm + d] : 0.f;
#pragma unroll
    for (int i = 0; i < TB; ++i) z[i] = z0;
    for (int r = 0; r < R; ++r) {
      const float w = __ldg(Wk + r);
#pragma unroll
      for (int i = 0; i < TB; i += 4) {
        const float4 a = ld4(m.sDt + r * TB + i);
        z[i] = fmaf(w, a.x, z[i]); z[i + 1] = fmaf(w, a.y, z[i + 1]);
        z[i + 2] = fmaf(w, a.z, z[i + 2]); z[i + 3] = fmaf(w, a.w, z[i + 3]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < TB; ++i) z[i] = m.t0[c * (TB + 1) + i];
  }
#pragma unroll
  for (int i = 0; i < TB; ++i) row[i] = i < cnt ? z[i] : 0.f;
  // softplus in place, 4 positions per loop body: unrolled over all TB positions its inlined copies
  // were 17 % of the main pass's SASS (1.7 k instructions, straight-line code run once per sub-tile)
  // and a sixth of its "no instruction" stall samples (Nsight Compute, enc1, H100, 2b8050a).
  if (p.softplus) {
#pragma unroll 4
    for (int i = 0; i < TB; ++i)
      if (i < cnt) row[i] = softplus(row[i]);
  }
}

// The chunk pass's asynchronous staging (as the forward's FwdTile::issue; ss2d.h:ss2d_bwd_async_ok):
// positions [q, q + cnt) of walk k copied raw, 16 bytes at a time, while the previous sub-tile is
// scanned: dy ([nth][TB] floats) into tU, which the chunk pass does not use, and C, the low-rank dt
// ([NMAX + R][TB] of T) into the buffer after it (ss2d_bwd_chunk_raw_smem); rows of channels >= Dm,
// states >= N and the pieces past cnt as zeros. One commit group; bwd_chunk_convert takes it after
// the caller's wait and barrier.
template <typename T, int NMAX>
__device__ __forceinline__ void bwd_chunk_issue(const SS2DParams &p, const SS2DSide &sd, const BwdSmem &m, int b,
                                                int k, int d0, int q, int cnt) {
  constexpr int SEG = 16 / int(sizeof(T)), SPR = TB / SEG, GPR = TB / 4;  // pieces per row: T, dy
  asm volatile("mov.b32 %0, %0;" : "+r"(b));  // addresses formed here, not hoisted (FwdTile::issue)
  const int nth = blockDim.x, kk = k >> 1;
  float *rg = m.tU;
  T *rc = reinterpret_cast<T *>(m.hS);
  const float *gy = sd.dy + (int64_t(b) * p.Dm + d0) * p.L + q;
#pragma unroll 1
  for (int e = threadIdx.x; e < nth * GPR; e += nth) {
    const int c = e / GPR, i = (e - c * GPR) * 4;
    const bool on = i < cnt && d0 + c < p.Dm;
    cp_async16(rg + c * TB + i, on ? gy + int64_t(c) * p.L + i : sd.dy, on ? 16 : 0);
  }
  const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k + q;
  const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + q;
#pragma unroll 1
  for (int e = threadIdx.x; e < (NMAX + p.R) * SPR; e += nth) {
    const int row = e / SPR, i = (e - row * SPR) * SEG;
    const bool on = i < cnt && (row >= NMAX || row < p.N);
    const T *src = row < NMAX ? Cp + row * sd.C_n + i : dl + (row - NMAX) * sd.dl_c + i;
    cp_async16(rc + row * TB + i, on ? src : static_cast<const T *>(sd.C), on ? 16 : 0);
  }
  cp_async_commit();
}

// The copies of bwd_chunk_issue into the staged tiles: what bwd_stage stores for the chunk pass.
template <typename T, int NMAX>
__device__ __forceinline__ void bwd_chunk_convert(const SS2DParams &p, const BwdSmem &m) {
  constexpr int NS = ss2d_ns(NMAX);
  const int tid = threadIdx.x, nth = blockDim.x;
  const T *rc = reinterpret_cast<const T *>(m.hS), *rt = rc + NMAX * TB;
#pragma unroll 1
  for (int e = tid; e < NMAX * TB; e += nth) {
    const int n = e / TB, i = e - n * TB;
    m.sC[i * NS + n] = to_f(rc[e]);
  }
#pragma unroll 1
  for (int e = tid; e < p.R * TB; e += nth) m.sDt[e] = to_f(rt[e]);
#pragma unroll 4
  for (int e = tid; e < nth * TB; e += nth) {
    const int c = e / TB;
    m.t1[c * (TB + 1) + (e - c * TB)] = m.tU[e];
  }
}

// Pass 1: Q_c and S_c of every chunk but each walk's first, both walks of both sides. ASYNC: the
// next sub-tile's inputs are copied during the current one's scan (bwd_chunk_issue).
template <typename T, int NMAX, bool ASYNC>
__global__ void __launch_bounds__(kMaxThreads) ss2d_bwd_chunk_kernel(const SS2DParams p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int NS = ss2d_ns(NMAX);
  const ChunkBlock g(p, true);
  const SS2DSide &sd = p.sides[g.side];
  const BwdSmem m(smem, p.N, p.R, blockDim.x, NS, false);
  prefetch_chunk<T>(p, sd, g.b, g.d0, g.q0, g.q1, false, false, true, sd.dy);
  const int c = threadIdx.x, d = g.d0 + c;
  const int nsub = (g.q1 - g.q0 + TB - 1) / TB;
  auto skip = [&](int kk) { return g.c == (kk ? p.nc - 1 : 0); };  // the walk's first chunk: nothing leaves it
  auto issue = [&](int kk, int jt) {  // ASYNC: sub-tile jt (reverse walk order) of walk kk
    const int q = g.q0 + (kk ? jt : nsub - 1 - jt) * TB;
    bwd_chunk_issue<T, NMAX>(p, sd, m, g.b, g.side + 2 * kk, g.d0, q, min(TB, g.q1 - q));
  };
  if constexpr (ASYNC) issue(skip(0) ? 1 : 0, 0);  // nc > 1 here: at most one walk is skipped
  for (int kk = 0; kk < 2; ++kk) {
    if (skip(kk)) continue;
    const int k = g.side + 2 * kk;
    float A2[NMAX], e[NMAX];
    load_A2<NMAX>(p, k, d, A2);
#pragma unroll
    for (int n = 0; n < NMAX; ++n) e[n] = 0.f;
    float S = 0.f;
    for (int jt = 0; jt < nsub; ++jt) {
      const int st = kk ? jt : nsub - 1 - jt;  // reverse walk order
      const int q = g.q0 + st * TB, cnt = min(TB, g.q1 - q);
      if constexpr (ASYNC) cp_async_wait_all();
      __syncthreads();  // the previous sub-tile is consumed (ASYNC: and this one's copies are complete)
      if constexpr (ASYNC) bwd_chunk_convert<T, NMAX>(p, m);
      else bwd_stage<T, NMAX, false, kStageBatchChunk>(p, sd, m, g.b, k, g.d0, q, cnt, false, false, true, true);
      __syncthreads();
      if constexpr (ASYNC) {  // the raw buffers are consumed: the next sub-tile's copies (one call site)
        if (jt + 1 < nsub || (kk == 0 && !skip(1))) issue(jt + 1 < nsub ? kk : 1, jt + 1 < nsub ? jt + 1 : 0);
      }
      bwd_delta(p, m, k, d, cnt, m.t0 + c * (TB + 1));
      const float *sl = m.t0 + c * (TB + 1), *sg = m.t1 + c * (TB + 1);
      for (int s = 0; s < TB; ++s) {  // past the end: delta 0, C 0, dy 0: identity steps
        const int i = kk ? s : TB - 1 - s;
        const float dl = sl[i], gi = sg[i];
        S += dl;
        const float *ci = m.sC + i * NS;
#pragma unroll
        for (int n = 0; n < NMAX; n += 4) {
          const float4 c4 = ld4(ci + n);
          e[n] = ex2(dl * A2[n]) * fmaf(c4.x, gi, e[n]);
          e[n + 1] = ex2(dl * A2[n + 1]) * fmaf(c4.y, gi, e[n + 1]);
          e[n + 2] = ex2(dl * A2[n + 2]) * fmaf(c4.z, gi, e[n + 2]);
          e[n + 3] = ex2(dl * A2[n + 3]) * fmaf(c4.w, gi, e[n + 3]);
        }
      }
    }
    if (d < p.Dm) {
      const int64_t row = chunk_row(p, g.b, k, g.c);
      p.cS[row * p.Dm + d] = S;
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < p.N) p.cQ[(row * p.N + n) * p.Dm + d] = e[n];
    }
  }
}

// Pass 2: Q <- X, the reverse carry entering each chunk's last step (walk order, last chunk first;
// carry_pass).
template <typename T>
__global__ void __launch_bounds__(256) ss2d_bwd_carry_kernel(const SS2DParams p) {
  carry_pass<false>(p, p.cQ);
}

// Sum over the 32 lanes of a warp of each of 32 values, lane l getting row l's sum (a reduce-scatter
// by halves: at step OFF a lane keeps the half of its rows named by its bit OFF and adds the
// partner's copy of that half). 31 shuffles + 31 adds, no shared memory, no block barrier. One
// template per step: with a runtime `off` loop nvcc kept v[] in local memory (128-byte stack frame).
template <int OFF>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[32], int lane) {
  const bool up = lane & OFF;
#pragma unroll
  for (int j = 0; j < OFF; ++j) {
    const float send = up ? v[j] : v[j + OFF];
    const float keep = up ? v[j + OFF] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

__device__ __forceinline__ float warp_reduce_scatter32(float (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

// One sub-tile of the main pass, walk direction KK (0: positions ascending), sub-tile j of the
// chunk in walk order; first: the walk's first processed sub-tile (initialises dA). The staged tiles
// hold u, dy, B and C ([n][TB]), dlrow the sub-tile's delta (t0's row or the delta cache's). The per-state dB / dC channel sums are warp shuffles
// (warp_reduce_scatter32) into the warp's own slots of sP: no block barrier in the state loop and
// one after it. Through a [2 TB][nth + 1] shared buffer they took two block barriers per state (32
// per sub-tile at N = 16), which 3-warp blocks at 14 % occupancy could not hide (Nsight Compute:
// 0.40 eligible warps per scheduler, 5.0 + 5.9 ms at enc1).
template <int KK, typename Acc>
__device__ __forceinline__ void bwd_subtile(const SS2DParams &p, const SS2DSide &sd, const BwdSmem &m, int b,
                                            int k, int d0, int j, int q, int cnt, float Dk, float &dDacc,
                                            float &dbacc, bool first, float *dlrow) {
  const int c = threadIdx.x, nth = blockDim.x, d = d0 + c, N = p.N, L = p.L;
  const int dA_row = k * p.Dm + (d < p.Dm ? d : 0);
  float dl[TB], du[TB], gg[TB], X[TB], Y[TB], hA[TB], aA[TB];
#pragma unroll
  for (int i = 0; i < TB; ++i) {
    dl[i] = dlrow[i];
    du[i] = dl[i] * m.tU[c * (TB + 1) + i];
    gg[i] = m.t1[c * (TB + 1) + i];
    X[i] = Y[i] = 0.f;
  }
  // softplus'(z) = sigmoid(z) = 1 - exp(-softplus(z)) over dlrow in place (delta is in dl[] now; nothing
  // else reads the row: its t0 row gets du, a cache row is read once), by sigmoid_from_softplus (exactly
  // 1.0f for z > 20, as the thresholded branch gives). In a loop of 4 positions per body: unrolled over
  // TB in the dz loop its copies were 11 % of the main pass's SASS.
  if (p.softplus) {
#pragma unroll 4
    for (int i = 0; i < TB; ++i) dlrow[i] = sigmoid_from_softplus(dlrow[i]);
  }
  const int w = c >> 5, l = c & 31, slot = j > 0 ? j - 1 : 0;
  // A of the next state is loaded during this one's: loaded at the loop's top, its wait held up the
  // state's first ex2 (4 % of the main pass's stall samples at enc1, long scoreboard; H200, 4d5bbb7).
  const float *Arow = p.A + dA_row * N;
  float Anext = Arow[0];
  for (int n = 0; n < N; ++n) {
    const float An = Anext, A2n = An * kLog2e;
    Anext = Arow[n + 1 < N ? n + 1 : n];
    const float *Bn = m.sB + n * TB, *Cn = m.sC + n * TB;
    float h = m.hS[(slot * N + n) * nth + c];
    const float h0 = h;  // h_{t-1} of the sub-tile's first step
#pragma unroll
    for (int s = 0; s < TB; ++s) {
      const int i = KK ? TB - 1 - s : s;
      aA[i] = ex2(dl[i] * A2n);
      h = fmaf(aA[i], h, du[i] * Bn[i]);
      hA[i] = h;
    }
    float en = m.sE[n * nth + c], dAn = 0.f;
#pragma unroll
    for (int s = TB - 1; s >= 0; --s) {
      const int i = KK ? TB - 1 - s : s;
      const float bi = Bn[i];
      const float dh = fmaf(Cn[i], gg[i], en);
      X[i] = fmaf(dh, bi, X[i]);
      // dh_t a_t h_{t-1} from the replayed h_{t-1}, not as h_t - du_t B_t: that difference cancels
      // (6e-11 instead of the exact 0 of an L = 1 plane, relative error growing as a_t h_{t-1} << du_t B_t)
      const float t = dh * (aA[i] * (s == 0 ? h0 : hA[KK ? TB - s : s - 1]));
      Y[i] = fmaf(t, An, Y[i]);
      dAn = fmaf(t, dl[i], dAn);
      en = aA[i] * dh;
      hA[i] = gg[i] * hA[i];  // hA[i], aA[i] are dead from here: this channel's dC_i, dB_i terms
      aA[i] = dh * du[i];
    }
    m.sE[n * nth + c] = en;
    m.sDA[n * nth + c] = (first ? 0.f : m.sDA[n * nth + c]) + dAn;
    float v[2 * TB];  // rows 0..TB-1: dC, TB..2TB-1: dB
#pragma unroll
    for (int i = 0; i < TB; ++i) {
      v[i] = hA[i];
      v[TB + i] = aA[i];
    }
    m.sP[(w * N + n) * 32 + l] = warp_reduce_scatter32(v, l);
  }
  __syncthreads();  // every warp's sP slots are written
  // dB, dC: the warps' sums (fp32, a fixed order), one atomic per element and block into the Acc
  // buffer (double for fp32 inputs: exact, see ss2d.h:SS2DAcc).
  // Element o = c + j * nth: nth is a multiple of 32, so the thread's row r = c & 31 (position i,
  // dC or dB) is fixed and its states are n = c / 32 + j * nw: the destination is computed once and
  // stepped (same elements, same order, same sums). Per element it was ~25 integer instructions of
  // 64-bit index arithmetic plus a runtime-bounded loop over the warps.
  const int nw = nth >> 5, kk = k >> 1, r = c & 31, i = r & (TB - 1);
  if (i < cnt) {
    Acc *dst = reinterpret_cast<Acc *>(r < TB ? sd.dC : sd.dB) + b * sd.g_b + kk * sd.g_k + int64_t(c >> 5) * L + q + i;
    const int64_t dstep = int64_t(nw) * L;
    const float *src = m.sP + (c >> 5) * 32 + r;  // sP[(ww * N + n) * 32 + r]
    const int wstep = N * 32, nstep = nw * 32;
    for (int n = c >> 5; n < N; n += nw, dst += dstep, src += nstep) {
      float v = 0.f;
#pragma unroll
      for (int ww = 0; ww < kMaxThreads / 32; ++ww)
        if (ww < nw) v += src[ww * wstep];
      atomicAdd(dst, Acc(v));
    }
  }
  // Per-step gradients of the thread's channel: du into t0; dz into t1 (every warp has read its dy
  // rows before the barrier above) and, low rank, dW.
  float *o1 = m.t0 + c * (TB + 1);
  const float *uu = m.tU + c * (TB + 1);
  float dz[TB];
#pragma unroll
  for (int i = 0; i < TB; ++i) {
    const bool on = i < cnt && d < p.Dm;
    const float sp = p.softplus ? dlrow[i] : 1.f;  // softplus', formed above
    dz[i] = on ? fmaf(uu[i], X[i], Y[i]) * sp : 0.f;
    o1[i] = fmaf(dl[i], X[i], Dk * gg[i]);
    dDacc = fmaf(gg[i], uu[i], dDacc);
    dbacc += dz[i];
  }
  if (p.R == 0) {  // full rank: dz is ddelta, written out by the block's read-add-write loop
    float *o2 = m.t1 + c * (TB + 1);
#pragma unroll
    for (int i = 0; i < TB; ++i) o2[i] = dz[i];
    return;
  }
  // Low rank: dz into t1 as dense [nth][TB] rows for the block's ddt product (ss2d_bwd_main_kernel),
  // which reads 4 positions of a channel with one LDS.128 at an immediate offset. These STS.128 are
  // 4-way bank conflicts (a 64-byte row stride); rotating the chunks by channel avoids them but cost
  // the product ~5 index instructions per channel, and unrolling it further spilled at NMAX 8 and 16.
  float *row = m.t1 + c * TB;
#pragma unroll
  for (int q4 = 0; q4 < TB / 4; ++q4)
    *reinterpret_cast<float4 *>(row + 4 * q4) = make_float4(dz[4 * q4], dz[4 * q4 + 1], dz[4 * q4 + 2], dz[4 * q4 + 3]);
  if (d < p.Dm) {  // dW[r] += sum_i dz_i dt_i[r]: the thread's own channel, dz from registers
    for (int r = 0; r < p.R; ++r) {
      float a = 0.f;
#pragma unroll
      for (int i = 0; i < TB; i += 4) {
        const float4 t = ld4(m.sDt + r * TB + i);
        a = fmaf(dz[i], t.x, a); a = fmaf(dz[i + 1], t.y, a);
        a = fmaf(dz[i + 2], t.z, a); a = fmaf(dz[i + 3], t.w, a);
      }
      m.sDW[r * nth + c] += a;
    }
  }
}

// dst[n nth] = on ? src[n Dm] : 0 for the states n < N, the loads of 8 states issued before their
// stores: one state at a time, each load waited for the store before it (the compiler keeps a load
// after a store it cannot prove disjoint), 1.6-1.8 % of the main pass's stall samples per call site.
__device__ __forceinline__ void load_states(float *dst, const float *src, int N, int nth, int64_t Dm, bool on) {
  for (int n0 = 0; n0 < N; n0 += 8) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = on && n0 + j < N ? src[(n0 + j) * Dm] : 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (n0 + j < N) dst[(n0 + j) * nth] = v[j];
  }
}

// Pass 3 (per side): replays, reverse recurrence, every gradient. du's read-add-writes issue
// kRmwBatchBwd loads per thread before their stores: one element at a time, each was a dependent
// round trip (on the column side a separate sector, stride W: 5.9 ms against 5.0 for the rows).
template <typename T, int NMAX>
__global__ void __launch_bounds__(kMaxThreads, 3) ss2d_bwd_main_kernel(const SS2DParams p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int NS = ss2d_ns(NMAX);
  using Acc = typename SS2DAcc<T>::type;  // dB, dC, low-rank ddt (sd.dB, sd.dC, sd.ddl when R > 0)
  const ChunkBlock g(p, false);
  const SS2DSide &sd = p.sides[g.side];
  const BwdSmem m(smem, p.N, p.R, blockDim.x, NS, true);
  prefetch_chunk<T>(p, sd, g.b, g.d0, g.q0, g.q1, true, true, true, sd.dy);
  const int c = threadIdx.x, d = g.d0 + c, nth = blockDim.x, N = p.N, R = p.R, L = p.L;
  const bool active = d < p.Dm;
  const bool keep = NMAX == 4 && p.keep_delta;  // delta of the replayed sub-tiles in m.sDl
  const int nsub = (g.q1 - g.q0 + TB - 1) / TB;
  float *const t0row = m.t0 + c * (TB + 1);
  for (int kk = 0; kk < 2; ++kk) {
    const int k = g.side + 2 * kk;
    const int64_t row = chunk_row(p, g.b, k, g.c);
    const bool carried = p.nc > 1 && active;
    for (int r = 0; r < R; ++r) m.sDW[r * nth + c] = 0.f;
    load_states(m.sE + c, p.cQ + row * N * p.Dm + d, N, nth, p.Dm, carried);
    const float Dk = (p.D && active) ? p.D[k * p.Dm + d] : 0.f;
    float dDacc = 0.f, dbacc = 0.f;
    // Forward replay of the chunk: the state entering each sub-tile j >= 1, at slot j - 1.
    {
      float A2[NMAX], h[NMAX];
      load_A2<NMAX>(p, k, d, A2);
#pragma unroll
      for (int n = 0; n < NMAX; ++n) h[n] = (carried && n < N) ? p.cE[(row * N + n) * p.Dm + d] : 0.f;
      for (int j = 0; j < nsub; ++j) {
        if (j > 0) {
#pragma unroll
          for (int n = 0; n < NMAX; ++n)
            if (n < N) m.hS[((j - 1) * N + n) * nth + c] = h[n];
        }
        if (j == nsub - 1) break;
        const int st = kk ? nsub - 1 - j : j;
        const int q = g.q0 + st * TB, cnt = min(TB, g.q1 - q);
        __syncthreads();
        bwd_stage<T, NMAX, false, kStageBatchMain>(p, sd, m, g.b, k, g.d0, q, cnt, true, true, false, false);
        __syncthreads();
        float *sl = keep ? m.sDl + (j * nth + c) * (TB + 1) : t0row;
        bwd_delta(p, m, k, d, cnt, sl);
        const float *su = m.tU + c * (TB + 1);
        for (int s = 0; s < TB; ++s) {
          const int i = kk ? TB - 1 - s : s;
          const float dl = sl[i], du = dl * su[i];
          const float *bi = m.sB + i * NS;
#pragma unroll
          for (int n = 0; n < NMAX; n += 4) {
            const float4 b4 = ld4(bi + n);
            h[n] = fmaf(ex2(dl * A2[n]), h[n], du * b4.x);
            h[n + 1] = fmaf(ex2(dl * A2[n + 1]), h[n + 1], du * b4.y);
            h[n + 2] = fmaf(ex2(dl * A2[n + 2]), h[n + 2], du * b4.z);
            h[n + 3] = fmaf(ex2(dl * A2[n + 3]), h[n + 3], du * b4.w);
          }
        }
      }
    }
    // Sub-tiles last to first.
    for (int j = nsub - 1; j >= 0; --j) {
      const int st = kk ? nsub - 1 - j : j;
      const int q = g.q0 + st * TB, cnt = min(TB, g.q1 - q);
      __syncthreads();  // the previous sub-tile's outputs are stored
      bwd_stage<T, NMAX, true, kStageBatchMain>(p, sd, m, g.b, k, g.d0, q, cnt, true, true, true, true);
      __syncthreads();
      const bool cached = keep && j < nsub - 1;  // replayed: delta is in the cache
      if (!cached) bwd_delta(p, m, k, d, cnt, t0row);  // softplus' is formed in bwd_subtile
      float *dlrow = cached ? m.sDl + (j * nth + c) * (TB + 1) : t0row;
      if (j == 0) {  // slot 0 (sub-tile 1's state, consumed) gets the chunk's entering state
        load_states(m.hS + c, p.cE + row * N * p.Dm + d, N, nth, p.Dm, carried);
      }
      const bool first = j == nsub - 1;
      if (kk) bwd_subtile<1, Acc>(p, sd, m, g.b, k, g.d0, j, q, cnt, Dk, dDacc, dbacc, first, dlrow);
      else bwd_subtile<0, Acc>(p, sd, m, g.b, k, g.d0, j, q, cnt, Dk, dDacc, dbacc, first, dlrow);
      __syncthreads();  // du, dz tiles complete
      // The thread's position i is fixed (tile_lane): its offsets are computed once per sub-tile and
      // stepped across its channels (per element, the address work was most of this loop's cost).
      const bool wfirst = kk == 0;  // the side's first write of its du (walk k = side)
      const int i = tile_lane<TB>(c), cstep = nth / TB, nact = min(nth, p.Dm - g.d0);
      if (i < cnt) {
        const int64_t step = int64_t(cstep) * L;  // between the channels a thread takes
        float *du = (g.side ? p.duT : p.du) + (int64_t(g.b) * p.Dm + g.d0 + c / TB) * L + q + i;
        // full-rank ddelta (float; with R > 0 this pointer is stepped but never written)
        float *ddl = sd.ddl + g.b * sd.ddl_b + kk * sd.ddl_k + int64_t(g.d0 + c / TB) * L + q + i;
        const float *v0 = m.t0 + (c / TB) * (TB + 1) + i, *v1 = m.t1 + (c / TB) * (TB + 1) + i;
        for (int c0 = c / TB; c0 < nact; c0 += kRmwBatchBwd * cstep) {
          float prev[kRmwBatchBwd];
#pragma unroll
          for (int u = 0; u < kRmwBatchBwd; ++u)  // loads first (distinct elements: no ordering needed)
            prev[u] = (c0 + u * cstep < nact && !wfirst) ? du[u * step] : 0.f;
#pragma unroll
          for (int u = 0; u < kRmwBatchBwd; ++u) {
            if (c0 + u * cstep >= nact) break;
            du[u * step] = wfirst ? v0[u * cstep * (TB + 1)] : prev[u] + v0[u * cstep * (TB + 1)];
            if (R == 0) ddl[u * step] = v1[u * cstep * (TB + 1)];
          }
          du += kRmwBatchBwd * step;
          ddl += kRmwBatchBwd * step;
          v0 += kRmwBatchBwd * cstep * (TB + 1);
          v1 += kRmwBatchBwd * cstep * (TB + 1);
        }
      }
      if (R > 0) {  // ddt[r][i] = sum over the block's channels of W[k, d, r] dz[d][i]
        // Output unit (r, 4 positions) takes P lanes of one warp, P the largest power of two up to 32
        // with R (TB / 4) P <= nth: its `part` (the high lane bits) sums a contiguous range of
        // channels with one W load and one LDS.128 per 4 FMAs (a compile-time stride: the loop unrolls
        // and its loads overlap; with a stride of P channels it did not, and took 25 % longer at enc3),
        // then xor shuffles add the P partials in a fixed order. At P <= 4 the units of a quarter-warp
        // read one channel (4 positions each): no bank conflict (P 8+ only at R <= 4). One thread per output
        // (P = 1 always) the product ran on the first R (TB / 4) threads alone, one warp at R = 6, while
        // the others waited at the next barrier (5.6 % of the main pass's stall samples at dec3, H200).
        const int units = R * (TB / 4), nact = min(nth, p.Dm - g.d0);
        int lgP = 0;
        while (lgP < 5 && (units << (lgP + 1)) <= nth) ++lgP;
        const int upw = 5 - lgP, len = (nact + (1 << lgP) - 1) >> lgP;  // log2(units per warp); channels per part
        const float *Wk = p.Wdt + int64_t(k * p.Dm + g.d0) * R;
        for (int o0 = 0; o0 < units << lgP; o0 += nth) {  // block-uniform: every lane reaches the shuffles
          const int o = o0 + c, lane = c & 31, part = lane >> upw;
          const int unit = ((o >> 5) << upw) + (lane & ((1 << upw) - 1)), r = unit >> 2, i0 = 4 * (unit & 3);
          const bool on = unit < units && i0 < cnt;
          const int c_lo = part * len, c_hi = min(nact, c_lo + len);
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
          if (on) {
            const float *zc = m.t1 + c_lo * TB + i0, *wc = Wk + c_lo * R + r;
            for (int cc = c_lo; cc < c_hi; ++cc, zc += TB, wc += R) {
              const float w = __ldg(wc);
              const float4 z = ld4(zc);
              a0 = fmaf(w, z.x, a0); a1 = fmaf(w, z.y, a1);
              a2 = fmaf(w, z.z, a2); a3 = fmaf(w, z.w, a3);
            }
          }
          for (int off = 16; off >= 32 >> lgP; off >>= 1) {
            a0 += __shfl_xor_sync(0xffffffffu, a0, off);
            a1 += __shfl_xor_sync(0xffffffffu, a1, off);
            a2 += __shfl_xor_sync(0xffffffffu, a2, off);
            a3 += __shfl_xor_sync(0xffffffffu, a3, off);
          }
          if (on && part == 0) {
            Acc *dst = reinterpret_cast<Acc *>(sd.ddl) + g.b * sd.ddl_b + kk * sd.ddl_k + int64_t(r) * L + q + i0;
            atomicAdd(dst, Acc(a0));
            if (i0 + 1 < cnt) atomicAdd(dst + 1, Acc(a1));
            if (i0 + 2 < cnt) atomicAdd(dst + 2, Acc(a2));
            if (i0 + 3 < cnt) atomicAdd(dst + 3, Acc(a3));
          }
        }
      }
    }
    if (active) {
      for (int n = 0; n < N; ++n) atomicAdd(p.dA + (int64_t(k) * p.Dm + d) * N + n, double(m.sDA[n * nth + c]));
      if (p.dD) atomicAdd(p.dD + k * p.Dm + d, double(dDacc));
      if (p.dbias) atomicAdd(p.dbias + k * p.Dm + d, double(dbacc));
      for (int r = 0; r < R; ++r) atomicAdd(p.dW + (int64_t(k) * p.Dm + d) * R + r, double(m.sDW[r * nth + c]));
    }
  }
}

template <typename T>
void ss2d_bwd_launch(const SS2DParams &p, cudaStream_t stream) {
  const int nth = p.nth;
  const size_t smem = ss2d_bwd_smem(p.N, p.R, nth);
  const bool chunk_async = ss2d_bwd_async_ok(p, int(sizeof(T)));
  const size_t smem_chunk = ss2d_bwd_smem(p.N, p.R, nth, false) +
                            (chunk_async ? ss2d_bwd_chunk_raw_smem(p.N, p.R, int(sizeof(T))) : 0);
  const unsigned dtiles = unsigned((p.Dm + nth - 1) / nth);
  SS2D_NMAX_SWITCH(p.N, NMAX, [&] {
    const auto chunk_kernel = chunk_async ? ss2d_bwd_chunk_kernel<T, NMAX, true> : ss2d_bwd_chunk_kernel<T, NMAX, false>;
    if (smem_chunk > 48 * 1024)
      cudaFuncSetAttribute(chunk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_chunk));
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(ss2d_bwd_main_kernel<T, NMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    // The main pass's layout is sized for 4 blocks per SM at enc1 (4 x 55.3 KB with the 1 KB reserved
    // per block): ask for the whole unified L1 as shared memory rather than leave the split to the
    // driver's hint.
    cudaFuncSetAttribute(ss2d_bwd_main_kernel<T, NMAX>, cudaFuncAttributePreferredSharedMemoryCarveout,
                         int(cudaSharedmemCarveoutMaxShared));
    SS2DParams w = p;
    w.keep_delta = false;
    size_t smem_main = smem;
    const size_t with = smem + ss2d_bwd_delta_smem(nth);
    if (NMAX == 4 && with <= 227 * 1024) {  // the delta cache, where it costs no blocks per SM
      int without_blocks = 0, with_blocks = 0;
      cudaFuncSetAttribute(ss2d_bwd_main_kernel<T, NMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(with));
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&without_blocks, ss2d_bwd_main_kernel<T, NMAX>, nth, smem);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&with_blocks, ss2d_bwd_main_kernel<T, NMAX>, nth, with);
      w.keep_delta = with_blocks > 0 && with_blocks >= without_blocks;
      if (w.keep_delta) smem_main = with;
    }
    if (p.nc > 1) {
      chunk_kernel<<<dim3(unsigned(p.nc * 2 * p.Bt), dtiles), nth, smem_chunk, stream>>>(p);
      const int64_t total = int64_t(p.Bt) * 4 * p.Dm * p.N;
      ss2d_bwd_carry_kernel<T><<<unsigned((total + 255) / 256), 256, 0, stream>>>(p);
    }
    for (int side = 0; side < 2; ++side) {  // rows write du, columns duT
      w.side = side;
      ss2d_bwd_main_kernel<T, NMAX><<<dim3(unsigned(p.nc * p.Bt), dtiles), nth, smem_main, stream>>>(w);
    }
  });
  SS2DParams m = p;  // du += duT^T, in place
  m.acc = p.du;
  m.accT = p.duT;
  m.out = p.du;
  m.out_type = OutType::kFloat;
  ss2d_merge_f32_launch(m, stream);
}

}  // namespace vmambax
