// CUDA error helpers: turn a failed runtime call into std::runtime_error
// (RuntimeError in Python) carrying CUDA's own error string.
#pragma once

#include <cuda_runtime.h>

#include "common/errors.h"

#define TC_CUDA_CHECK(expr, what)                                                  \
  do {                                                                             \
    const cudaError_t tc_err_ = (expr);                                            \
    if (tc_err_ != cudaSuccess) {                                                  \
      throw std::runtime_error(::tunecomp::detail::concat(                         \
          "tunecomp_kernels CUDA error in ", what, ": ", cudaGetErrorName(tc_err_), \
          ": ", cudaGetErrorString(tc_err_)));                                     \
    }                                                                              \
  } while (0)
