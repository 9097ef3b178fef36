// Four-direction 2D selective scan: parameters shared by the bindings and the kernels.
// Plain C++ (no torch headers) so the .cu files compile against the CUDA toolkit alone.
#pragma once
#include <cstdint>
#include <initializer_list>
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
  const float *dy;             // backward: dy (Bt, Dm, L) fp32 contiguous, in this side's layout
  // Backward: gradients in this side's layout, contiguous. dB, dC and the low-rank ddt (R > 0) are
  // sums over channel tiles (atomics) into buffers of SS2DAcc<T>::type (double for fp32 inputs: the
  // kernel reinterpret_casts these pointers); the full-rank ddelta (R == 0) is written once per
  // element by its owner: float. Declared float *: as void * (static_cast in the kernel) nvcc
  // compiled even the 16-bit kernels differently, and their main pass at NMAX 4, 8, 16 spilled
  // (16-24 bytes of stack, none before).
  float *ddl, *dB, *dC;
  int64_t ddl_b, ddl_k, g_b, g_k;  // strides of ddl and of dB / dC (their d / r / n stride is L)
};

// Element type of the backward's global channel sums (dB, dC, low-rank ddt) for input dtype T: each
// block adds its fp32 partial with one atomic. For fp32 inputs (the accuracy path) double: a sum of a
// few fp32 addends is exact in float64 (unless their magnitudes differ by more than ~2^28, and then
// only bits far below fp32's last place are rounded), so the single rounding to fp32 after the launch
// does not depend on the blocks' order but in vanishingly rare ties: with the float64 parameter sums
// below, the fp32 backward is deterministic in practice. For 16-bit inputs (training) float: half
// the atomic and buffer traffic, rounding in the blocks' order.
template <typename T> struct SS2DAcc { using type = float; };
template <> struct SS2DAcc<float> { using type = double; };

// Work split (ss2d_fwd_kernel.cuh, ss2d_bwd_kernel.cuh): a thread owns one channel of one
// (b, walk pair) for one chunk of T consecutive positions of its side's plane; a block is nth
// channels of one (b, side, chunk). Chunk carries go through separate chunk and carry passes.
struct SS2DParams {
  int Bt, Dm, H, W, L, N, R;  // R > 0: delta is formed in-kernel from dt (low rank)
  bool softplus;
  int T, nc;          // positions per chunk, chunks per walk
  int nth;            // threads (channels) per block, a multiple of 32, <= 128
  int side;           // set by the launcher for the passes that run one side at a time
  bool keep_delta;    // backward main pass: delta of the replayed sub-tiles kept (ss2d_bwd_delta_smem)
  SS2DSide sides[2];  // [0]: row walks, [1]: column walks
  const float *A;     // (4, Dm, N) contiguous
  const float *D;     // (4, Dm) or null
  const float *bias;  // (4, Dm) or null
  const float *Wdt;   // (4, Dm, R) low-rank projection, or null
  // Forward outputs. The row walks' sum goes to acc in the original (H, W) planes, the column walks'
  // sum to accT in transposed (W, H) planes (both in their walk's memory order: coalesced), and the
  // merge pass writes out = acc + accT^T in out_type.
  float *acc;         // (Bt, Dm, L) fp32, original layout; == out when out is fp32 (merged in place)
  float *accT;        // (Bt, Dm, L) fp32, (W, H) planes; transient, freed when the op returns
  void *out;
  OutType out_type;
  // Carries, chunk c of walk k of batch b at row (b * 4 + k) * nc + c; null when nc == 1.
  float *cS;          // (Bt, 4, nc, Dm): sum of delta over the chunk
  float *cE;          // (Bt, 4, nc, N, Dm): forward: the state entering the chunk (saved for the backward)
  float *cQ;          // (Bt, 4, nc, N, Dm): backward: a_{t+1} dh_{t+1} entering the chunk's last step
  // Backward, fp32: du of the row walks in the original layout, of the column walks in (W, H) planes
  // (each side's read-add-writes along its own walk: coalesced), summed by the forward's merge pass.
  // Written in the original layout, the column side's were a separate sector per element (stride W):
  // at dec3 (N 4) its main pass took 3.14 ms against the row side's 1.84 (Nsight Compute, H100).
  float *du;          // (Bt, Dm, L)
  float *duT;         // (Bt, Dm, L), (W, H) planes; transient
  // Parameter gradients, zero-initialised float64: each block adds its fp32 partial (a chunk's sum)
  // with one atomic; in fp32 the Bt * nc partials' order-dependent rounding put the whole-model
  // test's A_logs and dt_projs_bias gradients just past twice the float32 reference's error.
  double *dA;           // (4, Dm, N)
  double *dD, *dbias;   // (4, Dm) or null
  double *dW;           // (4, Dm, R) or null
};

// Plane p of a batch of planes starts at (p / inner) * stride_outer + (p % inner) * stride_inner
// elements from the base pointer (the tensor's leading dims collapsed into two).
struct PlaneMap {
  int64_t inner, stride_outer, stride_inner;
};

// dst plane p (W x H, dense) = the transpose of src plane p (H x W, dense); elem_bytes 2 or 4
// (ss2d_transpose.cu).
void ss2d_transpose_launch(const void *src, void *dst, int64_t planes, int H, int W, PlaneMap ms, PlaneMap md,
                           int elem_bytes, cudaStream_t stream);

// Loads in flight: the carry passes read kCarryBatch chunks per thread before storing any (one chunk
// at a time, each is a dependent global round trip); the output passes' read-add-writes (acc
// forward, du backward) issue kRmwBatchFwd / kRmwBatchBwd loads per thread before their stores.
constexpr int kCarryBatch = 8;  // 16 took 88-96 registers (2 blocks of 256 per SM); 8: ~50
// Forward 4: with 8 the output pass at NMAX 16 took 96 registers and spilled 8 bytes (4: 72, no
// spill, as with one element at a time); 4 x 21 warps x 32 lanes of sectors in flight per SM is
// already past what hides DRAM latency. Backward 8: no register cost at 168 (no spill at NMAX 16).
constexpr int kRmwBatchFwd = 4, kRmwBatchBwd = 8;

// Chunk length. The forward's chunk pass costs one more exp2 per element whatever T is; the carry
// passes cost L / T sequential steps per (b, k, d, n); the saved entering states are 1 / T of a
// (Bt, 4, Dm, L, N) tensor (100 MB fp32 at enc1); the backward keeps the states entering each
// sub-tile of its chunk in shared memory (T / kBwdTile of them).
constexpr int kChunk = 64;

// Channels per block: the multiple of 32 <= 128 that wastes the fewest threads on Dm (larger wins ties).
inline int ss2d_threads(int Dm) {
  int best = 32, waste_best = 1 << 30;
  for (int w = 1; w <= 4; ++w) {
    const int nth = 32 * w, waste = (Dm + nth - 1) / nth * nth - Dm;
    if (waste <= waste_best) { best = nth; waste_best = waste; }
  }
  return best;
}

inline int ss2d_chunks(int L) { return (L + kChunk - 1) / kChunk; }

// Forward merge pass (out = acc + accT^T): square tiles of kMergeTile positions through shared memory,
// kMergeTile x kMergeRows threads (each kMergeTile / kMergeRows rows of the tile). Planes with a side
// below kMergeTile and at most kMergeFlat positions (and H = 1 or W = 1 planes, where the two layouts
// coincide) go through a flat kernel that packs whole planes into a block instead (a 4 x 4 plane
// would use 16 of a 32 x 32 tile's 1024 slots).
constexpr int kMergeTile = 32, kMergeRows = 8, kMergeFlat = 1024;
inline bool ss2d_merge_flat(int H, int W) {
  const int m = H < W ? H : W;
  return m == 1 || (m < kMergeTile && int64_t(H) * W <= kMergeFlat);
}

// Forward: positions per staged tile (shared memory per block ~ 2 * nth * (kTile + 1) floats + B, C, dt).
// 16, not 32: at 32 the tiles took 31 KB a block at enc1 (nth 96), so shared memory held the SM to 7
// blocks (21 warps; Nsight Compute, H100: 1.1 eligible warps per scheduler, 60 % issue); at 16 they
// take 16 KB and registers set the limit (8-9 blocks). Same call, H200, SS2D core bf16 (fwd / fwd+bwd
// ms), with the branch-free softplus: enc1 2.78 / 9.85 -> 2.70 / 9.44, dcim_inner1 1.95 / 8.07 ->
// 1.58 / 7.67, dec3 1.91 / 5.91 -> 1.85 / 5.69; model inference from a graph 65.8 -> 64.4 ms, compiled
// and from a graph 56.0 -> 54.3 ms (results/ab/1220521-vs-606c269.*).
constexpr int kTile = 16;
constexpr int kMaxThreads = 128;

inline int ss2d_nmax(int N) { return N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : N <= 32 ? 32 : 64; }
// Row stride of the staged B / C tiles: a multiple of 4 (float4 reads), padded against bank conflicts.
constexpr int ss2d_ns(int nmax) { return nmax + 4; }

// Dynamic shared memory of a forward kernel (bytes), for the host launcher and the bindings' check.
inline size_t ss2d_fwd_smem(int N, int R, int nth) {
  const int ns = ss2d_ns(ss2d_nmax(N));
  return sizeof(float) * (size_t(2) * kTile * ns + size_t(R) * kTile + size_t(2) * nth * (kTile + 1));
}

// The forward's asynchronous staging (ss2d_fwd_kernel.cuh:FwdTile::issue): the next tile's u, B, C and
// low-rank dt are copied raw (16 bytes at a time) into a shared buffer while the current tile is
// scanned, so the staging no longer waits on L2 / DRAM (its loads were 22-28 % of the forward passes'
// stall samples, Nsight Compute). Needs 16-byte aligned rows: every base pointer aligned, every stride
// and L a multiple of 16 bytes' worth of elements (chunks and tiles then start on such a boundary, and a
// tile's tail is whole 16-byte pieces). Full rank (R == 0, outside the model) keeps the direct loads,
// and so do planes of one tile (L <= kTile: nothing to overlap but the second walk's tile), where the
// copies' 8 registers more cost more than they hid (dcim_inner1, 4 x 4 planes, 1.55 -> 1.57 ms).
// Same call, H200, SS2D core bf16 forward: enc1 2.675 -> 2.617 ms, enc3 0.808 -> 0.783, dec3 1.843 ->
// 1.777, rect1 2.027 -> 1.981 (results/ab/9f37ccc-fwd-async-vs-3b12a1d.*).
inline size_t ss2d_fwd_raw_smem(int N, int R, int nth, int elem) {
  return size_t(elem) * kTile * (size_t(nth) + 2 * ss2d_nmax(N) + R);
}
// Rows copied 16 bytes at a time: every pointer 16-byte aligned, every stride a multiple of seg elements.
inline bool ss2d_rows_aligned(std::initializer_list<const void *> ptrs, std::initializer_list<int64_t> strides,
                              int64_t seg) {
  for (const void *ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t st : strides)
    if (st % seg) return false;
  return true;
}
inline bool ss2d_fwd_async_ok(const SS2DParams &p, int elem) {
  const int64_t seg = 16 / elem;
  if (p.R == 0 || p.L <= kTile || p.L % seg) return false;
  for (const SS2DSide &s : p.sides)
    if (!ss2d_rows_aligned({s.u, s.dl, s.B, s.C},
                           {s.u_b, s.u_d, s.dl_b, s.dl_k, s.dl_c, s.B_b, s.B_k, s.B_n, s.C_b, s.C_k, s.C_n}, seg))
      return false;
  return true;
}

// Backward: positions per sub-tile (registers hold 7 per-step values per thread and sub-tile).
constexpr int kBwdTile = 16;
constexpr int kBwdSub = kChunk / kBwdTile;

// Dynamic shared memory of the backward kernels (bytes), see ss2d_bwd_kernel.cuh:BwdSmem. The chunk
// pass needs only the staged tiles: with the main pass's size (74 KB at enc1 at the time) it ran at
// 3 blocks per SM (14 % occupancy, 2.29 ms, Nsight Compute, H100). The main pass keeps no softplus'
// tile, re-reads the chunk-entry state from the saved states and keeps dA in the last sub-tile-state
// slot: 54.3 KB at enc1 (N 16, R 6, nth 96) instead of 74.4, i.e. 4 blocks per SM instead of 3 (the
// 168 registers of 96 threads allow 4).
inline size_t ss2d_bwd_smem(int N, int R, int nth, bool main = true) {
  const int ns = ss2d_ns(ss2d_nmax(N));
  const size_t tile = size_t(nth) * (kBwdTile + 1);
  const size_t bc = size_t(2) * kBwdTile * (ns > N ? ns : N);  // B, C (either layout)
  const size_t states = size_t(kBwdSub) * N * nth;  // hS (kBwdSub - 1 slots, dA in the last), e
  const size_t carry = main ? states + size_t(nth / 32) * N * 32 + size_t(R) * nth : 0;
  return sizeof(float) * (bc + size_t(R) * kBwdTile + 3 * tile + carry);  // + warp partials, dW
}

// The backward chunk pass's asynchronous staging (ss2d_bwd_kernel.cuh:bwd_chunk_issue), by the
// forward's rule (ss2d_fwd_async_ok): C, the low-rank dt and dy of the next sub-tile copied raw while
// the current one is scanned. dy's raw rows take the chunk pass's unused u tile; C and dt take this
// much more (bytes). dy's rows are L floats apart, so L must also be a multiple of 4. Same call, H200,
// SS2D core bf16 fwd+bwd, A-B-A-B: enc1 8.846 -> 8.797 ms, enc3 3.004 -> 2.990, dec3 5.519 -> 5.481,
// rect1 6.727 -> 6.697 (results/ab/99a5efb-bwd-chunk-async-vs-24e94ea.*).
inline size_t ss2d_bwd_chunk_raw_smem(int N, int R, int elem) {
  return size_t(elem) * kBwdTile * (size_t(ss2d_nmax(N)) + R);
}
inline bool ss2d_bwd_async_ok(const SS2DParams &p, int elem) {
  const int64_t seg = 16 / elem;
  if (p.R == 0 || p.L % seg || p.L % 4) return false;
  for (const SS2DSide &s : p.sides)
    if (!ss2d_rows_aligned({s.dl, s.C, s.dy}, {s.dl_b, s.dl_k, s.dl_c, s.C_b, s.C_k, s.C_n}, seg)) return false;
  return true;
}

// The backward main pass's optional cache of delta (after softplus) for the kBwdSub - 1 sub-tiles its
// forward replay stages, so that the reverse sweep does not form it again (softplus and the low-rank
// product: ~0.8 k of the ~6 k instructions per thread and sub-tile at N = 4, R = 6). Taken at NMAX 4
// only, and only where the launcher finds it costs no blocks per SM (ss2d_bwd_launch): at N = 16 the
// shared memory already sets the occupancy.
inline size_t ss2d_bwd_delta_smem(int nth) { return sizeof(float) * size_t(kBwdSub - 1) * nth * (kBwdTile + 1); }

template <typename T> void ss2d_fwd_launch(const SS2DParams &p, cudaStream_t stream);
// The forward's merge pass in fp32, out = acc + accT^T (out may be acc): also the backward's du.
void ss2d_merge_f32_launch(const SS2DParams &p, cudaStream_t stream);
template <typename T> void ss2d_bwd_launch(const SS2DParams &p, cudaStream_t stream);

}  // namespace vmambax
