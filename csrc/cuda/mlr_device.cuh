// Device-side building blocks of the masked low-rank kernels, written once for
// two compilers:
//  * nvcc (the real build, sm_80 / sm_90a), and
//  * a host C++ compiler with TC_EMULATE defined, where common/cuda_emu.h runs
//    every CUDA thread of a block as a host thread (tests/test_cuda_emulated.py).
// Everything the kernels need from CUDA beyond plain C++ goes through this file
// or through the few built-ins the emulator provides (threadIdx, blockIdx,
// blockDim, gridDim, __syncthreads, __syncwarp, nvcuda::wmma, half types).
#pragma once

#include <cstdint>

#if defined(TC_EMULATE)
#include "common/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "tunecomp masked low-rank kernels need sm_80 or newer (cp.async, bf16 WMMA)"
#endif
#endif

#include "common/errors.h"

#define TC_DEV __device__ __forceinline__

// Launch on a stream. `kernel` must be a plain name or a function-pointer
// variable (no template commas inside the macro argument).
#if defined(TC_EMULATE)
#define TC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::tunecomp::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define TC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#define TC_MLR_CHECK(expr, what)                                                  \
  do {                                                                            \
    const cudaError_t tc_err_ = (expr);                                           \
    if (tc_err_ != cudaSuccess) {                                                 \
      throw std::runtime_error(::tunecomp::detail::concat(                        \
          "tunecomp_kernels CUDA error in ", what, ": ", cudaGetErrorName(tc_err_), \
          ": ", cudaGetErrorString(tc_err_)));                                    \
    }                                                                             \
  } while (0)

namespace tunecomp {
namespace mlr {

// --- element conversions (fp32 is the compute type for every element type) -----
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static TC_DEV float to_f(float v) { return v; }
  static TC_DEV float from_f(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static TC_DEV float to_f(__half v) { return __half2float(v); }
  static TC_DEV __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static TC_DEV float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static TC_DEV __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
TC_DEV float to_f(T v) {
  return Cvt<T>::to_f(v);
}
template <typename T>
TC_DEV T from_f(float v) {
  return Cvt<T>::from_f(v);
}

template <typename I>
TC_DEV I imin(I a, I b) {
  return a < b ? a : b;
}
template <typename I>
TC_DEV I imax(I a, I b) {
  return a < b ? b : a;
}

// --- dynamic shared memory -----------------------------------------------------
TC_DEV char* dynamic_smem() {
#if defined(TC_EMULATE)
  return ::tunecomp::emu::dynamic_smem();
#else
  extern __shared__ __align__(128) char tc_mlr_smem[];
  return tc_mlr_smem;
#endif
}

// --- cp.async (sm_80+): 16-byte global -> shared copies in commit groups -------
TC_DEV void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(TC_EMULATE)
  ::tunecomp::emu::cp_async16(smem_dst, gmem_src);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src)
               : "memory");
#endif
}

TC_DEV void cp_async_commit() {
#if defined(TC_EMULATE)
  ::tunecomp::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
TC_DEV void cp_async_wait() {
#if defined(TC_EMULATE)
  ::tunecomp::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// --- warp shuffle (full warp) --------------------------------------------------
TC_DEV float shfl_xor(float v, int lane_mask) {
#if defined(TC_EMULATE)
  return ::tunecomp::emu::shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

// Butterfly sum over the 32 lanes; every lane gets the same, order-fixed result.
TC_DEV float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += shfl_xor(v, off);
  return v;
}

TC_DEV int thread_rank() { return static_cast<int>(threadIdx.x); }

}  // namespace mlr
}  // namespace tunecomp
