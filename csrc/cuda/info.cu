// CUDA build facts, compiled by nvcc so they describe the real toolchain.

#include <cuda_runtime.h>

#include <string>

#include "common/build_info.h"

namespace tunecomp {

std::string cuda_compiler_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) +
         "." + std::to_string(__CUDACC_VER_BUILD__);
}

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // "no driver" is an answer here, not an error
    count = 0;
  }
  return count;
}

}  // namespace tunecomp
