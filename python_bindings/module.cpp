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
#include "common/mlr.h"

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

// --- masked low-rank op (common/mlr.h) ------------------------------------------

void check_dtype_code(int64_t dtype, const char* who) {
  TC_CHECK_ARG(tunecomp::is_known_dtype_code(dtype), who, ": unknown dtype code ", dtype,
               " (expected 0=float32, 1=float16, 2=bfloat16)");
}

py::tuple mlr_forward_plan(int64_t n, int64_t k, int64_t m, int64_t r, int64_t dtype,
                           int64_t path, int64_t sms) {
  check_dtype_code(dtype, "mlr_forward_plan");
  const tunecomp::mlr::Shape s{n, k, m, r, static_cast<tunecomp::DType>(dtype)};
  const auto p = tunecomp::mlr::plan_forward(s, static_cast<int>(path), sms);
  return py::make_tuple(std::string(tunecomp::mlr::path_name(p.path)),
                        static_cast<int64_t>(p.workspace_bytes));
}

int64_t mlr_backward_plan(int64_t n, int64_t k, int64_t m, int64_t r, int64_t dtype,
                          int64_t needs, int64_t sms) {
  check_dtype_code(dtype, "mlr_backward_plan");
  const tunecomp::mlr::Shape s{n, k, m, r, static_cast<tunecomp::DType>(dtype)};
  return static_cast<int64_t>(
      tunecomp::mlr::plan_backward(s, static_cast<int>(needs), sms).workspace_bytes);
}

void mlr_forward_cuda(uint64_t x, uint64_t U, uint64_t mask, uint64_t V, uint64_t bias,
                      uint64_t W0, uint64_t b0, uint64_t y, uint64_t t, uint64_t ws,
                      uint64_t ws_bytes, int64_t n, int64_t k, int64_t m, int64_t r,
                      int64_t dtype, uint64_t scales, int64_t path, int64_t sms,
                      uint64_t stream) {
  // Validate first so bad arguments are a ValueError in every build.
  const auto a = tunecomp::mlr::make_forward_args(x, U, mask, V, bias, W0, b0, y, t, ws,
                                                  ws_bytes, n, k, m, r, dtype, scales, path,
                                                  sms);
#ifdef TUNECOMP_WITH_CUDA
  tunecomp::mlr_forward_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
#else
  (void)a, (void)stream;
  throw std::runtime_error("tunecomp_kernels._C was built without CUDA");
#endif
}

void mlr_backward_cuda(uint64_t dy, uint64_t x, uint64_t U, uint64_t mask, uint64_t V,
                       uint64_t t, uint64_t W0, uint64_t dx, uint64_t dU, uint64_t dmask,
                       uint64_t dV, uint64_t dbias, uint64_t ws, uint64_t ws_bytes, int64_t n,
                       int64_t k, int64_t m, int64_t r, int64_t dtype, uint64_t scales,
                       int64_t needs, int64_t sms, uint64_t stream) {
  const auto a = tunecomp::mlr::make_backward_args(dy, x, U, mask, V, t, W0, dx, dU, dmask, dV,
                                                   dbias, ws, ws_bytes, n, k, m, r, dtype,
                                                   scales, needs, sms);
#ifdef TUNECOMP_WITH_CUDA
  tunecomp::mlr_backward_cuda(a, reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
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

  m.def("mlr_forward_plan", &mlr_forward_plan, py::arg("n"), py::arg("k"), py::arg("m"),
        py::arg("r"), py::arg("dtype"), py::arg("path"), py::arg("sms"),
        "Masked low-rank forward on CUDA: (path name, workspace bytes) for x [n, k], U [m, r]; "
        "path: 0=auto, 1=fused, 2=split, 3=decode; sms: the device's SM count. Host only.");
  m.def("mlr_backward_plan", &mlr_backward_plan, py::arg("n"), py::arg("k"), py::arg("m"),
        py::arg("r"), py::arg("dtype"), py::arg("needs"), py::arg("sms"),
        "Workspace bytes of the masked low-rank backward; needs: bits 1=dx 2=dU 4=dmask 8=dV "
        "16=dbias. Host only.");
  m.def("mlr_forward_cuda", &mlr_forward_cuda, py::arg("x"), py::arg("U"), py::arg("mask"),
        py::arg("V"), py::arg("bias"), py::arg("W0"), py::arg("b0"), py::arg("y"), py::arg("t"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("n"), py::arg("k"),
        py::arg("m"), py::arg("r"), py::arg("dtype"), py::arg("scales"), py::arg("path"),
        py::arg("sms"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = s((x V^T * mask) U^T + bias) + a(x W0^T + b0) and t = x V^T (float32) on device "
        "pointers of contiguous row-major tensors (0 = absent); `scales` points to the "
        "float32 device array [a, s], read by the kernels; asynchronous on `stream`.");
  m.def("mlr_backward_cuda", &mlr_backward_cuda, py::arg("dy"), py::arg("x"), py::arg("U"),
        py::arg("mask"), py::arg("V"), py::arg("t"), py::arg("W0"), py::arg("dx"),
        py::arg("dU"), py::arg("dmask"), py::arg("dV"), py::arg("dbias"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("n"), py::arg("k"),
        py::arg("m"), py::arg("r"), py::arg("dtype"), py::arg("scales"), py::arg("needs"),
        py::arg("sms"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients (dx, dU, dmask, dV, dbias) of the masked low-rank op on device pointers; "
        "only those whose `needs` bit is set are written; `scales` as for mlr_forward_cuda; "
        "asynchronous on `stream`.");
}
