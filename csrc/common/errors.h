// Error helpers. Kernels throw standard exceptions; the pybind11 layer maps
// std::invalid_argument to ValueError and std::runtime_error to RuntimeError,
// so csrc/ stays free of Python headers.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tunecomp {
namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace detail
}  // namespace tunecomp

// Bad arguments from the caller -> ValueError in Python.
#define TC_CHECK_ARG(cond, ...)                                              \
  do {                                                                       \
    if (!(cond)) {                                                           \
      throw std::invalid_argument(::tunecomp::detail::concat(__VA_ARGS__));  \
    }                                                                        \
  } while (0)

// Failures of the machine or runtime -> RuntimeError in Python.
#define TC_CHECK_RUNTIME(cond, ...)                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      throw std::runtime_error(::tunecomp::detail::concat(__VA_ARGS__));     \
    }                                                                        \
  } while (0)
