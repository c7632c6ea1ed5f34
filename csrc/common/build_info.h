// Facts about how the native library was built, gathered from the parts that
// were actually compiled (so they cannot disagree with the code).
#pragma once

#include <string>

namespace tunecomp {

// csrc/cpu/info.cpp
bool openmp_enabled();
int openmp_max_threads();

// csrc/cuda/info.cu (only linked when built with CUDA)
std::string cuda_compiler_version();  // "13.0.88", from __CUDACC_VER_*__
int cuda_runtime_version();           // cudaRuntimeGetVersion, e.g. 13000
int cuda_driver_version();            // 0 when no driver is installed
int cuda_device_count();              // 0 when no driver / no device

}  // namespace tunecomp
