// Masked low-rank kernels instantiated for __nv_bfloat16 (see mlr_kernels.cuh, mlr_launch.cuh).
#include "cuda/mlr_launch.cuh"

namespace tunecomp {
namespace mlr {

template void forward_impl<__nv_bfloat16>(const ForwardArgs& a, cudaStream_t stream);
template void backward_impl<__nv_bfloat16>(const BackwardArgs& a, cudaStream_t stream);

}  // namespace mlr
}  // namespace tunecomp
