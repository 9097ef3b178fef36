// One translation unit per (direction x input dtype) so nvcc builds them in parallel.
#include "ss2d_fwd_v3_kernel.cuh"

namespace vmambax {
template void ss2d_fwd_v3_launch<__nv_bfloat16>(const SS2DV3Params &v, cudaStream_t stream);
}  // namespace vmambax
