// Host launchers of the masked low-rank kernels for one element type T.
// Included by mlr_f32.cu / mlr_f16.cu / mlr_bf16.cu, each of which instantiates
// forward_impl<T> and backward_impl<T> (one translation unit per dtype keeps
// parallel builds short). Every launch goes to the caller's stream and is
// checked with cudaGetLastError.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/mlr.h"
#include "cuda/mlr_kernels.cuh"

namespace tunecomp {
namespace mlr {

template <typename T>
void forward_impl(const ForwardArgs& a, cudaStream_t stream);
template <typename T>
void backward_impl(const BackwardArgs& a, cudaStream_t stream);

namespace host {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Row-major [rows][cols] contiguous operand.
template <typename T>
Operand<T> operand(const void* p, int64_t rows, int64_t cols) {
  Operand<T> o;
  o.p = static_cast<const T*>(p);
  o.ld = cols;
  o.rows = rows;
  o.cols = cols;
  o.vec = p != nullptr && aligned16(p) && (cols * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return o;
}

template <typename T>
bool rows_vec(const void* p, int64_t cols) {
  return p != nullptr && aligned16(p) && (cols * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

inline unsigned u32(int64_t v) { return static_cast<unsigned>(v); }

// Blocks for a grid-stride elementwise kernel over `count` items.
inline unsigned elementwise_blocks(int64_t count) { return u32(elementwise_block_count(count)); }

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, const char* what) {
  if (bytes > 48 * 1024) {
    TC_MLR_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                 what);
  }
}

inline void check_launch(const char* what) { TC_MLR_CHECK(cudaGetLastError(), what); }

constexpr int gemm_smem_bytes(int pipe_bytes) {
  return pipe_bytes > kStageCBytes ? pipe_bytes : kStageCBytes;
}

template <typename T>
void t_finalize(const float* ws, int64_t splits, const float* t_in, float* t_out, T* tm,
                const T* mask, const float* scales, const float* q, int64_t n, int64_t r,
                cudaStream_t stream) {
  if (n * r == 0) return;
  auto kernel = &t_finalize_kernel<T>;
  TC_LAUNCH(kernel, dim3(elementwise_blocks(n * r)), dim3(kThreads), 0, stream, ws, splits, t_in,
            t_out, tm, mask, scales, q, n, r);
  check_launch("t_finalize_kernel");
}

// q = [2^e, 2^-e] for the fp32 [n, r] tensor src (times s * mask when mask is given):
// partial maxima per block, then one block reduces them (deterministic, no atomics).
template <typename T>
void range_scale(const float* src, const T* mask, const float* scales, int64_t n, int64_t r,
                 float* partial, float* q, cudaStream_t stream) {
  const int64_t count = n * r;
  const int smem = (kThreads / 32) * 4;
  auto absmax = &absmax_partial_kernel<T>;
  TC_LAUNCH(absmax, dim3(elementwise_blocks(count)), dim3(kThreads), smem, stream, src, mask,
            scales, count, r, partial);
  check_launch("absmax_partial_kernel");
  auto reduce = &range_scale_kernel<T>;
  TC_LAUNCH(reduce, dim3(1), dim3(kThreads), smem, stream, partial,
            static_cast<int64_t>(elementwise_blocks(count)), q);
  check_launch("range_scale_kernel");
}

// tm = T(t * s * mask), range-scaled for fp16 (q then holds its scale; else q is null).
template <typename T>
const float* make_tm(const float* t, T* tm, const T* mask, const float* scales, int64_t n,
                     int64_t r, float* partial, float* q, cudaStream_t stream) {
  if (!kRangeScaled<T>) q = nullptr;
  if (q != nullptr) range_scale<T>(t, mask, scales, n, r, partial, q, stream);
  t_finalize<T>(nullptr, 0, t, nullptr, tm, mask, scales, q, n, r, stream);
  return q;
}

template <typename T>
void finalize(const float* ws, int64_t splits, int64_t count, const float* scale, T* out,
              cudaStream_t stream, const char* what) {
  if (count == 0) return;
  auto kernel = &finalize_kernel<T>;
  TC_LAUNCH(kernel, dim3(elementwise_blocks(count)), dim3(kThreads), 0, stream, ws, splits,
            count, scale, out);
  check_launch(what);
}

// ws[z] = A B over split z; C is [M, N]; K is the reduction length.
template <typename T, bool AKC, bool BKC>
void gemm_partial(const Operand<T>& A, const Operand<T>& B, int64_t M, int64_t N, int64_t K,
                  const Split& split, float* ws, cudaStream_t stream, const char* what) {
  if (M == 0 || N == 0) return;
  auto kernel = &gemm_partial_kernel<T, AKC, BKC>;
  const int smem = gemm_smem_bytes(TileCfg<T>::kPipeBytes);
  allow_smem(kernel, smem, what);
  const dim3 grid(u32(ceil_div(M, kBM)), u32(ceil_div(N, kBN)), u32(split.count));
  TC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, A, B, M, N, K, split.len, ws);
  check_launch(what);
}

template <typename T, bool B1KC, bool B2KC>
void two_gemm(const Operand<T>& A1, const Operand<T>& B1, int64_t K1, const Operand<T>& A2,
              const Operand<T>& B2, int64_t K2, const T* bias, const T* bias2,
              const float* scales, const float* a2_q, T* out, int64_t M, int64_t N,
              cudaStream_t stream, const char* what) {
  if (M == 0 || N == 0) return;
  auto kernel = &two_gemm_kernel<T, B1KC, B2KC>;
  const int smem = gemm_smem_bytes(TileCfg<T>::kPipeBytes);
  allow_smem(kernel, smem, what);
  const dim3 grid(u32(ceil_div(M, kBM)), u32(ceil_div(N, kBN)));
  TC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, A1, B1, K1, A2, B2, K2, bias, bias2,
            scales, a2_q, out, M, N);
  check_launch(what);
}

inline char* at(void* base, size_t offset) { return static_cast<char*>(base) + offset; }

}  // namespace host

template <typename T>
void forward_impl(const ForwardArgs& a, cudaStream_t stream) {
  using namespace host;
  const int64_t n = a.shape.n, k = a.shape.k, m = a.shape.m, r = a.shape.r;
  if (n == 0) return;  // y and t are empty
  const ForwardPlan& p = a.plan;
  // The teacher scale is a device value: a present teacher is always read.
  const T* W0 = static_cast<const T*>(a.W0);
  const T* b0 = W0 != nullptr ? static_cast<const T*>(a.b0) : nullptr;
  const T* mask = static_cast<const T*>(a.mask);
  const T* bias = static_cast<const T*>(a.bias);
  float* t = static_cast<float*>(a.t);
  T* y = static_cast<T*>(a.y);

  if (p.path == ForwardPath::kDecode) {
    if (r > 0) {
      float* part = reinterpret_cast<float*>(at(a.ws, p.off_t_partial));
      auto kernel = &decode_t_kernel<T>;
      const dim3 grid(u32(ceil_div(r, kDecodeRanksPerBlock)), u32(p.decode_split.count));
      TC_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, static_cast<const T*>(a.x),
                rows_vec<T>(a.x, k), static_cast<const T*>(a.V), rows_vec<T>(a.V, k), n, k, r,
                p.decode_split.len, part);
      check_launch("decode_t_kernel");
      t_finalize<T>(part, p.decode_split.count, nullptr, t, nullptr, mask, a.scales, nullptr,
                    n, r, stream);
    }
    if (m > 0) {
      auto kernel = &decode_y_kernel<T>;
      TC_LAUNCH(kernel, dim3(u32(ceil_div(m, kDecodeRowsPerBlock))), dim3(kThreads), 0, stream,
                static_cast<const T*>(a.x), rows_vec<T>(a.x, k), W0, rows_vec<T>(W0, k),
                static_cast<const T*>(a.U), static_cast<const float*>(t), mask, bias, b0,
                a.scales, y, n, k, m, r);
      check_launch("decode_y_kernel");
    }
    return;
  }

  const Operand<T> X = operand<T>(a.x, n, k);
  const Operand<T> Vop = operand<T>(a.V, r, k);
  const Operand<T> W0op = operand<T>(W0, m, k);
  const Operand<T> Uop = operand<T>(a.U, m, r);

  if (p.path == ForwardPath::kFused) {
    auto kernel = &fused_forward_kernel<T>;
    const int smem = fused_smem_bytes<T>();
    allow_smem(kernel, smem, "fused_forward_kernel (cudaFuncSetAttribute)");
    const dim3 grid(u32(ceil_div(n, kBM)), u32(p.fused_groups));
    TC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, X, Vop, W0op, Uop, k, mask, bias, b0,
              a.scales, t, y, n, m, static_cast<int>(r), static_cast<int>(p.fused_groups));
    check_launch("fused_forward_kernel");
    return;
  }

  // split path
  T* tm = nullptr;
  const float* q = nullptr;
  if (r > 0) {
    float* part = reinterpret_cast<float*>(at(a.ws, p.off_t_partial));
    tm = reinterpret_cast<T*>(at(a.ws, p.off_tm));
    gemm_partial<T, true, true>(X, Vop, n, r, k, p.t_split, part, stream,
                                "gemm_partial_kernel (t = x V^T)");
    if (kRangeScaled<T>) {  // t first, then its range, then tm
      t_finalize<T>(part, p.t_split.count, nullptr, t, nullptr, mask, a.scales, nullptr, n, r,
                    stream);
      q = make_tm<T>(t, tm, mask, a.scales, n, r, reinterpret_cast<float*>(at(a.ws, p.off_qpart)),
                     reinterpret_cast<float*>(at(a.ws, p.off_q)), stream);
    } else {
      t_finalize<T>(part, p.t_split.count, nullptr, t, tm, mask, a.scales, nullptr, n, r,
                    stream);
    }
  }
  two_gemm<T, true, true>(X, W0op, W0 != nullptr ? k : 0, operand<T>(tm, n, r), Uop, r, bias,
                          b0, a.scales, q, y, n, m, stream, "two_gemm_kernel (forward y)");
}

template <typename T>
void backward_impl(const BackwardArgs& a, cudaStream_t stream) {
  using namespace host;
  const int64_t n = a.shape.n, k = a.shape.k, m = a.shape.m, r = a.shape.r;
  const BackwardPlan& p = a.plan;
  const int needs = a.needs;
  const T* W0 = static_cast<const T*>(a.W0);
  const T* mask = static_cast<const T*>(a.mask);
  const float* t = static_cast<const float*>(a.t);
  const T* dy = static_cast<const T*>(a.dy);

  T* h = p.need_h ? reinterpret_cast<T*>(at(a.ws, p.off_h)) : nullptr;
  // fp16: g's kernel writes h in fp32, which is range-scaled into h (common/mlr.h)
  const bool scaled = kRangeScaled<T> && (p.need_h || p.run_tm);
  float* h32 = kRangeScaled<T> && p.need_h ? reinterpret_cast<float*>(at(a.ws, p.off_h32))
                                           : nullptr;
  float* qpart = scaled ? reinterpret_cast<float*>(at(a.ws, p.off_qpart)) : nullptr;
  float* q_h = scaled ? reinterpret_cast<float*>(at(a.ws, p.off_q)) : nullptr;
  float* q_t = scaled ? q_h + 2 : nullptr;
  const bool want_dmask = (needs & kNeedMask) && r > 0;
  float* dmask_ws = want_dmask ? reinterpret_cast<float*>(at(a.ws, p.off_dmask)) : nullptr;

  // 1. g = dy U -> h, dmask partials (dy read once for both)
  if (p.run_g) {
    auto kernel = &bwd_g_kernel<T>;
    const int smem = std::max(gemm_smem_bytes(TileCfg<T>::kPipeBytes), bwd_g_smem_bytes());
    allow_smem(kernel, smem, "bwd_g_kernel (cudaFuncSetAttribute)");
    const dim3 grid(u32(ceil_div(n, kBM)), u32(ceil_div(r, kBN)));
    TC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, operand<T>(dy, n, m),
              operand<T>(a.U, m, r), n, m, r, t, mask, a.scales, h32 != nullptr ? nullptr : h,
              h32, dmask_ws);
    check_launch("bwd_g_kernel");
  }
  const float* hq = nullptr;  // h's range scale (fp16)
  if (h32 != nullptr) {
    range_scale<T>(h32, static_cast<const T*>(nullptr), a.scales, n, r, qpart, q_h, stream);
    t_finalize<T>(nullptr, 0, h32, nullptr, h, nullptr, a.scales, q_h, n, r, stream);
    hq = q_h;
  }
  if (want_dmask) {
    finalize<T>(dmask_ws, p.run_g ? p.row_tiles : 0, r, a.scales + 1, static_cast<T*>(a.dmask),
                stream, "finalize_kernel (dmask)");
  }

  // 2. dU = dy^T tm, split-K over n
  if ((needs & kNeedU) && m > 0 && r > 0) {
    T* tm = p.run_tm ? reinterpret_cast<T*>(at(a.ws, p.off_tm)) : nullptr;
    const float* tq = p.run_tm ? make_tm<T>(t, tm, mask, a.scales, n, r, qpart, q_t, stream)
                               : nullptr;
    float* part = reinterpret_cast<float*>(at(a.ws, p.off_du));
    gemm_partial<T, false, false>(operand<T>(dy, n, m), operand<T>(tm, n, r), m, r, n,
                                  p.du_split, part, stream, "gemm_partial_kernel (dU)");
    finalize<T>(part, p.du_split.count, m * r, tq, static_cast<T*>(a.dU), stream,
                "finalize_kernel (dU)");
  }

  // 3. dV = h^T x, split-K over n
  if ((needs & kNeedV) && r > 0 && k > 0) {
    float* part = reinterpret_cast<float*>(at(a.ws, p.off_dv));
    gemm_partial<T, false, false>(operand<T>(h, n, r), operand<T>(a.x, n, k), r, k, n,
                                  p.dv_split, part, stream, "gemm_partial_kernel (dV)");
    finalize<T>(part, p.dv_split.count, r * k, hq, static_cast<T*>(a.dV), stream,
                "finalize_kernel (dV)");
  }

  // 4. dx = a dy W0 + h V (one accumulator)
  if ((needs & kNeedX) && n > 0 && k > 0) {
    two_gemm<T, false, false>(operand<T>(dy, n, m), operand<T>(W0, m, k), W0 != nullptr ? m : 0,
                              operand<T>(h, n, r), operand<T>(a.V, r, k), h != nullptr ? r : 0,
                              nullptr, nullptr, a.scales, hq, static_cast<T*>(a.dx), n, k,
                              stream, "two_gemm_kernel (dx)");
  }

  // 5. dbias = s sum_n dy
  if ((needs & kNeedBias) && m > 0) {
    float* part = reinterpret_cast<float*>(at(a.ws, p.off_db));
    auto kernel = &colsum_partial_kernel<T>;
    const dim3 grid(u32(ceil_div(m, kColsumThreads)), u32(p.db_split.count));
    TC_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, dy, n, m, p.db_split.len, part);
    check_launch("colsum_partial_kernel (dbias)");
    finalize<T>(part, p.db_split.count, m, a.scales + 1, static_cast<T*>(a.dbias), stream,
                "finalize_kernel (dbias)");
  }
}

}  // namespace mlr
}  // namespace tunecomp
