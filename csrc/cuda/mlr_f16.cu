// Masked low-rank kernels instantiated for __half (see mlr_kernels.cuh, mlr_launch.cuh).
#include "cuda/mlr_launch.cuh"

namespace tunecomp {
namespace mlr {

template void forward_impl<__half>(const ForwardArgs& a, cudaStream_t stream);
template void backward_impl<__half>(const BackwardArgs& a, cudaStream_t stream);

}  // namespace mlr
}  // namespace tunecomp
