// Element type codes shared by the Python wrapper and every kernel.
// The codes are part of the Python <-> native contract: keep them stable.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TC_HOST_DEVICE inline
#endif

namespace tunecomp {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

inline bool is_known_dtype_code(int64_t code) { return code >= 0 && code <= 3; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// Host-side bit converters, written by hand so the CPU path needs neither
// torch nor the CUDA headers.
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32. Exact for every input (normals, subnormals,
// signed zeros, infinities, NaNs keep their payload's top bits).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: value = mant * 2^-24, exactly representable in fp32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  // rebias the exponent from 15 to 127
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// bfloat16 is the top half of an fp32, so widening is a shift.
inline float bf16_bits_to_float(uint16_t b) {
  return bits_to_float(static_cast<uint32_t>(b) << 16);
}

}  // namespace tunecomp
