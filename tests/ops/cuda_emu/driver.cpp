// C entry points over the emulated CUDA launchers (csrc/cuda/mlr_*.cu compiled
// as host C++ with -DTC_EMULATE, see csrc/common/cuda_emu.h), for ctypes.
// Arguments mirror the pybind11 bindings in python_bindings/module.cpp; host
// pointers stand in for device pointers. Return 0 on success, 1 for a bad
// argument (ValueError), 2 for a runtime failure; the message goes to `err`.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>

#include "common/mlr.h"

namespace {

template <typename F>
int guarded(char* err, int err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 2;
  }
}

}  // namespace

extern "C" {

int tc_emu_forward_plan(int64_t n, int64_t k, int64_t m, int64_t r, int64_t dtype, int64_t path,
                        int64_t sms, int64_t* out_path, int64_t* out_ws, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    TC_CHECK_ARG(tunecomp::is_known_dtype_code(dtype), "unknown dtype code ", dtype);
    const tunecomp::mlr::Shape s{n, k, m, r, static_cast<tunecomp::DType>(dtype)};
    const auto p = tunecomp::mlr::plan_forward(s, static_cast<int>(path), sms);
    *out_path = static_cast<int64_t>(p.path);
    *out_ws = static_cast<int64_t>(p.workspace_bytes);
  });
}

int tc_emu_backward_plan(int64_t n, int64_t k, int64_t m, int64_t r, int64_t dtype, int64_t needs,
                         int64_t sms, int64_t* out_ws, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    TC_CHECK_ARG(tunecomp::is_known_dtype_code(dtype), "unknown dtype code ", dtype);
    const tunecomp::mlr::Shape s{n, k, m, r, static_cast<tunecomp::DType>(dtype)};
    *out_ws = static_cast<int64_t>(tunecomp::mlr::plan_backward(s, static_cast<int>(needs), sms).workspace_bytes);
  });
}

int tc_emu_forward(uint64_t x, uint64_t U, uint64_t mask, uint64_t V, uint64_t bias, uint64_t W0,
                   uint64_t b0, uint64_t y, uint64_t t, uint64_t ws, uint64_t ws_bytes, int64_t n,
                   int64_t k, int64_t m, int64_t r, int64_t dtype, uint64_t scales,
                   int64_t path, int64_t sms, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    const auto args = tunecomp::mlr::make_forward_args(x, U, mask, V, bias, W0, b0, y, t, ws, ws_bytes,
                                                       n, k, m, r, dtype, scales, path, sms);
    tunecomp::mlr_forward_cuda(args, nullptr);
  });
}

int tc_emu_backward(uint64_t dy, uint64_t x, uint64_t U, uint64_t mask, uint64_t V, uint64_t t,
                    uint64_t W0, uint64_t dx, uint64_t dU, uint64_t dmask, uint64_t dV,
                    uint64_t dbias, uint64_t ws, uint64_t ws_bytes, int64_t n, int64_t k,
                    int64_t m, int64_t r, int64_t dtype, uint64_t scales, int64_t needs,
                    int64_t sms, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    const auto args = tunecomp::mlr::make_backward_args(dy, x, U, mask, V, t, W0, dx, dU, dmask, dV,
                                                        dbias, ws, ws_bytes, n, k, m, r, dtype, scales,
                                                        needs, sms);
    tunecomp::mlr_backward_cuda(args, nullptr);
  });
}

}  // extern "C"
