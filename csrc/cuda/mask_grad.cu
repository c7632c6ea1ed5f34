// Host launcher for the CUDA mask-gradient reduction (see mask_grad.cuh).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/mask_grad.h"
#include "cuda/cuda_check.cuh"
#include "cuda/mask_grad.cuh"

namespace tunecomp {
namespace {

// A row split smaller than this costs more in the finalize pass than it adds
// in parallelism.
constexpr int64_t kMinRowsPerSplit = 512;
constexpr int64_t kMaxSplits = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename S>
void launch(const MaskGradArgs& a, cudaStream_t stream) {
  using A = typename cuda::AccOf<S>::type;
  const auto* t = static_cast<const S*>(a.t);
  const auto* g = static_cast<const S*>(a.g);
  auto* out = static_cast<A*>(a.out);

  // One warp per column when both inputs are contiguous along n (column-major,
  // e.g. transposed views) or when r is so small that most lanes of the rows
  // kernel would idle; otherwise 32 adjacent columns per warp.
  const bool n_contiguous = a.t_s0 == 1 && a.g_s0 == 1;
  const bool use_cols = n_contiguous || a.r < 16;
  const int64_t cols_per_block = use_cols ? cuda::kColsWarps : cuda::kRowsTileCols;
  const int64_t tiles = ceil_div(a.r, cols_per_block);

  int device = 0;
  TC_CUDA_CHECK(cudaGetDevice(&device), "mask_grad_cuda (cudaGetDevice)");
  int sms = 0;
  TC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                "mask_grad_cuda (cudaDeviceGetAttribute)");

  // Split n across blocks only when the column tiles alone cannot fill the
  // GPU (small r, large n).
  int64_t splits = 1;
  const int64_t target_blocks = 2 * static_cast<int64_t>(std::max(sms, 1));
  if (tiles < target_blocks && a.n >= 2 * kMinRowsPerSplit) {
    splits = std::min({ceil_div(target_blocks, tiles), a.n / kMinRowsPerSplit, kMaxSplits});
  }
  int64_t rows_per_split = std::max<int64_t>(1, ceil_div(a.n, splits));
  splits = std::max<int64_t>(1, ceil_div(a.n, rows_per_split));

  A* workspace = nullptr;
  if (splits > 1) {
    // Stream-ordered, so it is safe with the caller's stream and freed in
    // order after the finalize kernel. If the pool is unsupported, fall back
    // to one split (still correct, only less parallel).
    const size_t bytes = static_cast<size_t>(splits * a.r) * sizeof(A);
    if (cudaMallocAsync(reinterpret_cast<void**>(&workspace), bytes, stream) != cudaSuccess) {
      (void)cudaGetLastError();  // clear the non-sticky error
      workspace = nullptr;
      splits = 1;
      rows_per_split = std::max<int64_t>(1, a.n);
    }
  }

  A* dst = splits > 1 ? workspace : out;
  const A block_scale = splits > 1 ? A(1) : static_cast<A>(a.scale);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if (use_cols) {
    const dim3 block(cuda::kWarp, cuda::kColsWarps);
    cuda::mask_grad_cols_kernel<S, A><<<grid, block, 0, stream>>>(
        t, g, dst, a.n, a.r, rows_per_split, a.t_s0, a.t_s1, a.g_s0, a.g_s1, block_scale);
  } else {
    const dim3 block(cuda::kRowsTileCols, cuda::kRowsThreadsY);
    cuda::mask_grad_rows_kernel<S, A><<<grid, block, 0, stream>>>(
        t, g, dst, a.n, a.r, rows_per_split, a.t_s0, a.t_s1, a.g_s0, a.g_s1, block_scale);
  }
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && splits > 1) {
    constexpr int kThreads = 256;
    cuda::mask_grad_finalize_kernel<A>
        <<<static_cast<unsigned>(ceil_div(a.r, kThreads)), kThreads, 0, stream>>>(
            workspace, out, a.r, static_cast<int>(splits), static_cast<A>(a.scale));
    err = cudaGetLastError();
  }
  if (workspace != nullptr) (void)cudaFreeAsync(workspace, stream);
  TC_CUDA_CHECK(err, "mask_grad_cuda (kernel launch)");
}

}  // namespace

void mask_grad_cuda(const MaskGradArgs& a, void* stream_handle) {
  if (a.r == 0) return;
  // Drop any stale non-sticky error from an earlier call in this runtime so
  // a failure below is attributed to this launch.
  (void)cudaGetLastError();
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
    case DType::kFloat64: return launch<double>(a, stream);
  }
  TC_CHECK_ARG(false, "mask_grad_cuda: unknown dtype code ", static_cast<int>(a.dtype));
}

}  // namespace tunecomp
