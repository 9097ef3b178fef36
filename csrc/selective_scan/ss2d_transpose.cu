// Batched plane transpose for the column walks' copies: dst[p][w][h] = src[p][h][w].
// u.transpose(2, 3).contiguous() and its like run PyTorch's generic strided copy, which reads with
// stride H (one sector per element on that side). `aten::copy_` took 31.8 ms of a 371 ms training
// step and 14.5 ms of a 124 ms inference (cuda bf16, batch 8, 512x512, H100; the share of these
// transposes in it was not measured), while their bytes need a few ms at the copy bandwidth. Here a
// 32 x 32 tile goes through shared memory, so both the reads and the writes follow memory order.
#include "ss2d.h"

namespace vmambax {
namespace {

constexpr int kTrTile = 32, kTrRows = 8;  // a 32 x 8 block moves a 32 x 32 tile, 4 elements per thread

__device__ __forceinline__ int64_t plane_offset(const PlaneMap &m, int64_t p) {
  return (p / m.inner) * m.stride_outer + (p % m.inner) * m.stride_inner;
}

// T only moves bits: uint16_t for bf16 / fp16, uint32_t for fp32. Row stride kTrTile + 1: the column
// reads of the tile fall in distinct banks for 4-byte T (2-way at most for 2-byte T).
template <typename T>
__global__ void __launch_bounds__(kTrTile * kTrRows)
    ss2d_transpose_kernel(const T *__restrict__ src, T *__restrict__ dst, int64_t planes, int H, int W, PlaneMap ms,
                          PlaneMap md) {
  __shared__ T tile[kTrTile][kTrTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int w0 = blockIdx.x * kTrTile, h0 = blockIdx.y * kTrTile;
  for (int64_t p = blockIdx.z; p < planes; p += gridDim.z) {
    const T *s = src + plane_offset(ms, p);
    T *d = dst + plane_offset(md, p);
#pragma unroll
    for (int j = ty; j < kTrTile; j += kTrRows) {
      const int h = h0 + j, w = w0 + tx;
      if (h < H && w < W) tile[j][tx] = s[int64_t(h) * W + w];
    }
    __syncthreads();
#pragma unroll
    for (int j = ty; j < kTrTile; j += kTrRows) {
      const int w = w0 + j, h = h0 + tx;
      if (w < W && h < H) d[int64_t(w) * H + h] = tile[tx][j];
    }
    __syncthreads();  // the tile is read before the next plane overwrites it
  }
}

}  // namespace

void ss2d_transpose_launch(const void *src, void *dst, int64_t planes, int H, int W, PlaneMap ms, PlaneMap md,
                           int elem_bytes, cudaStream_t stream) {
  const dim3 block(kTrTile, kTrRows);
  const dim3 grid(unsigned((W + kTrTile - 1) / kTrTile), unsigned((H + kTrTile - 1) / kTrTile),
                  unsigned(planes < 65535 ? planes : 65535));
  if (elem_bytes == 2)
    ss2d_transpose_kernel<uint16_t><<<grid, block, 0, stream>>>(static_cast<const uint16_t *>(src),
                                                                static_cast<uint16_t *>(dst), planes, H, W, ms, md);
  else
    ss2d_transpose_kernel<uint32_t><<<grid, block, 0, stream>>>(static_cast<const uint32_t *>(src),
                                                                static_cast<uint32_t *>(dst), planes, H, W, ms, md);
}

}  // namespace vmambax
