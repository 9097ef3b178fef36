// Four-direction 2D selective scan: parameters shared by the bindings and the kernels.
// Plain C++ (no torch headers) so the .cu files compile against the CUDA toolkit alone.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace vmambax {

enum class OutType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

struct SS2DParams {
  int Bt, Dm, H, W, L, N, R;  // R > 0: delta is formed in-kernel from dt (low rank)
  bool softplus;
  // Work split (see ss2d_layout): LP lanes walk one (b, d) plane in chunks of CH positions; a
  // span is LP * CH consecutive steps of a walk; nsp spans per walk.
  int LP, CH, nsp;
  // Inputs. u (Bt, Dm, L); dl = delta (Bt, 4, Dm, L) or dt (Bt, 4, R, L); B, C (Bt, 4, N, L).
  // Planes are dense; the outer strides are given in elements.
  const void *u, *dl, *B, *C;
  int64_t u_b, u_d, dl_b, dl_k, dl_c, B_b, B_k, B_n, C_b, C_k, C_n;
  const float *A;     // (4, Dm, N) contiguous
  const float *D;     // (4, Dm) or null
  const float *bias;  // (4, Dm) or null
  const float *Wdt;   // (4, Dm, R) low-rank projection, or null
  // Forward outputs.
  float *acc;         // (Bt, Dm, L) fp32 merge buffer; == out when out is fp32
  void *out;          // (Bt, Dm, L)
  OutType out_type;
  float *states;      // (Bt, Dm, 4, nsp - 1, N): state at the start of spans 1.. ; null: not saved
  // Backward (all fp32, zero-initialised where accumulated).
  const float *dy;    // (Bt, Dm, L) contiguous
  float *du;          // (Bt, Dm, L)
  float *ddl;         // ddelta (Bt, 4, Dm, L) or ddt (Bt, 4, R, L)
  float *dB, *dC;     // (Bt, 4, N, L)
  float *dA;          // (4, Dm, N)
  float *dD, *dbias;  // (4, Dm) or null
  float *dW;          // (4, Dm, R) or null
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

template <typename T> void ss2d_fwd_launch(const SS2DParams &p, cudaStream_t stream);
template <typename T> void ss2d_bwd_launch(const SS2DParams &p, cudaStream_t stream);

}  // namespace vmambax
