// Device kernels for the fused mask-gradient reduction (common/mask_grad.h).
//
// Two layouts, one result:
//  * rows kernel  (block 32 x 8): threadIdx.x walks 32 adjacent columns, so a
//    warp reads a contiguous row slice when the inner stride is 1 (the normal
//    [N, r] row-major case); threadIdx.y strides over rows; the 8 row partials
//    are summed through shared memory in a fixed order.
//  * cols kernel  (block 32 x 8): one warp per column, lanes stride over rows,
//    so column-major inputs (e.g. transposed views) are read coalesced; the
//    lane partials are combined by warp shuffles.
// Each block handles one column tile and one row split. With one split the
// block writes scale * sum straight to the output; with several, it writes a
// partial row to a workspace and a finalize kernel adds the splits in order.
// No atomics: the result depends only on the shape and the split count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tunecomp {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kRowsTileCols = 32;   // columns per block, rows kernel
constexpr int kRowsThreadsY = 8;    // row lanes per block, rows kernel
constexpr int kColsWarps = 8;       // columns (warps) per block, cols kernel

template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S, typename A>
__global__ void __launch_bounds__(kRowsTileCols * kRowsThreadsY)
mask_grad_rows_kernel(const S* __restrict__ t, const S* __restrict__ g, A* __restrict__ dst,
                      int64_t n, int64_t r, int64_t rows_per_split, int64_t t_s0,
                      int64_t t_s1, int64_t g_s0, int64_t g_s1, A scale) {
  __shared__ A partial[kRowsThreadsY][kRowsTileCols];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kRowsTileCols + tx;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n1 = min(n, n0 + rows_per_split);

  A acc = 0;
  if (j < r) {
    const S* tj = t + j * t_s1;
    const S* gj = g + j * g_s1;
#pragma unroll 4
    for (int64_t i = n0 + ty; i < n1; i += kRowsThreadsY) {
      acc += to_acc(tj[i * t_s0]) * to_acc(gj[i * g_s0]);
    }
  }
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < r) {
    A s = 0;
#pragma unroll
    for (int y = 0; y < kRowsThreadsY; ++y) s += partial[y][tx];
    dst[static_cast<int64_t>(blockIdx.y) * r + j] = s * scale;
  }
}

template <typename S, typename A>
__global__ void __launch_bounds__(kWarp * kColsWarps)
mask_grad_cols_kernel(const S* __restrict__ t, const S* __restrict__ g, A* __restrict__ dst,
                      int64_t n, int64_t r, int64_t rows_per_split, int64_t t_s0,
                      int64_t t_s1, int64_t g_s0, int64_t g_s1, A scale) {
  const int lane = threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColsWarps + threadIdx.y;
  if (j >= r) return;  // uniform per warp, so the shuffles below stay full-warp
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n1 = min(n, n0 + rows_per_split);

  const S* tj = t + j * t_s1;
  const S* gj = g + j * g_s1;
  A acc = 0;
#pragma unroll 4
  for (int64_t i = n0 + lane; i < n1; i += kWarp) {
    acc += to_acc(tj[i * t_s0]) * to_acc(gj[i * g_s0]);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) dst[static_cast<int64_t>(blockIdx.y) * r + j] = acc * scale;
}

// out[j] = scale * sum over splits of partial[k, j], k in increasing order.
template <typename A>
__global__ void mask_grad_finalize_kernel(const A* __restrict__ partial, A* __restrict__ out,
                                          int64_t r, int splits, A scale) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= r) return;
  A s = 0;
  for (int k = 0; k < splits; ++k) s += partial[static_cast<int64_t>(k) * r + j];
  out[j] = s * scale;
}

}  // namespace cuda
}  // namespace tunecomp
