// Entry points of the masked low-rank op on CUDA (common/mlr.h): dtype dispatch.
#include "common/mlr.h"
#include "cuda/mlr_device.cuh"

namespace tunecomp {
namespace mlr {

template <typename T>
void forward_impl(const ForwardArgs& a, cudaStream_t stream);
template <typename T>
void backward_impl(const BackwardArgs& a, cudaStream_t stream);


}  // namespace mlr

void mlr_forward_cuda(const mlr::ForwardArgs& a, void* stream_handle) {
  // Drop a stale non-sticky error from earlier work so failures are attributed here.
  (void)cudaGetLastError();
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (a.shape.dtype) {
    case DType::kFloat32: return mlr::forward_impl<float>(a, stream);
    case DType::kFloat16: return mlr::forward_impl<__half>(a, stream);
    case DType::kBFloat16: return mlr::forward_impl<__nv_bfloat16>(a, stream);
    case DType::kFloat64: break;
  }
  TC_CHECK_ARG(false, "masked_lowrank forward: dtype ", dtype_name(a.shape.dtype),
               " is not supported by the CUDA kernels");
}

void mlr_backward_cuda(const mlr::BackwardArgs& a, void* stream_handle) {
  (void)cudaGetLastError();
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (a.shape.dtype) {
    case DType::kFloat32: return mlr::backward_impl<float>(a, stream);
    case DType::kFloat16: return mlr::backward_impl<__half>(a, stream);
    case DType::kBFloat16: return mlr::backward_impl<__nv_bfloat16>(a, stream);
    case DType::kFloat64: break;
  }
  TC_CHECK_ARG(false, "masked_lowrank backward: dtype ", dtype_name(a.shape.dtype),
               " is not supported by the CUDA kernels");
}

}  // namespace tunecomp
