// Host emulation of the CUDA subset used by csrc/cuda/mlr_*: lets the kernel
// sources run, unchanged, on a machine without a GPU (tests/test_cuda_emulated.py
// compiles them with `g++ -x c++ -DTC_EMULATE`). Never part of the real build.
//
// Model:
//  * A launch runs its blocks one after another; each block runs blockDim host
//    threads at once, so __syncthreads / __syncwarp are real barriers and a data
//    race between CUDA threads is a data race between host threads (build with
//    -fsanitize=thread to find missing barriers).
//  * Dynamic shared memory is filled with 0xFF bytes (NaN for every float type)
//    before each block, so reading shared memory that was never written shows up
//    as NaN in the results.
//  * cp.async copies are deferred until the issuing thread's cp.async.wait_group
//    releases their group, as on the GPU; a read before the wait sees stale data.
//  * WMMA fragments hold the whole logical 16x16 tile in every lane (their element
//    order is opaque on the GPU too, and the kernels only apply uniform
//    operations to x[]). store_matrix_sync splits the tile's elements over the
//    32 lanes, so other lanes see them only after a barrier, as on the GPU.
//  * Checked like the hardware would: WMMA pointers must be 32-byte aligned and
//    ldm a multiple of 16 bytes; cp.async addresses 16-byte aligned; blocks at
//    most 1024 threads, a multiple of 32; grid limits; dynamic shared memory
//    above 48 KiB needs cudaFuncSetAttribute and may not exceed the sm_80 limit.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/dtype.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return ::tunecomp::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return ::tunecomp::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

namespace tunecomp {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "tunecomp CUDA emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr int kSm80MaxDynamicSmem = 163 * 1024;  // opt-in limit on A100 (sm_80)

struct BlockCtx {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shfl;  // 32 slots per warp
  char* smem = nullptr;
};

struct Pending {
  void* dst;
  unsigned char bytes[16];
};

struct ThreadState {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
  BlockCtx* ctx = nullptr;
  std::vector<Pending> open;                 // issued, not yet committed
  std::vector<std::vector<Pending>> groups;  // committed, oldest first
};

inline ThreadState& ts() {
  static thread_local ThreadState s;
  return s;
}

inline int linear_tid() {
  const auto& s = ts();
  return static_cast<int>(s.thread_idx.x + s.block_dim.x * (s.thread_idx.y + s.block_dim.y * s.thread_idx.z));
}

inline char* dynamic_smem() { return ts().ctx->smem; }

inline void syncthreads() { ts().ctx->block->arrive_and_wait(); }
inline void syncwarp() { ts().ctx->warps[linear_tid() / 32]->arrive_and_wait(); }

inline float shfl_xor(float v, int lane_mask) {
  auto* ctx = ts().ctx;
  const int tid = linear_tid();
  float* slots = ctx->shfl.data() + (tid / 32) * 32;
  const int lane = tid % 32;
  slots[lane] = v;
  syncwarp();
  const float out = slots[lane ^ lane_mask];
  syncwarp();
  return out;
}

inline void cp_async16(void* dst, const void* src) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || (reinterpret_cast<uintptr_t>(src) & 15u) != 0) {
    fail("cp.async with a misaligned (not 16-byte) address");
  }
  Pending p;
  p.dst = dst;
  std::memcpy(p.bytes, src, 16);
  ts().open.push_back(p);
}
inline void cp_async_commit() {
  auto& s = ts();
  s.groups.push_back(std::move(s.open));
  s.open.clear();
}
inline void cp_async_wait(int keep) {
  auto& s = ts();
  while (static_cast<int>(s.groups.size()) > keep) {
    for (const Pending& p : s.groups.front()) std::memcpy(p.dst, p.bytes, 16);
    s.groups.erase(s.groups.begin());
  }
}

inline std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, int>& max_dyn_smem() {
  static std::map<const void*, int> m;
  return m;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem_bytes > 48 * 1024) {
    std::lock_guard<std::mutex> lock(attr_mutex());
    auto it = max_dyn_smem().find(reinterpret_cast<const void*>(kernel));
    if (it == max_dyn_smem().end() || static_cast<size_t>(it->second) < smem_bytes) {
      last_error() = cudaErrorInvalidValue;  // what the GPU reports without the attribute
      return;
    }
  }
  if (smem_bytes > static_cast<size_t>(kSm80MaxDynamicSmem)) fail("dynamic shared memory above the sm_80 limit");
  // Bind the arguments as the kernel's parameter types (by value, like a launch).
  auto bound = std::make_tuple(static_cast<std::decay_t<P>>(args)...);
  const size_t smem_alloc = (smem_bytes + 127) / 128 * 128 + 128;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockCtx ctx;
        ctx.block = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(nthreads));
        for (unsigned w = 0; w < nthreads / 32; ++w) ctx.warps.push_back(std::make_unique<std::barrier<>>(32));
        ctx.shfl.assign(nthreads, 0.f);
        char* smem = static_cast<char*>(std::aligned_alloc(128, smem_alloc));
        std::memset(smem, 0xFF, smem_alloc);
        ctx.smem = smem;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx) {
              threads.emplace_back([&, tx, ty, tz, bx, by, bz] {
                auto& s = ts();
                s.thread_idx = uint3{tx, ty, tz};
                s.block_idx = uint3{bx, by, bz};
                s.block_dim = block;
                s.grid_dim = grid;
                s.ctx = &ctx;
                s.open.clear();
                s.groups.clear();
                std::apply(kernel, bound);
                s.ctx = nullptr;
              });
            }
        for (auto& t : threads) t.join();
        std::free(smem);
      }
}

}  // namespace emu
}  // namespace tunecomp

#define threadIdx (::tunecomp::emu::ts().thread_idx)
#define blockIdx (::tunecomp::emu::ts().block_idx)
#define blockDim (::tunecomp::emu::ts().block_dim)
#define gridDim (::tunecomp::emu::ts().grid_dim)

inline void __syncthreads() { ::tunecomp::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::tunecomp::emu::syncwarp(); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::tunecomp::emu::last_error();
  ::tunecomp::emu::last_error() = cudaSuccess;
  return e;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(::tunecomp::emu::attr_mutex());
  ::tunecomp::emu::max_dyn_smem()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// --- nvcuda::wmma (m16n16k16, fp32 accumulators) ------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Logical tile, row-major: matrix_a (m, k), matrix_b (k, n), accumulator (m, n).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];
};

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

namespace detail {
template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}
template <typename T>
void check(const T* p, unsigned ldm) {
  if ((reinterpret_cast<uintptr_t>(p) & 31u) != 0) ::tunecomp::emu::fail("WMMA pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) ::tunecomp::emu::fail("WMMA ldm not a multiple of 16 bytes");
}
}  // namespace detail

template <typename T, typename L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check(p, ldm);
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      f.x[m * 16 + k] = detail::to_float(std::is_same_v<L, row_major> ? p[m * ldm + k] : p[k * ldm + m]);
}

template <typename T, typename L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check(p, ldm);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n)
      f.x[k * 16 + n] = detail::to_float(std::is_same_v<L, row_major> ? p[k * ldm + n] : p[n * ldm + k]);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[m * 16 + k], b.x[k * 16 + n], acc);
      out[m * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check(p, ldm);
  const int lane = ::tunecomp::emu::linear_tid() % 32;
  for (int e = lane; e < 256; e += 32) {
    const int m = e / 16, n = e % 16;
    p[layout == mem_row_major ? m * ldm + n : n * ldm + m] = f.x[e];
  }
}

}  // namespace wmma
}  // namespace nvcuda
