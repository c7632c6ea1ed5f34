// pybind11 bindings for tunecomp_kernels._C.
//
// The module never sees torch: callers pass raw data pointers (Python ints),
// shapes, element strides, a dtype code and, for CUDA, a cudaStream_t as an
// int. That keeps the extension ABI-independent of the torch version.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/build_info.h"
#include "common/mask_grad.h"

namespace py = pybind11;

#ifndef TUNECOMP_VERSION
#define TUNECOMP_VERSION "0.0.0+unknown"
#endif
#ifndef TUNECOMP_BUILD_TYPE
#define TUNECOMP_BUILD_TYPE "unknown"
#endif
#ifndef TUNECOMP_CXX_COMPILER
#define TUNECOMP_CXX_COMPILER "unknown"
#endif

namespace {

// "80,90a" (CMake's list with ';' swapped for ',') -> ["sm_80", "sm_90a"]
std::vector<std::string> cuda_arch_list() {
  std::vector<std::string> archs;
#if defined(TUNECOMP_WITH_CUDA) && defined(TUNECOMP_CUDA_ARCHS)
  const std::string spec = TUNECOMP_CUDA_ARCHS;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    std::string item = spec.substr(start, end - start);
    // CMake allows "-real"/"-virtual" suffixes; the SM name is what matters.
    const size_t dash = item.find('-');
    if (dash != std::string::npos) item = item.substr(0, dash);
    if (!item.empty()) archs.push_back("sm_" + item);
    start = end + 1;
  }
#endif
  return archs;
}

py::dict build_info() {
  py::dict d;
  d["version"] = TUNECOMP_VERSION;
  d["build_type"] = TUNECOMP_BUILD_TYPE;
  d["compiler"] = TUNECOMP_CXX_COMPILER;
  d["openmp"] = tunecomp::openmp_enabled();
  d["openmp_max_threads"] = tunecomp::openmp_max_threads();
  d["cuda_archs"] = cuda_arch_list();
#ifdef TUNECOMP_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = tunecomp::cuda_compiler_version();
  d["cuda_runtime_version"] = tunecomp::cuda_runtime_version();
  d["cuda_runtime"] = "static";
#ifdef TUNECOMP_CUDA_HOST_COMPILER
  d["cuda_host_compiler"] = TUNECOMP_CUDA_HOST_COMPILER;
#endif
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_runtime_version"] = py::none();
#endif
  return d;
}

void mask_grad_cpu(uint64_t t_ptr, uint64_t g_ptr, uint64_t out_ptr, int64_t n, int64_t r,
                   int64_t t_s0, int64_t t_s1, int64_t g_s0, int64_t g_s1, int64_t dtype,
                   double scale) {
  const auto a = tunecomp::make_mask_grad_args(t_ptr, g_ptr, out_ptr, n, r, t_s0, t_s1, g_s0,
                                               g_s1, dtype, scale);
  tunecomp::mask_grad_cpu(a);
}

void mask_grad_cuda(uint64_t t_ptr, uint64_t g_ptr, uint64_t out_ptr, int64_t n, int64_t r,
                    int64_t t_s0, int64_t t_s1, int64_t g_s0, int64_t g_s1, int64_t dtype,
                    double scale, uint64_t stream) {
  // Validate first so bad arguments are a ValueError in every build.
  const auto a = tunecomp::make_mask_grad_args(t_ptr, g_ptr, out_ptr, n, r, t_s0, t_s1, g_s0,
                                               g_s1, dtype, scale);
#ifdef TUNECOMP_WITH_CUDA
  tunecomp::mask_grad_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
#else
  (void)a, (void)stream;
  throw std::runtime_error("tunecomp_kernels._C was built without CUDA");
#endif
}

int cuda_device_count() {
#ifdef TUNECOMP_WITH_CUDA
  return tunecomp::cuda_device_count();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tunecomp_kernels native kernels (C++/OpenMP and CUDA), torch-free ABI";
  m.attr("__version__") = TUNECOMP_VERSION;

  m.def("build_info", &build_info,
        "How this module was built: version, cuda, cuda_archs, cuda_version, openmp, "
        "compiler, build_type.");

  m.def("cuda_device_count", &cuda_device_count, py::call_guard<py::gil_scoped_release>(),
        "CUDA devices visible to the module's own (static) runtime; 0 without CUDA, a "
        "driver or a device.");

  m.def("mask_grad_cpu", &mask_grad_cpu, py::arg("t_ptr"), py::arg("g_ptr"),
        py::arg("out_ptr"), py::arg("n"), py::arg("r"), py::arg("t_s0"), py::arg("t_s1"),
        py::arg("g_s0"), py::arg("g_s1"), py::arg("dtype"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(),
        "out[j] = scale * sum_n t[n, j] * g[n, j] on host memory. t, g: [n, r] with element "
        "strides; out: contiguous [r], float32 (float64 for dtype 3). dtype: 0=float32, "
        "1=float16, 2=bfloat16, 3=float64.");

  m.def("mask_grad_cuda", &mask_grad_cuda, py::arg("t_ptr"), py::arg("g_ptr"),
        py::arg("out_ptr"), py::arg("n"), py::arg("r"), py::arg("t_s0"), py::arg("t_s1"),
        py::arg("g_s0"), py::arg("g_s1"), py::arg("dtype"), py::arg("scale"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "CUDA version of mask_grad_cpu on device pointers, asynchronous on `stream` (a "
        "cudaStream_t as int; 0 = legacy default stream) of the current device.");
}
