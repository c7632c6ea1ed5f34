// Kernels of the masked low-rank op (docs/design.md#the-op). Shapes as in common/mlr.h:
// x [n, k], U [m, r], mask [r], V [r, k], W0 [m, k], y [n, m], t [n, r] (fp32).
// "tm" is t * mask * s rounded to the element type T: the A operand of the
// expand GEMM y += tm U^T (student scale folded in); "h" is s * (dy U) * mask.
//
// Forward, three paths (host picks one, common/mlr.h):
//   fused  fused_forward_kernel: per 128-row tile, t = x V^T in a tensor-core
//          main loop, kept on chip as tm [128, r<=128] in shared memory (and
//          written once to global as the saved t); then for each 128-column
//          output tile of its group: acc = x W0^T (teacher K loop, scaled by a),
//          acc += tm U^T (one extra r-long K loop from shared memory), bias
//          epilogue s b + a b0, store in x's dtype. The teacher term rides in the
//          same accumulator as the student term.
//   split  gemm_partial_kernel (t = x V^T, split-K over k into fp32 partials)
//          -> t_finalize_kernel (sum splits in order, write t and tm)
//          -> two_gemm_kernel (acc = a x W0^T + tm U^T, same epilogue).
//   decode (n <= 16) decode_t_kernel (GEMV, one warp per rank, split-K over k)
//          -> t_finalize_kernel -> decode_y_kernel (GEMV over W0 and U rows,
//          fp32 throughout, one warp per two output rows).
// Backward:
//   bwd_g_kernel        g = dy U on tensor cores; epilogue writes h and the
//                       per-row-tile dmask partials sum_rows t * g (fp32 g, fp32 t)
//   t_finalize_kernel   tm for dU (when dU is needed)
//   gemm_partial_kernel dU = dy^T tm and dV = h^T x, split-K over n
//   two_gemm_kernel     dx = a dy W0 + h V (one accumulator)
//   colsum_partial_kernel  dbias partials sum_rows dy
//   finalize_kernel     sums every set of partials in split order, scales, converts.
// fp16 range scaling (common/mlr.h, range_scaled): tm and h are multiplied by a power of
// two 2^-e before they are rounded to fp16 and the products by 2^e after, so fp32 t and
// h beyond fp16's range (|t| > 65504 overflowed, tiny h went subnormal) give the
// fp32-accumulation result. The fused kernel takes e from its own tile (a block max);
// the split path and the backward from the whole tensor (absmax_partial_kernel +
// range_scale_kernel). Power-of-two factors are exact; the tensor-core products stay fp16.
// No atomics anywhere: every reduction order depends only on the shape and the
// SM count, so results are bitwise reproducible on one GPU.
// The blend scales come as a device array scales = [a, s] (fp32) that every kernel
// loads: the host never reads them (no sync, no recompile under torch.compile).
#pragma once

#include "cuda/mlr_gemm.cuh"

namespace tunecomp {
namespace mlr {

TC_DEV float teacher_scale(const float* scales) { return scales[0]; }
TC_DEV float student_scale(const float* scales) { return scales[1]; }

// --- range scaling of fp16 intermediates (see range_scaled in common/mlr.h) -------
// Only fp16 is scaled: bf16 has fp32's exponent range, and fp32 is never rounded.
template <typename T>
constexpr bool kRangeScaled = std::is_same<T, __half>::value;

// Max over the block (256 threads; `red` holds 8 floats of shared memory). Every
// thread gets the result. NaN inputs are ignored by fmaxf.
TC_DEV float block_max(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, shfl_xor(v, off));
  if (thread_rank() % 32 == 0) red[thread_rank() / 32] = v;
  __syncthreads();
  float out = red[0];
  for (int w = 1; w < kThreads / 32; ++w) out = fmaxf(out, red[w]);
  __syncthreads();
  return out;
}

// q = [2^e, 2^-e] with max_abs * 2^-e in [2^14, 2^15): fp16's largest binade below 65504,
// so the scaled maximum neither overflows nor wastes range; e = 0 for 0 or inf/NaN.
TC_DEV void range_scale_of(float max_abs, float& q, float& q_inv) {
  int e = 0;
  if (max_abs > 0.f && max_abs <= 3.4028234e38f) {
    int exp2 = 0;
    frexpf(max_abs, &exp2);  // max_abs in [2^(exp2-1), 2^exp2)
    e = imin(imax(exp2 - 15, -100), 100);
  }
  q = ldexpf(1.f, e);
  q_inv = ldexpf(1.f, -e);
}

// partial[block] = max |src[i] * (mask ? mask[i % cols] * s : 1)| over the block's items.
template <typename T>
__global__ void __launch_bounds__(kThreads)
absmax_partial_kernel(const float* __restrict__ src, const T* __restrict__ mask,
                      const float* __restrict__ scales, int64_t count, int64_t cols,
                      float* __restrict__ partial) {
  const float s = mask != nullptr ? student_scale(scales) : 1.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  float mx = 0.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + thread_rank(); i < count;
       i += stride) {
    const float v = mask != nullptr ? src[i] * (to_f(mask[i % cols]) * s) : src[i];
    mx = fmaxf(mx, fabsf(v));
  }
  mx = block_max(mx, reinterpret_cast<float*>(dynamic_smem()));
  if (thread_rank() == 0) partial[blockIdx.x] = mx;
}

// q[0..1] = range_scale_of(max of the `count` partial maxima); one block. (A template
// only so that each dtype's translation unit has its own instance.)
template <typename T>
__global__ void __launch_bounds__(kThreads)
range_scale_kernel(const float* __restrict__ partial, int64_t count, float* __restrict__ q) {
  float mx = 0.f;
  for (int64_t i = thread_rank(); i < count; i += kThreads) mx = fmaxf(mx, partial[i]);
  mx = block_max(mx, reinterpret_cast<float*>(dynamic_smem()));
  if (thread_rank() == 0) range_scale_of(mx, q[0], q[1]);
}

template <typename T>
TC_DEV float bias_term(const T* bias, float bias_scale, const T* bias2, float bias2_scale,
                       int64_t col) {
  float v = 0.f;
  if (bias != nullptr) v += bias_scale * to_f(bias[col]);
  if (bias2 != nullptr) v += bias2_scale * to_f(bias2[col]);
  return v;
}

// ws[z][M][N] = A[:, kz] B[kz, :] over the z-th k range (fp32 partials).
template <typename T, bool AKC, bool BKC>
__global__ void __launch_bounds__(kThreads)
gemm_partial_kernel(Operand<T> A, Operand<T> B, int64_t M, int64_t N, int64_t K,
                    int64_t split_len, float* __restrict__ ws) {
  using P = typename PolicyOf<T>::type;
  char* smem = dynamic_smem();
  float* sC = reinterpret_cast<float*>(smem);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * split_len;
  const int64_t ke = imin(K, kb + split_len);
  const int rows_valid = static_cast<int>(imin<int64_t>(kBM, M - m0));
  const int cols_valid = static_cast<int>(imin<int64_t>(kBN, N - n0));
  typename P::Acc acc;
  P::zero(acc);
  mainloop<T, AKC, BKC>(acc, A, B, m0, n0, kb, ke, smem, rows_valid, cols_valid);
  P::stage(acc, sC, kLdC, rows_valid, cols_valid);
  __syncthreads();
  float* out = ws + static_cast<int64_t>(blockIdx.z) * M * N;
  for (int idx = thread_rank(); idx < kBM * kBN; idx += kThreads) {
    const int rr = idx / kBN;
    const int cc = idx % kBN;
    if (rr < rows_valid && cc < cols_valid) out[(m0 + rr) * N + n0 + cc] = sC[rr * kLdC + cc];
  }
}

// t = sum of `splits` partials (or t_in when ws is null); writes t_out and/or
// tm_out = T(t * mask * s * q[1]) ([n, r] row-major). A null mask multiplies by 1 (no s),
// a null q by 1: the rounding to T is the only inexact step.
template <typename T>
__global__ void __launch_bounds__(kThreads)
t_finalize_kernel(const float* __restrict__ ws, int64_t splits, const float* __restrict__ t_in,
                  float* __restrict__ t_out, T* __restrict__ tm_out, const T* __restrict__ mask,
                  const float* __restrict__ scales, const float* __restrict__ q, int64_t n,
                  int64_t r) {
  const int64_t count = n * r;
  const float s = tm_out != nullptr && mask != nullptr ? student_scale(scales) : 1.f;
  const float q_inv = q != nullptr ? q[1] : 1.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + thread_rank(); i < count;
       i += stride) {
    float v;
    if (ws != nullptr) {
      v = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) v += ws[sp * count + i];
    } else {
      v = t_in[i];
    }
    if (t_out != nullptr) t_out[i] = v;
    if (tm_out != nullptr) {
      const float ms = mask != nullptr ? to_f(mask[i % r]) * s : 1.f;
      tm_out[i] = from_f<T>(v * ms * q_inv);
    }
  }
}

// out[i] = T(scale * sum_{sp < splits} ws[sp][i]), splits summed in order; scale is
// *scale_ptr (a device value), 1 when scale_ptr is null.
template <typename T>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const float* __restrict__ ws, int64_t splits, int64_t count,
                const float* __restrict__ scale_ptr, T* __restrict__ out) {
  const float scale = scale_ptr != nullptr ? *scale_ptr : 1.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + thread_rank(); i < count;
       i += stride) {
    float v = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) v += ws[sp * count + i];
    out[i] = from_f<T>(scale * v);
  }
}

// out[M, N] = T(a * A1 B1 + q[0] * A2 B2 + s * bias + a * bias2), a and s from `scales`;
// q (null: 1) undoes A2's range scaling: the accumulator holds everything times q[1].
// A1 and A2 are K-contiguous ([M][K1], [M][K2]); K1 == 0 skips the first product.
//   forward y : A1 = x, B1 = W0 [m][k] (KC), A2 = tm, B2 = U [m][r] (KC)
//   dx        : A1 = dy, B1 = W0 [m][k] (MN), A2 = h, B2 = V [r][k] (MN)
template <typename T, bool B1KC, bool B2KC>
__global__ void __launch_bounds__(kThreads)
two_gemm_kernel(Operand<T> A1, Operand<T> B1, int64_t K1, Operand<T> A2, Operand<T> B2,
                int64_t K2, const T* __restrict__ bias, const T* __restrict__ bias2,
                const float* __restrict__ scales, const float* __restrict__ a2_q,
                T* __restrict__ out, int64_t M, int64_t N) {
  using P = typename PolicyOf<T>::type;
  const float a = teacher_scale(scales);
  const float s = student_scale(scales);
  const float q = a2_q != nullptr ? a2_q[0] : 1.f;
  const float q_inv = a2_q != nullptr ? a2_q[1] : 1.f;
  char* smem = dynamic_smem();
  float* sC = reinterpret_cast<float*>(smem);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int rows_valid = static_cast<int>(imin<int64_t>(kBM, M - m0));
  const int cols_valid = static_cast<int>(imin<int64_t>(kBN, N - n0));
  typename P::Acc acc;
  P::zero(acc);
  if (K1 > 0) {
    mainloop<T, true, B1KC>(acc, A1, B1, m0, n0, 0, K1, smem, rows_valid, cols_valid);
    P::scale(acc, a * q_inv);
  }
  mainloop<T, true, B2KC>(acc, A2, B2, m0, n0, 0, K2, smem, rows_valid, cols_valid);
  P::stage(acc, sC, kLdC, rows_valid, cols_valid);
  __syncthreads();
  for (int idx = thread_rank(); idx < kBM * kBN; idx += kThreads) {
    const int rr = idx / kBN;
    const int cc = idx % kBN;
    if (rr < rows_valid && cc < cols_valid) {
      const int64_t col = n0 + cc;
      const float v = sC[rr * kLdC + cc] * q + bias_term(bias, s, bias2, a, col);
      out[(m0 + rr) * N + col] = from_f<T>(v);
    }
  }
}

// Fused forward (1 <= r <= 128). grid = (row tiles, column groups). Shared memory:
// [tm: 128 x kLdFull T][work: max(pipeline, U tile, fp32 staging tile)].
template <typename T>
constexpr int fused_smem_bytes() {
  using C = TileCfg<T>;
  constexpr int work = C::kPipeBytes > C::kFullBytes ? C::kPipeBytes : C::kFullBytes;
  return C::kFullBytes + (work > kStageCBytes ? work : kStageCBytes);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
fused_forward_kernel(Operand<T> X, Operand<T> V, Operand<T> W0, Operand<T> U, int64_t K,
                     const T* __restrict__ mask, const T* __restrict__ bias,
                     const T* __restrict__ b0, const float* __restrict__ scales,
                     float* __restrict__ t_out, T* __restrict__ y, int64_t N, int64_t M, int r,
                     int groups) {
  using C = TileCfg<T>;
  const float a = teacher_scale(scales);
  const float s = student_scale(scales);
  using P = typename PolicyOf<T>::type;
  char* smem = dynamic_smem();
  T* sT = reinterpret_cast<T*>(smem);
  char* work = smem + C::kFullBytes;
  float* sC = reinterpret_cast<float*>(work);
  T* sU = reinterpret_cast<T*>(work);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int rows_valid = static_cast<int>(imin<int64_t>(kBM, N - m0));
  const int rp = (r + 15) / 16 * 16;  // K extent of the expand product (zero padded)

  // Phase 1: t tile = x[m0:m0+128, :] V^T, kept in shared memory as tm.
  typename P::Acc acc;
  P::zero(acc);
  mainloop<T, true, true>(acc, X, V, m0, 0, 0, K, work, rows_valid, r);
  P::stage(acc, sC, kLdC, rows_valid, r);
  __syncthreads();
  // fp16: the tile's own power-of-two range scale for tm (kRangeScaled); sT is free
  // scratch for the block reduction until tm is written.
  float q = 1.f, q_inv = 1.f;
  if constexpr (kRangeScaled<T>) {
    float mx = 0.f;
    for (int idx = thread_rank(); idx < rows_valid * r; idx += kThreads) {
      const int rr = idx / r;
      const int jj = idx % r;
      mx = fmaxf(mx, fabsf(sC[rr * kLdC + jj] * (to_f(mask[jj]) * s)));
    }
    range_scale_of(block_max(mx, reinterpret_cast<float*>(sT)), q, q_inv);
  }
  for (int idx = thread_rank(); idx < kBM * rp; idx += kThreads) {
    const int rr = idx / rp;
    const int jj = idx % rp;
    float v = 0.f;
    if (rr < rows_valid && jj < r) {
      v = sC[rr * kLdC + jj];
      if (blockIdx.y == 0) t_out[(m0 + rr) * r + jj] = v;
      v *= to_f(mask[jj]) * s;
    }
    sT[rr * C::kLdFull + jj] = from_f<T>(v * q_inv);
  }
  __syncthreads();

  // Phase 2: output column tiles ct = group, group + groups, ...
  const int64_t col_tiles = (M + kBN - 1) / kBN;
  for (int64_t ct = blockIdx.y; ct < col_tiles; ct += groups) {
    const int64_t n0 = ct * kBN;
    const int cols_valid = static_cast<int>(imin<int64_t>(kBN, M - n0));
    P::zero(acc);
    if (W0.p != nullptr) {
      mainloop<T, true, true>(acc, X, W0, m0, n0, 0, K, work, rows_valid, cols_valid);
      P::scale(acc, a * q_inv);  // the whole accumulator carries tm's scale
    }
    // U[n0:n0+128, 0:rp] -> shared (zeros past r and past M), then acc += tm U^T.
    load_tile<T, kBN, kBN>(sU, C::kLdFull, U.p, U.ld, U.rows, r, n0, 0, U.vec, rp);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    P::template compute<true, true>(acc, sT, C::kLdFull, sU, C::kLdFull, rp, rows_valid,
                                    cols_valid);
    __syncthreads();
    P::stage(acc, sC, kLdC, rows_valid, cols_valid);
    __syncthreads();
    for (int idx = thread_rank(); idx < kBM * kBN; idx += kThreads) {
      const int rr = idx / kBN;
      const int cc = idx % kBN;
      if (rr < rows_valid && cc < cols_valid) {
        const int64_t col = n0 + cc;
        const float v = sC[rr * kLdC + cc] * q + bias_term(bias, s, b0, a, col);
        y[(m0 + rr) * M + col] = from_f<T>(v);
      }
    }
    __syncthreads();
  }
}

// Backward g = dy U for a [128 rows, 128 ranks] tile, then
//   h[n, j]             = T(s * g * mask[j])                 (if h_out)
//   h32[n, j]           = s * g * mask[j] in fp32             (if h32_out: fp16, which
//                          range-scales h before rounding it; see common/mlr.h)
//   dmask_ws[tile_row, j] = sum over the tile's rows of t * g   (if dmask_ws)
// dy [n][m] is K-contiguous, U [m][r] is MN-contiguous.
constexpr int bwd_g_smem_bytes() { return kStageCBytes + 2 * kBN * 4; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_g_kernel(Operand<T> DY, Operand<T> Uop, int64_t N, int64_t M, int64_t r,
             const float* __restrict__ t, const T* __restrict__ mask,
             const float* __restrict__ scales, T* __restrict__ h_out,
             float* __restrict__ h32_out, float* __restrict__ dmask_ws) {
  using P = typename PolicyOf<T>::type;
  const float s = student_scale(scales);
  char* smem = dynamic_smem();
  float* sC = reinterpret_cast<float*>(smem);
  float* red = reinterpret_cast<float*>(smem + kStageCBytes);  // [2][128]
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int rows_valid = static_cast<int>(imin<int64_t>(kBM, N - m0));
  const int cols_valid = static_cast<int>(imin<int64_t>(kBN, r - n0));
  typename P::Acc acc;
  P::zero(acc);
  mainloop<T, true, false>(acc, DY, Uop, m0, n0, 0, M, smem, rows_valid, cols_valid);
  P::stage(acc, sC, kLdC, rows_valid, cols_valid);
  __syncthreads();
  if (h_out != nullptr || h32_out != nullptr) {
    for (int idx = thread_rank(); idx < kBM * kBN; idx += kThreads) {
      const int rr = idx / kBN;
      const int cc = idx % kBN;
      if (rr < rows_valid && cc < cols_valid) {
        const int64_t j = n0 + cc;
        const float h = sC[rr * kLdC + cc] * (to_f(mask[j]) * s);
        if (h32_out != nullptr) {
          h32_out[(m0 + rr) * r + j] = h;
        } else {
          h_out[(m0 + rr) * r + j] = from_f<T>(h);
        }
      }
    }
  }
  if (dmask_ws != nullptr) {
    const int cc = thread_rank() % kBN;
    const int part = thread_rank() / kBN;  // 0 or 1: rows [64 part, 64 part + 64)
    float sum = 0.f;
    if (cc < cols_valid) {
      const int64_t j = n0 + cc;
      const int r_end = imin(64 * part + 64, rows_valid);
      for (int rr = 64 * part; rr < r_end; ++rr) {
        sum = fmaf(t[(m0 + rr) * r + j], sC[rr * kLdC + cc], sum);
      }
    }
    red[part * kBN + cc] = sum;
    __syncthreads();
    if (part == 0 && cc < cols_valid) {
      dmask_ws[static_cast<int64_t>(blockIdx.x) * r + n0 + cc] = red[cc] + red[kBN + cc];
    }
  }
}

// ws[split][col] = sum over the split's rows of dy[row][col] (dbias partials).
template <typename T>
__global__ void __launch_bounds__(kThreads)
colsum_partial_kernel(const T* __restrict__ dy, int64_t N, int64_t M, int64_t rows_per_split,
                      float* __restrict__ ws) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + thread_rank();
  if (col >= M) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = imin(N, r0 + rows_per_split);
  float acc = 0.f;
  for (int64_t row = r0; row < r1; ++row) acc += to_f(dy[row * M + col]);
  ws[static_cast<int64_t>(blockIdx.y) * M + col] = acc;
}

// --- decode (n <= 16): CUDA-core GEMV kernels, fp32 math ------------------------

// v[0:8] = row[k:k+8] as floats, zeros at or past k_end. 16-byte loads when
// `vec` (row 16-byte aligned) and k is a multiple of 8 with the chunk in range.
template <typename T>
struct alignas(16) Vec8 {
  T e[8];
};

template <typename T>
TC_DEV void load8(const T* row, int64_t k, int64_t k_end, bool vec, float (&v)[8]) {
  if (vec && k + 8 <= k_end) {
    const Vec8<T> raw = *reinterpret_cast<const Vec8<T>*>(row + k);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_f(raw.e[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = k + e < k_end ? to_f(row[k + e]) : 0.f;
  }
}

constexpr int kDecodeN = 16;

// ws[split][row][j] = x[row, ks] . V[j, ks]; one warp per rank j, lanes stride k by 8.
template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_t_kernel(const T* __restrict__ x, bool vec_x, const T* __restrict__ V, bool vec_v,
                int64_t N, int64_t K, int64_t r, int64_t split_len, float* __restrict__ ws) {
  const int warp = thread_rank() / 32;
  const int lane = thread_rank() % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (j >= r) return;  // whole warp leaves; this kernel never synchronises the block
  const int64_t kb = static_cast<int64_t>(blockIdx.y) * split_len;
  const int64_t ke = imin(K, kb + split_len);
  float acc[kDecodeN];
#pragma unroll
  for (int n = 0; n < kDecodeN; ++n) acc[n] = 0.f;
  const T* vrow = V + j * K;
  for (int64_t k = kb + 8 * lane; k < ke; k += 8 * 32) {
    float v[8];
    load8(vrow, k, ke, vec_v, v);
#pragma unroll
    for (int n = 0; n < kDecodeN; ++n) {
      if (n < N) {
        float xv[8];
        load8(x + n * K, k, ke, vec_x, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[n] = fmaf(xv[e], v[e], acc[n]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kDecodeN; ++n) {
    if (n < N) {
      const float total = warp_sum(acc[n]);
      if (lane == 0) ws[(static_cast<int64_t>(blockIdx.y) * N + n) * r + j] = total;
    }
  }
}

// y[row, o] = a x[row] . W0[o] + sum_j t[row, j] mask[j] s U[o, j] + s bias[o] + a b0[o]
// for two output columns o per warp (fp32 throughout; t is the fp32 saved t).
template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_y_kernel(const T* __restrict__ x, bool vec_x, const T* __restrict__ W0, bool vec_w,
                const T* __restrict__ U, const float* __restrict__ t,
                const T* __restrict__ mask, const T* __restrict__ bias,
                const T* __restrict__ b0, const float* __restrict__ scales,
                T* __restrict__ y, int64_t N, int64_t K, int64_t M, int64_t r) {
  const float a = teacher_scale(scales);
  const float s = student_scale(scales);
  const int warp = thread_rank() / 32;
  const int lane = thread_rank() % 32;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp) * 2;
  if (o0 >= M) return;  // whole warp; no block synchronisation in this kernel
  const bool two = o0 + 1 < M;
  float acc0[kDecodeN], acc1[kDecodeN];
#pragma unroll
  for (int n = 0; n < kDecodeN; ++n) acc0[n] = acc1[n] = 0.f;

  if (W0 != nullptr) {
    const T* w0row = W0 + o0 * K;
    const T* w1row = W0 + (two ? o0 + 1 : o0) * K;
    for (int64_t k = 8 * lane; k < K; k += 8 * 32) {
      float w0[8], w1[8];
      load8(w0row, k, K, vec_w, w0);
      load8(w1row, k, K, vec_w, w1);
#pragma unroll
      for (int n = 0; n < kDecodeN; ++n) {
        if (n < N) {
          float xv[8];
          load8(x + n * K, k, K, vec_x, xv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            acc0[n] = fmaf(xv[e], w0[e], acc0[n]);
            acc1[n] = fmaf(xv[e], w1[e], acc1[n]);
          }
        }
      }
    }
#pragma unroll
    for (int n = 0; n < kDecodeN; ++n) {
      acc0[n] *= a;
      acc1[n] *= a;
    }
  }
  const T* u1row = U + (two ? o0 + 1 : o0) * r;
  for (int64_t j = lane; j < r; j += 32) {
    const float ms = to_f(mask[j]) * s;
    const float u0 = to_f(U[o0 * r + j]);
    const float u1 = to_f(u1row[j]);
#pragma unroll
    for (int n = 0; n < kDecodeN; ++n) {
      if (n < N) {
        const float tm = t[n * r + j] * ms;
        acc0[n] = fmaf(tm, u0, acc0[n]);
        acc1[n] = fmaf(tm, u1, acc1[n]);
      }
    }
  }
  const float c0 = bias_term(bias, s, b0, a, o0);
  const float c1 = two ? bias_term(bias, s, b0, a, o0 + 1) : 0.f;
#pragma unroll
  for (int n = 0; n < kDecodeN; ++n) {
    if (n < N) {
      const float v0 = warp_sum(acc0[n]);
      const float v1 = warp_sum(acc1[n]);
      if (lane == 0) {
        y[n * M + o0] = from_f<T>(v0 + c0);
        if (two) y[n * M + o0 + 1] = from_f<T>(v1 + c1);
      }
    }
  }
}

}  // namespace mlr
}  // namespace tunecomp
