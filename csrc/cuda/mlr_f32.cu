// Masked low-rank kernels instantiated for float (see mlr_kernels.cuh, mlr_launch.cuh).
#include "cuda/mlr_launch.cuh"

namespace tunecomp {
namespace mlr {

template void forward_impl<float>(const ForwardArgs& a, cudaStream_t stream);
template void backward_impl<float>(const BackwardArgs& a, cudaStream_t stream);

}  // namespace mlr
}  // namespace tunecomp
