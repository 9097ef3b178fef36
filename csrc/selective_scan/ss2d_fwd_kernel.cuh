// Forward: threads over channels, chunk carries by separate passes.
//
// A thread owns one channel d of one (b, walk pair) for one chunk of T consecutive positions of
// its side's plane (row side: the plane; column side: the transposed copy). Both walks of a pair
// (k and k + 2) cover the same positions of a chunk, in opposite orders, so the thread sums them.
// A block is nth <= 128 channels of the same (b, side, chunk): B, C and the low-rank dt of a tile
// of kTile positions are staged once in shared memory and read as broadcasts (float4 over states);
// u and delta (or delta formed from dt) are staged as a (channel, position) tile read coalesced
// along positions; y goes back through the same tile, written coalesced along positions. Where the
// rows allow (ss2d.h:ss2d_fwd_async_ok) the next tile is copied raw by cp.async while the current one
// is scanned (FwdTile::issue), and staging converts from shared memory.
//
// Launches (stream order):
//   1. chunk pass (only when a walk has several chunks): every (b, k, d, chunk) scans its chunk
//      from zero and writes its end state e (N floats) and the chunk's sum of delta S.
//   2. carry pass: per (b, k, d, n), over the chunks in walk order, replaces e[c] by the state
//      entering chunk c (h <- exp2(A2 * S_c) * h + e_c): nc exps per (b, k, d, n), negligible.
//   3. output pass, both sides in one launch: replays each chunk from its entering state; row side
//      acc = y_0 + y_2 in (H, W) planes, column side accT = y_1 + y_3 in (W, H) planes, each in its
//      own walk order (coalesced).
//   4. merge pass: out = acc + accT^T (out_dtype) through shared-memory tiles.
// No atomics, fixed order everywhere: bitwise deterministic. The entering states (cE) are what the
// backward keeps from the forward. The four walks sum as (y_0 + y_2) + (y_1 + y_3).
// Steps per element: chunk pass one exp2 + 3 FP32 ops, output pass one exp2 + 4 FP32 ops.
#pragma once
#include <algorithm>

#include "ss2d_common.cuh"

namespace vmambax {

// u's staging loads in flight per thread (FwdTile::load; a divisor of kTile): 8, and in the output
// pass at NMAX 16 the whole tile (UB = kTile), where u's staging was ~14 % of the pass's stall samples
// at enc1 (Nsight Compute, H200) and ptxas keeps it at 72 registers either way.
constexpr int kFwdStageBatch = 8;
// B, C and dt elements per thread whose loads are in flight together (FwdTile::load).
constexpr int kFwdStageBatchBC = 2;

// Pointers of walk k's inputs for batch b on its side, and its staging into shared memory.
template <typename T, int NMAX>
struct FwdTile {
  float *sB, *sC, *sDt, *sU, *sDl;  // sB/sC [kS][NS], sDt [R][kS], sU/sDl [nth][kS + 1]
  T *raw;  // ASYNC: the next tile as loaded, rows of kTile: [nth] u, [NMAX] B, [NMAX] C, [R] dt

  __device__ __forceinline__ FwdTile(float *smem, int R, int nth) {
    constexpr int NS = ss2d_ns(NMAX);
    sB = smem;
    sC = sB + kTile * NS;
    sDt = sC + kTile * NS;
    sU = sDt + R * kTile;
    sDl = sU + nth * (kTile + 1);
    raw = reinterpret_cast<T *>(sDl + nth * (kTile + 1));  // 16-byte aligned: nth is a multiple of 32
  }

  // ASYNC staging: starts the copies of positions [q0, q0 + cnt) for walk k into raw (rows of channels
  // >= Dm, states >= N and the 16-byte pieces past cnt as zeros), one commit group; load() waits for it.
  // raw must be free: every thread past the barrier that follows the previous load().
  __device__ __forceinline__ void issue(const SS2DParams &p, const SS2DSide &sd, int b, int k, int d0, int q0,
                                        int cnt, bool withC) {
    constexpr int SEG = 16 / int(sizeof(T)), SPR = kTile / SEG;  // elements per copy, copies per row
    // b through an opaque move: the addresses below are then formed at each call, not hoisted out of
    // the caller's loops (ptxas gave the output pass at NMAX 16 126 registers for the hoisted ones).
    asm volatile("mov.b32 %0, %0;" : "+r"(b));
    const int nth = blockDim.x, kk = k >> 1, rows = nth + 2 * NMAX + p.R;
    const T *u = static_cast<const T *>(sd.u) + b * sd.u_b + q0;
    const T *Bp = static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k + q0;
    const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k + q0;
    const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + q0;
#pragma unroll 1
    for (int e = threadIdx.x; e < rows * SPR; e += nth) {
      const int row = e / SPR, i = (e - row * SPR) * SEG;
      const T *src;
      bool on = i < cnt;
      if (row < nth) {
        on = on && d0 + row < p.Dm;
        src = u + int64_t(d0 + row) * sd.u_d + i;
      } else if (row < nth + NMAX) {
        const int n = row - nth;
        on = on && n < p.N;
        src = Bp + n * sd.B_n + i;
      } else if (row < nth + 2 * NMAX) {
        const int n = row - nth - NMAX;
        on = on && n < p.N && withC;
        src = Cp + n * sd.C_n + i;
      } else {
        src = dl + (row - nth - 2 * NMAX) * sd.dl_c + i;
      }
      cp_async16(raw + row * kTile + i, on ? src : static_cast<const T *>(sd.u), on ? 16 : 0);
    }
    cp_async_commit();
  }

  // load() from global memory directly (not ASYNC); the full-rank delta too.
  template <int UB>
  __device__ __forceinline__ void load_direct(const SS2DParams &p, const SS2DSide &sd, int b, int k, int d0,
                                              int q0, int cnt, bool withC) {
    constexpr int NS = ss2d_ns(NMAX);
    const int tid = threadIdx.x, nth = blockDim.x, N = p.N, R = p.R, kk = k >> 1;
    const T *Bp = static_cast<const T *>(sd.B) + b * sd.B_b + kk * sd.B_k + q0;
    const T *Cp = static_cast<const T *>(sd.C) + b * sd.C_b + kk * sd.C_k + q0;
    const T *dl = static_cast<const T *>(sd.dl) + b * sd.dl_b + kk * sd.dl_k + q0;
    // B, C and the low-rank dt with the loads of kFwdStageBatchBC elements of each in flight before
    // their stores, as in the backward's bwd_stage (one at a time, each was a dependent round trip:
    // 6 for B / C and 2 for dt per tile at enc1, N 16, R 6, nth 96).
    const int nbc = NMAX * kTile, ndt = R * kTile;
#pragma unroll 1
    for (int e0 = tid; e0 < max(nbc, ndt); e0 += kFwdStageBatchBC * nth) {
      float vb[kFwdStageBatchBC], vc[kFwdStageBatchBC], vt[kFwdStageBatchBC];
#pragma unroll
      for (int s = 0; s < kFwdStageBatchBC; ++s) {
        const int e = e0 + s * nth, n = e / kTile, i = e - n * kTile;  // n: the state, or dt's rank
        const bool on = e < nbc && n < N && i < cnt;
        vb[s] = on ? to_f(Bp[n * sd.B_n + i]) : 0.f;
        vc[s] = withC && on ? to_f(Cp[n * sd.C_n + i]) : 0.f;
        vt[s] = e < ndt && i < cnt ? to_f(dl[n * sd.dl_c + i]) : 0.f;
      }
#pragma unroll
      for (int s = 0; s < kFwdStageBatchBC; ++s) {
        const int e = e0 + s * nth, n = e / kTile, i = e - n * kTile;
        if (e < nbc) sB[i * NS + n] = vb[s];
        if (e < nbc && withC) sC[i * NS + n] = vc[s];
        if (e < ndt) sDt[e] = vt[s];
      }
    }
    // A fixed position per thread (tile_lane) and its kTile channels c0 + j cstep (nth = kTile cstep),
    // the first jend real (d < Dm, i < cnt). u's loads of kFwdStageBatch channels are issued before
    // their shared-memory stores: one channel at a time, each was a dependent global round trip (as
    // in the backward's bwd_stage, where batching them cut the main pass's waits on L1TEX).
    const int i = tile_lane(tid), cstep = nth / kTile, c0 = tid / kTile;
    const int cend = i < cnt ? min(nth, p.Dm - d0) : 0;
    const int jend = cend > c0 ? (cend - c0 + cstep - 1) / cstep : 0;
    const T *up = static_cast<const T *>(sd.u) + b * sd.u_b + q0 + i + int64_t(d0 + c0) * sd.u_d;
    const int64_t su = int64_t(cstep) * sd.u_d;
    float *ou = sU + c0 * (kTile + 1) + i;
#pragma unroll 1
    for (int j0 = 0; j0 < kTile; j0 += UB) {
      float v[UB];
      const T *u1 = up;
#pragma unroll
      for (int s = 0; s < UB; ++s, u1 += su) v[s] = j0 + s < jend ? to_f(*u1) : 0.f;
#pragma unroll
      for (int s = 0; s < UB; ++s) ou[s * cstep * (kTile + 1)] = v[s];
      up += UB * su;
      ou += UB * cstep * (kTile + 1);
    }
    if (R == 0) {  // full rank (outside the model): one channel at a time, as before
      for (int c = c0; c < nth; c += cstep) {
        const int d = d0 + c;
        const bool on = d < p.Dm && i < cnt;
        float z = on ? to_f(dl[int64_t(d) * sd.dl_c + i]) : 0.f;
        if (on && p.bias) z += p.bias[k * p.Dm + d];
        sDl[c * (kTile + 1) + i] = on ? (p.softplus ? softplus(z) : z) : 0.f;
      }
    }
  }

  // Converts the tile that issue() copied into raw (the caller waited for it and passed a barrier).
  __device__ __forceinline__ void convert(int R, bool withC) {
    constexpr int NS = ss2d_ns(NMAX);
    const int tid = threadIdx.x, nth = blockDim.x;
    const T *rB = raw + nth * kTile, *rC = rB + NMAX * kTile, *rT = rC + NMAX * kTile;
#pragma unroll 1
    for (int e = tid; e < NMAX * kTile; e += nth) {
      const int n = e / kTile, i = e - n * kTile;
      sB[i * NS + n] = to_f(rB[e]);
      if (withC) sC[i * NS + n] = to_f(rC[e]);
    }
#pragma unroll 1
    for (int e = tid; e < R * kTile; e += nth) sDt[e] = to_f(rT[e]);
#pragma unroll 4
    for (int e = tid; e < nth * kTile; e += nth) {
      const int c = e / kTile;
      sU[c * (kTile + 1) + (e - c * kTile)] = to_f(raw[e]);
    }
  }

  // Stages positions [q0, q0 + cnt) of the side's plane for walk k (kk = k >> 1), channels
  // d0 .. d0 + nth - 1 (those >= Dm as zeros). delta is stored after bias and softplus. ASYNC: the
  // tile is in raw already (issue, then the caller's wait and barrier). The two ways are separate
  // instantiations: in one kernel behind a runtime flag, ptxas held the output pass at NMAX 16 to
  // 124 registers (72 for either alone).
  template <bool ASYNC, int UB = kFwdStageBatch>
  __device__ __forceinline__ void load(const SS2DParams &p, const SS2DSide &sd, int b, int k, int d0, int q0,
                                       int cnt, bool withC) {
    const int tid = threadIdx.x, R = p.R;
    if constexpr (ASYNC) convert(R, withC);
    else load_direct<UB>(p, sd, b, k, d0, q0, cnt, withC);
    if (R > 0) {
      __syncthreads();  // sDt complete
      // delta[c][i] = W[k, d, :] . dt[:, i] + bias in fp32 by the channel's own thread: W[k, d, r]
      // is one load per 8 positions, dt[r][i..i+3] a float4 broadcast from shared memory.
      const int c = tid, d = d0 + c;
      float *out = sDl + c * (kTile + 1);
      if (d < p.Dm) {
        const float *Wk = p.Wdt + int64_t(k * p.Dm + d) * R;
        const float z0 = p.bias ? p.bias[k * p.Dm + d] : 0.f;
        for (int i0 = 0; i0 < kTile; i0 += 8) {
          float z[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) z[j] = z0;
          for (int r = 0; r < R; ++r) {
            const float w = __ldg(Wk + r);
            const float4 a = ld4(sDt + r * kTile + i0), b = ld4(sDt + r * kTile + i0 + 4);
            z[0] = fmaf(w, a.x, z[0]); z[1] = fmaf(w, a.y, z[1]); z[2] = fmaf(w, a.z, z[2]); z[3] = fmaf(w, a.w, z[3]);
            z[4] = fmaf(w, b.x, z[4]); z[5] = fmaf(w, b.y, z[5]); z[6] = fmaf(w, b.z, z[6]); z[7] = fmaf(w, b.w, z[7]);
          }
#pragma unroll
          for (int j = 0; j < 8; ++j)
            out[i0 + j] = i0 + j < cnt ? (p.softplus ? softplus(z[j]) : z[j]) : 0.f;
        }
      } else {
        for (int i = 0; i < kTile; ++i) out[i] = 0.f;
      }
    }
  }
};

// Pass 1: end state from zero and sum of delta of every chunk, both walks of both sides.
template <typename T, int NMAX, bool ASYNC>
__global__ void __launch_bounds__(kMaxThreads) ss2d_fwd_chunk_kernel(const SS2DParams p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int NS = ss2d_ns(NMAX);
  const ChunkBlock g(p, true);
  const SS2DSide &sd = p.sides[g.side];
  FwdTile<T, NMAX> tile(smem, p.R, blockDim.x);
  prefetch_chunk<T>(p, sd, g.b, g.d0, g.q0, g.q1, true, true, false, nullptr);
  const int c = threadIdx.x, d = g.d0 + c;
  const int ntile = (g.q1 - g.q0 + kTile - 1) / kTile;
  auto skip = [&](int kk) { return g.c == (kk ? 0 : p.nc - 1); };  // the walk's last chunk: nothing enters after it
  auto issue = [&](int kk, int jt) {  // ASYNC: tile jt (walk order) of walk kk into tile.raw
    const int q = g.q0 + (kk ? ntile - 1 - jt : jt) * kTile;
    tile.issue(p, sd, g.b, g.side + 2 * kk, g.d0, q, min(kTile, g.q1 - q), false);
  };
  if constexpr (ASYNC) issue(skip(0) ? 1 : 0, 0);  // nc > 1 here: at most one walk is skipped
  for (int kk = 0; kk < 2; ++kk) {
    if (skip(kk)) continue;
    const int k = g.side + 2 * kk;
    float A2[NMAX], h[NMAX];
    load_A2<NMAX>(p, k, d, A2);
#pragma unroll
    for (int n = 0; n < NMAX; ++n) h[n] = 0.f;
    float S = 0.f;
    for (int jt = 0; jt < ntile; ++jt) {
      const int tt = kk ? ntile - 1 - jt : jt;
      const int q = g.q0 + tt * kTile, cnt = min(kTile, g.q1 - q);
      if constexpr (ASYNC) cp_async_wait_all();
      __syncthreads();  // the previous tile is consumed (and, staged async, this one's copies are complete)
      tile.template load<ASYNC>(p, sd, g.b, k, g.d0, q, cnt, false);
      __syncthreads();
      if constexpr (ASYNC) {  // tile.raw is consumed: the next tile's copies (one call site: two cost registers)
        if (jt + 1 < ntile || (kk == 0 && !skip(1))) issue(jt + 1 < ntile ? kk : 1, jt + 1 < ntile ? jt + 1 : 0);
      }
      const float *su = tile.sU + c * (kTile + 1), *sl = tile.sDl + c * (kTile + 1);
      for (int s = 0; s < cnt; ++s) {
        const int i = kk ? cnt - 1 - s : s;
        const float dl = sl[i], du = dl * su[i];
        S += dl;
        const float *bi = tile.sB + i * NS;
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
    if (d < p.Dm) {
      const int64_t row = chunk_row(p, g.b, k, g.c);
      p.cS[row * p.Dm + d] = S;
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < p.N) p.cE[(row * p.N + n) * p.Dm + d] = h[n];
    }
  }
}

// Pass 2: e[c] <- the state entering chunk c of its walk (k < 2: chunks ascending, else descending),
// h <- exp2(A2 * S_c) * h + e_c (carry_pass). Templated on the input type only so that each
// translation unit has its own symbol.
template <typename T>
__global__ void __launch_bounds__(256) ss2d_fwd_carry_kernel(const SS2DParams p) {
  carry_pass<true>(p, p.cE);
}

// Pass 3: replay each chunk from its entering state; the pair's y into acc (row side, original planes)
// or accT (column side, transposed planes), both at the block's own positions q + i of its side's
// plane: coalesced along positions on both sides. The second walk's read-add-writes issue
// kRmwBatchFwd loads per thread before their stores (acc may alias out, so the compiler keeps each
// load after the previous store: one dependent round trip per element otherwise).
//
// Until this change the column side added y_1 and y_3 into acc at the original positions (stride W
// between consecutive positions of its walk): every element its own 32-byte sector. That column pass
// took 2.21 ms against the row pass's 0.88 at enc1 (Nsight Compute, H100, 1.6 GHz; L1 hit rate 21 %,
// half of its cycles waiting on the global-load scoreboard), 58.6 ms of a 371 ms training step for
// both passes. Bytes per element, enc1 (Bt 8, Dm 192, 128 x 128: E = 25.2 M elements), bf16 out:
//   before: rows 12 B (acc write; read + write), coalesced; columns acc read + write, read, out
//           write = 14 B useful in 4 separate sectors = 128 B of L1 <-> L2 sector traffic.
//           140 B x E = 3.5 GB of sector traffic; DRAM floor ~10 B x E (acc written back once, read
//           once, out written) if L2 catches the rest.
//   after:  rows 12 B, columns 12 B (accT), merge 10 B (acc 4 + accT 4 read, out 2 written; fp32
//           out 12 B, in place), all coalesced: 34 B x E = 0.86 GB (4.1x less); DRAM floor ~18 B x E
//           (+8 B x E = +201 MB, ~0.07 ms at 3 TB/s: accT written back and read once more).
//   Memory: accT is one more fp32 (Bt, Dm, L) buffer for the op's duration: 100.7 MB at enc1.
template <typename T, int NMAX, bool ASYNC>
__global__ void __launch_bounds__(kMaxThreads) ss2d_fwd_out_kernel(const SS2DParams p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int NS = ss2d_ns(NMAX);
  const ChunkBlock g(p, true);  // both sides in one launch: they write separate buffers
  const SS2DSide &sd = p.sides[g.side];
  FwdTile<T, NMAX> tile(smem, p.R, blockDim.x);
  prefetch_chunk<T>(p, sd, g.b, g.d0, g.q0, g.q1, true, true, true, nullptr);
  const int c = threadIdx.x, d = g.d0 + c, nth = blockDim.x, L = p.L;
  const bool active = d < p.Dm;
  const int ntile = (g.q1 - g.q0 + kTile - 1) / kTile;
  float *const dst = g.side ? p.accT : p.acc;
  auto issue = [&](int kk, int jt) {  // ASYNC: tile jt (walk order) of walk kk into tile.raw
    const int q = g.q0 + (kk ? ntile - 1 - jt : jt) * kTile;
    tile.issue(p, sd, g.b, g.side + 2 * kk, g.d0, q, min(kTile, g.q1 - q), true);
  };
  if constexpr (ASYNC) issue(0, 0);
  for (int kk = 0; kk < 2; ++kk) {
    const int k = g.side + 2 * kk;
    float A2[NMAX], h[NMAX];
    load_A2<NMAX>(p, k, d, A2);
    const int64_t row = chunk_row(p, g.b, k, g.c);
#pragma unroll
    for (int n = 0; n < NMAX; ++n)
      h[n] = (p.nc > 1 && active && n < p.N) ? p.cE[(row * p.N + n) * p.Dm + d] : 0.f;
    const float Dk = (p.D && active) ? p.D[k * p.Dm + d] : 0.f;
    for (int jt = 0; jt < ntile; ++jt) {
      const int tt = kk ? ntile - 1 - jt : jt;
      const int q = g.q0 + tt * kTile, cnt = min(kTile, g.q1 - q);
      if constexpr (ASYNC) cp_async_wait_all();
      __syncthreads();  // the previous tile is stored (and, staged async, this one's copies are complete)
      tile.template load<ASYNC, NMAX >= 16 ? kTile : kFwdStageBatch>(p, sd, g.b, k, g.d0, q, cnt, true);
      __syncthreads();
      if constexpr (ASYNC) {  // tile.raw is consumed: the next tile's copies (one call site: two cost registers)
        if (jt + 1 < ntile || kk == 0) issue(jt + 1 < ntile ? kk : 1, jt + 1 < ntile ? jt + 1 : 0);
      }
      float *su = tile.sU + c * (kTile + 1);
      const float *sl = tile.sDl + c * (kTile + 1);
      for (int s = 0; s < cnt; ++s) {
        const int i = kk ? cnt - 1 - s : s;
        const float uu = su[i], dl = sl[i], du = dl * uu;
        const float *bi = tile.sB + i * NS, *ci = tile.sC + i * NS;
        float y0 = Dk * uu, y1 = 0.f, y2 = 0.f, y3 = 0.f;
#pragma unroll
        for (int n = 0; n < NMAX; n += 4) {
          const float4 b4 = ld4(bi + n), c4 = ld4(ci + n);
          h[n] = fmaf(ex2(dl * A2[n]), h[n], du * b4.x);
          h[n + 1] = fmaf(ex2(dl * A2[n + 1]), h[n + 1], du * b4.y);
          h[n + 2] = fmaf(ex2(dl * A2[n + 2]), h[n + 2], du * b4.z);
          h[n + 3] = fmaf(ex2(dl * A2[n + 3]), h[n + 3], du * b4.w);
          y0 = fmaf(c4.x, h[n], y0);
          y1 = fmaf(c4.y, h[n + 1], y1);
          y2 = fmaf(c4.z, h[n + 2], y2);
          y3 = fmaf(c4.w, h[n + 3], y3);
        }
        su[i] = (y0 + y1) + (y2 + y3);  // y replaces u in the staged tile (own slot, read above)
      }
      __syncthreads();  // the tile's y is complete
      // Store along positions. Per element, the same thread of this block reads back what its first
      // walk wrote, so no fences are needed. The thread's position i is fixed (tile_lane), so its
      // offset is computed once per tile and stepped across its channels (recomputed per element, the
      // addresses were 7 of the column pass's 22 instructions per element-state, Nsight Compute).
      const bool first = kk == 0;
      const int i = tile_lane(c), cstep = nth / kTile, nact = min(nth, p.Dm - g.d0);
      if (i < cnt) {
        const int64_t step = int64_t(cstep) * L;  // between the channels a thread takes
        int64_t o = (int64_t(g.b) * p.Dm + g.d0 + c / kTile) * L + q + i;
        const float *ys = tile.sU + (c / kTile) * (kTile + 1) + i;
        for (int c0 = c / kTile; c0 < nact; c0 += kRmwBatchFwd * cstep) {
          float prev[kRmwBatchFwd];
#pragma unroll
          for (int u = 0; u < kRmwBatchFwd; ++u)  // loads first (distinct elements: no ordering needed)
            prev[u] = (c0 + u * cstep < nact && !first) ? dst[o + u * step] : 0.f;
#pragma unroll
          for (int u = 0; u < kRmwBatchFwd; ++u) {
            if (c0 + u * cstep >= nact) break;
            const float y = ys[u * cstep * (kTile + 1)];
            dst[o + u * step] = first ? y : prev[u] + y;
          }
          o += kRmwBatchFwd * step;
          ys += kRmwBatchFwd * cstep * (kTile + 1);
        }
      }
    }
  }
}

// Pass 4 (planes with both sides >= kMergeTile, or > kMergeFlat positions): out = acc + accT^T over
// square tiles of kMergeTile. A block loads its tile's acc rows into registers, accT's rows (the
// tile's columns, contiguous along h) into shared memory, and writes out along rows: every global
// access is along a row of its own layout (coalesced). The tile's row stride kMergeTile + 1 keeps
// both the row-wise writes and the column-wise reads of shared memory free of bank conflicts. When
// out is fp32 it is acc: each element is read and then written by the same thread (in place).
// Templated on the input type only so that each translation unit has its own symbol.
template <typename T, typename O>
__global__ void __launch_bounds__(kMergeTile * kMergeRows) ss2d_fwd_merge_tiled_kernel(const SS2DParams p) {
  constexpr int RPT = kMergeTile / kMergeRows;  // rows per thread
  __shared__ float s[kMergeTile][kMergeTile + 1];  // [w - w0][h - h0]
  const int H = p.H, W = p.W, tx = threadIdx.x, ty = threadIdx.y;
  const int tiles_w = (W + kMergeTile - 1) / kMergeTile, tiles_h = (H + kMergeTile - 1) / kMergeTile;
  const int64_t per_plane = int64_t(tiles_w) * tiles_h, total = int64_t(p.Bt) * p.Dm * per_plane;
  O *out = static_cast<O *>(p.out);
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t plane = blk / per_plane;
    const int t = int(blk - plane * per_plane), th = t / tiles_w;
    const int h0 = th * kMergeTile, w0 = (t - th * tiles_w) * kMergeTile;
    const float *a = p.acc + plane * p.L, *at = p.accT + plane * p.L;
    float r[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) {  // acc: rows h of the tile, along w
      const int h = h0 + ty + j * kMergeRows, w = w0 + tx;
      r[j] = (h < H && w < W) ? a[h * W + w] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < RPT; ++j) {  // accT: rows w of its planes, along h
      const int w = w0 + ty + j * kMergeRows, h = h0 + tx;
      if (w < W && h < H) s[ty + j * kMergeRows][tx] = at[w * H + h];
    }
    __syncthreads();
    O *o = out + plane * p.L;
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      const int h = h0 + ty + j * kMergeRows, w = w0 + tx;
      if (h < H && w < W) o[h * W + w] = from_f<O>(r[j] + s[tx][ty + j * kMergeRows]);
    }
    __syncthreads();  // s is consumed before the next tile overwrites it
  }
}

// Pass 4 for small planes (both sides < kMergeTile and <= kMergeFlat positions, e.g. DCIM's 4 x 4)
// and for H = 1 or W = 1 (accT's plane is then acc's: the gather below is the identity): a block
// takes ppb whole planes (ppb * L <= kMergeFlat positions, or one plane when L > kMergeFlat) and
// walks them in out's order, gathering accT from the same planes. A small plane's accT (<= 4 KB)
// is read by one block only, so its sectors are fetched once and served from L1 afterwards.
// kFlatBatch loads per thread before its stores (out may alias acc).
constexpr int kFlatBatch = 4, kFlatThreads = kMergeFlat / kFlatBatch;
template <typename T, typename O>
__global__ void __launch_bounds__(kFlatThreads) ss2d_fwd_merge_flat_kernel(const SS2DParams p, int ppb) {
  const int H = p.H, W = p.W, L = p.L;
  const int64_t planes = int64_t(p.Bt) * p.Dm;
  O *out = static_cast<O *>(p.out);
  for (int64_t blk = blockIdx.x; blk * ppb < planes; blk += gridDim.x) {
    const int64_t p0 = blk * ppb, base = p0 * L;
    const int n = int(min(int64_t(ppb), planes - p0)) * L;  // positions of this block
    const float *a = p.acc + base, *at = p.accT + base;
    O *o = out + base;
    for (int e0 = threadIdx.x; e0 < n; e0 += kFlatBatch * kFlatThreads) {
      float r[kFlatBatch];
#pragma unroll
      for (int j = 0; j < kFlatBatch; ++j) {
        const int e = e0 + j * kFlatThreads;
        if (e < n) {
          const int pl = e / L, pos = e - pl * L, h = pos / W, w = pos - h * W;
          r[j] = a[e] + at[pl * L + w * H + h];
        }
      }
#pragma unroll
      for (int j = 0; j < kFlatBatch; ++j)
        if (e0 + j * kFlatThreads < n) o[e0 + j * kFlatThreads] = from_f<O>(r[j]);
    }
  }
}

template <typename T, typename O>
void ss2d_fwd_merge_launch(const SS2DParams &p, cudaStream_t stream) {
  constexpr int64_t kMaxGrid = int64_t(1) << 30;  // grid-stride loops cover the rest
  const int64_t planes = int64_t(p.Bt) * p.Dm;
  if (ss2d_merge_flat(p.H, p.W)) {
    const int ppb = p.L >= kMergeFlat ? 1 : kMergeFlat / p.L;
    const int64_t blocks = std::min((planes + ppb - 1) / ppb, kMaxGrid);
    ss2d_fwd_merge_flat_kernel<T, O><<<unsigned(blocks), kFlatThreads, 0, stream>>>(p, ppb);
  } else {
    const int64_t tiles = int64_t((p.H + kMergeTile - 1) / kMergeTile) * ((p.W + kMergeTile - 1) / kMergeTile);
    const int64_t blocks = std::min(planes * tiles, kMaxGrid);
    ss2d_fwd_merge_tiled_kernel<T, O><<<unsigned(blocks), dim3(kMergeTile, kMergeRows), 0, stream>>>(p);
  }
}

template <typename T, int NMAX, bool ASYNC>
void ss2d_fwd_scan_launch(const SS2DParams &p, size_t smem, cudaStream_t stream) {
  const dim3 grid(unsigned(p.nc * 2 * p.Bt), unsigned((p.Dm + p.nth - 1) / p.nth));
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(ss2d_fwd_chunk_kernel<T, NMAX, ASYNC>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    cudaFuncSetAttribute(ss2d_fwd_out_kernel<T, NMAX, ASYNC>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  }
  if (p.nc > 1) {
    ss2d_fwd_chunk_kernel<T, NMAX, ASYNC><<<grid, p.nth, smem, stream>>>(p);
    const int64_t total = int64_t(p.Bt) * 4 * p.Dm * p.N;
    ss2d_fwd_carry_kernel<T><<<unsigned((total + 255) / 256), 256, 0, stream>>>(p);
  }
  ss2d_fwd_out_kernel<T, NMAX, ASYNC><<<grid, p.nth, smem, stream>>>(p);
}

template <typename T>
void ss2d_fwd_launch(const SS2DParams &p, cudaStream_t stream) {
  const size_t smem = ss2d_fwd_smem(p.N, p.R, p.nth), raw = ss2d_fwd_raw_smem(p.N, p.R, p.nth, int(sizeof(T)));
  const bool async = ss2d_fwd_async_ok(p, int(sizeof(T))) && smem + raw <= 227 * 1024;
  SS2D_NMAX_SWITCH(p.N, NMAX, [&] {
    if (async) ss2d_fwd_scan_launch<T, NMAX, true>(p, smem + raw, stream);
    else ss2d_fwd_scan_launch<T, NMAX, false>(p, smem, stream);
  });
  if (p.out_type == OutType::kFloat) ss2d_fwd_merge_launch<T, float>(p, stream);
  else if (p.out_type == OutType::kBFloat16) ss2d_fwd_merge_launch<T, __nv_bfloat16>(p, stream);
  else ss2d_fwd_merge_launch<T, __half>(p, stream);
}

}  // namespace vmambax
