// One translation unit per (direction x input dtype) so nvcc builds them in parallel.
#include "ss2d_fwd_kernel.cuh"

namespace vmambax {
template void ss2d_fwd_launch<float>(const SS2DParams &p, cudaStream_t stream);
void ss2d_merge_f32_launch(const SS2DParams &p, cudaStream_t stream) { ss2d_fwd_merge_launch<float, float>(p, stream); }
}  // namespace vmambax
