// Fused mask-gradient reduction (DESIGN section 2):
//
//   dmask[j] = scale * sum_n t[n, j] * g[n, j]      t, g: [n, r], dmask: [r]
//
// t and g share one dtype and may have any element strides. The output is
// contiguous: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs.
// Accumulation is fp32 (fp64 for fp64 inputs). Results are deterministic:
// the summation order depends only on the shape (and, on CUDA, the device).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/errors.h"

namespace tunecomp {

struct MaskGradArgs {
  const void* t = nullptr;
  const void* g = nullptr;
  void* out = nullptr;
  int64_t n = 0;
  int64_t r = 0;
  int64_t t_s0 = 0, t_s1 = 0;  // strides in elements
  int64_t g_s0 = 0, g_s1 = 0;
  DType dtype = DType::kFloat32;
  double scale = 1.0;
};

// Checks shared by every backend; throws std::invalid_argument.
inline MaskGradArgs make_mask_grad_args(uint64_t t_ptr, uint64_t g_ptr, uint64_t out_ptr,
                                        int64_t n, int64_t r, int64_t t_s0, int64_t t_s1,
                                        int64_t g_s0, int64_t g_s1, int64_t dtype,
                                        double scale) {
  TC_CHECK_ARG(n >= 0, "mask_grad: n must be >= 0, got ", n);
  TC_CHECK_ARG(r >= 0, "mask_grad: r must be >= 0, got ", r);
  TC_CHECK_ARG(is_known_dtype_code(dtype), "mask_grad: unknown dtype code ", dtype,
               " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  if (r > 0) TC_CHECK_ARG(out_ptr != 0, "mask_grad: out pointer is null");
  if (n > 0 && r > 0) {
    TC_CHECK_ARG(t_ptr != 0 && g_ptr != 0, "mask_grad: t or g pointer is null");
  }
  MaskGradArgs a;
  a.t = reinterpret_cast<const void*>(static_cast<uintptr_t>(t_ptr));
  a.g = reinterpret_cast<const void*>(static_cast<uintptr_t>(g_ptr));
  a.out = reinterpret_cast<void*>(static_cast<uintptr_t>(out_ptr));
  a.n = n;
  a.r = r;
  a.t_s0 = t_s0;
  a.t_s1 = t_s1;
  a.g_s0 = g_s0;
  a.g_s1 = g_s1;
  a.dtype = static_cast<DType>(dtype);
  a.scale = scale;
  return a;
}

// csrc/cpu/mask_grad.cpp
void mask_grad_cpu(const MaskGradArgs& a);

// csrc/cuda/mask_grad.cu (only linked when built with CUDA). `stream` is a
// cudaStream_t owned by the caller; the call is asynchronous on it.
void mask_grad_cuda(const MaskGradArgs& a, void* stream);

}  // namespace tunecomp
