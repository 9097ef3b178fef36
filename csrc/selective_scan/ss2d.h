// Four-direction 2D selective scan: parameters shared by the bindings and the kernels.
// Plain C++ (no torch headers) so the .cu files compile against the CUDA toolkit alone.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace vmambax {

enum class OutType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// The tensors one pair of walks reads and writes. Row walks (k = 0, 2) use the tensors as given;
// column walks (k = 1, 3) use copies transposed to (W, H) planes so that every walk reads its plane
// in memory order (coalesced). Index k >> 1 selects the walk of a pair: strides of the row side's
// 4-wide k dimension are doubled. Planes are dense; strides are in elements.
struct SS2DSide {
  const void *u, *dl, *B, *C;  // u (Bt, Dm, L); dl = delta (.., Dm, L) or dt (.., R, L); B, C (.., N, L)
  int64_t u_b, u_d, dl_b, dl_k, dl_c, B_b, B_k, B_n, C_b, C_k, C_n;
  float *ddl, *dB, *dC;        // backward: gradients in the same layout (fp32, contiguous)
  int64_t ddl_b, ddl_k, g_b, g_k;  // strides of ddl and of dB / dC (their n stride is L)
};

struct SS2DParams {
  int Bt, Dm, H, W, L, N, R;  // R > 0: delta is formed in-kernel from dt (low rank)
  bool softplus;
  // Work split (see ss2d_layout): LP lanes walk one (b, d) plane in chunks of CH positions; a
  // span is LP * CH consecutive steps of a walk; nsp spans per walk.
  int LP, CH, nsp;
  SS2DSide side[2];   // [0]: row walks, [1]: column walks
  const float *A;     // (4, Dm, N) contiguous
  const float *D;     // (4, Dm) or null
  const float *bias;  // (4, Dm) or null
  const float *Wdt;   // (4, Dm, R) low-rank projection, or null
  // Forward outputs, (Bt, Dm, L) in the original layout.
  float *acc;         // fp32 merge buffer; == out when out is fp32
  void *out;
  OutType out_type;
  float *states;      // (Bt, Dm, 4, nsp - 1, N): state at the start of spans 1.. ; null: not saved
  // Backward, original layout, fp32.
  const float *dy;    // (Bt, Dm, L) contiguous
  float *du;          // (Bt, Dm, L)
  float *dA;          // (4, Dm, N), zero-initialised
  float *dD, *dbias;  // (4, Dm) or null, zero-initialised
  float *dW;          // (4, Dm, R) or null, zero-initialised
};

// Chunk length per lane for a state bucket: CH * NMAX = 64 registers of per-step state per lane.
constexpr int ss2d_chunk(int nmax) { return 64 / nmax; }
inline int ss2d_nmax(int N) { return N <= 4 ? 4 : (N <= 16 ? 16 : 64); }

// Fills LP, CH, nsp from L and N (mirrored by vmambax_kernels/selective_scan/cuda.py:_layout).
inline void ss2d_layout(SS2DParams &p) {
  p.CH = ss2d_chunk(ss2d_nmax(p.N));
  int chunks = (p.L + p.CH - 1) / p.CH;
  p.LP = 1;
  while (p.LP < chunks && p.LP < 32) p.LP *= 2;
  int span = p.LP * p.CH;
  p.nsp = (p.L + span - 1) / span;
}

// Forward v3 (ss2d_fwd_v3_kernel.cuh, opt-in): threads over channels, chunks of T positions.
struct SS2DV3Params {
  SS2DParams p;   // as for v2 (LP, CH, nsp give the saved states' span layout)
  int T, nc;      // positions per chunk, chunks per walk
  int nth;        // threads (channels) per block, a multiple of 32, <= 128
  int side;       // set by the launcher for the output pass
  float *cS;      // (Bt, 4, nc, Dm): sum of delta per chunk; null when nc == 1
  float *cE;      // (Bt, 4, nc, N, Dm): chunk end state from zero, then the state entering the chunk
};

// Chunk length of v3: the chunk pass costs one more exp2 per element whatever T is; the carry
// pass costs L / T sequential steps per (b, k, d, n). 128 positions = 4 staged tiles.
constexpr int kV3Chunk = 128;

// Channels per block: the multiple of 32 <= 128 that wastes the fewest threads on Dm (larger wins ties).
inline int ss2d_v3_threads(int Dm) {
  int best = 32, waste_best = 1 << 30;
  for (int w = 1; w <= 4; ++w) {
    const int nth = 32 * w, waste = (Dm + nth - 1) / nth * nth - Dm;
    if (waste <= waste_best) { best = nth; waste_best = waste; }
  }
  return best;
}

// Positions per staged tile (shared memory per block ~ 2 * nth * (kS + 1) floats + B, C, dt).
constexpr int kV3Tile = 32;
constexpr int kV3MaxThreads = 128;

inline int ss2d_v3_nmax(int N) { return N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : N <= 32 ? 32 : 64; }
// Row stride of the staged B / C tiles: a multiple of 4 (float4 reads), padded against bank conflicts.
constexpr int ss2d_v3_ns(int nmax) { return nmax + 4; }

// Dynamic shared memory of a v3 kernel (bytes), for the host launcher and the bindings' check.
inline size_t ss2d_v3_smem(int N, int R, int nth) {
  const int ns = ss2d_v3_ns(ss2d_v3_nmax(N));
  return sizeof(float) * (size_t(2) * kV3Tile * ns + size_t(R) * kV3Tile + size_t(2) * nth * (kV3Tile + 1));
}

template <typename T> void ss2d_fwd_launch(const SS2DParams &p, cudaStream_t stream);
template <typename T> void ss2d_fwd_v3_launch(const SS2DV3Params &v, cudaStream_t stream);
template <typename T> void ss2d_bwd_launch(const SS2DParams &p, cudaStream_t stream);

}  // namespace vmambax
