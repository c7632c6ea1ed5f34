// Masked low-rank op (docs/design.md#the-op) on CUDA: arguments, validation and the
// launch plan shared by the pybind11 layer and the CUDA launchers.
//
// Shapes (all row-major and contiguous; the Python wrapper calls .contiguous()):
//   x [n, k]   U [m, r]   mask [r]   V [r, k]   bias [m]   W0 [m, k]   b0 [m]
//   y [n, m] (x's dtype)  t = x V^T [n, r] (float32 for every supported dtype)
// with k = in_features, m = out_features. Backward takes dy [n, m] and t and
// writes dx [n, k], dU [m, r], dmask [r], dV [r, k], dbias [m] in x's dtype.
//
// The plan (which kernels run, split counts, workspace layout) is plain host
// code, so a CPU-only build answers plan queries and validates arguments just
// like a CUDA build. The caller allocates the workspace (torch's caching
// allocator) with the size the plan reports and passes it in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/errors.h"

namespace tunecomp {
namespace mlr {

constexpr int64_t kTile = 128;           // CTA tile of every tensor-core/SIMT GEMM (M and N)
constexpr int64_t kMaxFusedRank = 128;   // the fused forward keeps a [128, 128] t tile on chip
constexpr int64_t kDecodeMaxRows = 16;   // decode (GEMV) path: n <= 16
constexpr int64_t kDecodeRanksPerBlock = 8;   // one warp per rank
constexpr int64_t kDecodeRowsPerBlock = 16;   // 8 warps x 2 output rows
constexpr int64_t kDecodeChunk = 256;    // 32 lanes x 8 elements
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kColsumThreads = 256;
constexpr int64_t kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 4096;

// Blocks of a grid-stride elementwise kernel over `count` items (also the number of
// partial maxima the range scaling below writes).
inline int64_t elementwise_block_count(int64_t count) {
  const int64_t blocks = (count + kElementwiseThreads - 1) / kElementwiseThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxElementwiseBlocks));
}

// fp16 intermediates are range-scaled: the fp32 t * s * mask (forward split, dU) and
// h = s * (dy U) * mask (dx, dV) are multiplied by a power of two 2^-e, chosen from the
// tensor's largest magnitude, before they are rounded to fp16 for the tensor-core
// product, and the product is multiplied by 2^e afterwards. Both steps are exact, so
// the result is that of the fp16 product without its range: unscaled, |t| > 65504
// overflowed and |h| < 6e-5 lost its precision (subnormals). bf16 has fp32's range and
// fp32 is not rounded, so neither is scaled. Workspace: one fp32 partial maximum per
// elementwise block and the scale pair [2^e, 2^-e] per scaled tensor.
inline bool range_scaled(DType d) { return d == DType::kFloat16; }

enum class ForwardPath : int { kAuto = 0, kFused = 1, kSplit = 2, kDecode = 3 };

// Bits of the backward `needs` mask, in the contract's order (dx, dU, dmask, dV, dbias).
constexpr int kNeedX = 1, kNeedU = 2, kNeedMask = 4, kNeedV = 8, kNeedBias = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return b <= 0 ? 0 : (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

inline int64_t elem_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// A split of one reduction dimension into `count` ranges of `len` elements
// (the last may be shorter). len is a multiple of the granule; count >= 1.
struct Split {
  int64_t count = 1;
  int64_t len = 0;
};

// Split a reduction of length `len_total` so that `tiles` output tiles times the
// split count roughly fills 2 blocks per SM, with at least `min_len` elements
// per split. Deterministic: depends only on the shape and the SM count.
inline Split split_reduction(int64_t len_total, int64_t tiles, int64_t sms, int64_t granule,
                             int64_t min_len) {
  Split s;
  if (len_total <= 0) return s;  // one empty split: the kernels write zeros
  const int64_t target = 2 * std::max<int64_t>(sms, 1);
  int64_t want = tiles >= target ? 1 : ceil_div(target, std::max<int64_t>(tiles, 1));
  const int64_t by_len = std::max<int64_t>(1, len_total / std::max<int64_t>(min_len, 1));
  want = std::max<int64_t>(1, std::min({want, by_len, kMaxSplits}));
  s.len = round_up(ceil_div(len_total, want), granule);
  s.count = ceil_div(len_total, s.len);
  return s;
}

struct Shape {
  int64_t n = 0, k = 0, m = 0, r = 0;
  DType dtype = DType::kFloat32;
};

inline void check_shape(const Shape& s, const char* who) {
  TC_CHECK_ARG(s.n >= 0 && s.k >= 0 && s.m >= 0 && s.r >= 0, who,
               ": sizes must be >= 0, got n=", s.n, " in=", s.k, " out=", s.m, " r=", s.r);
  TC_CHECK_ARG(s.dtype != DType::kFloat64, who,
               ": float64 is not supported by the CUDA kernels (the Python wrapper serves it "
               "with the reference path)");
  // Grid limits: n-sized tile counts go on grid.x (2^31 - 1 blocks); in/out/r
  // tile counts may land on grid.y (65535).
  TC_CHECK_ARG(ceil_div(std::max({s.k, s.m, s.r}), kTile) <= 65535, who,
               ": in/out/r too large for the launch grid");
}

inline const char* path_name(ForwardPath p) {
  switch (p) {
    case ForwardPath::kAuto: return "auto";
    case ForwardPath::kFused: return "fused";
    case ForwardPath::kSplit: return "split";
    case ForwardPath::kDecode: return "decode";
  }
  return "unknown";
}

struct ForwardPlan {
  ForwardPath path = ForwardPath::kSplit;
  Split t_split;            // split path: split-K of t = x V^T over k (tensor-core tiles)
  Split decode_split;       // decode path: split-K of t over k (GEMV)
  int64_t fused_groups = 1; // fused path: column-tile groups per row tile
  size_t off_t_partial = 0, off_tm = 0;
  size_t off_qpart = 0, off_q = 0;  // range scaling (fp16 split path)
  size_t workspace_bytes = 0;
};

inline ForwardPath resolve_forward_path(const Shape& s, int requested, int64_t sms) {
  TC_CHECK_ARG(requested >= 0 && requested <= 3, "masked_lowrank forward: unknown path code ",
               requested, " (0=auto, 1=fused, 2=split, 3=decode)");
  const auto req = static_cast<ForwardPath>(requested);
  if (req == ForwardPath::kDecode) {
    TC_CHECK_ARG(s.n <= kDecodeMaxRows, "masked_lowrank forward: the decode path serves n <= ",
                 kDecodeMaxRows, " rows, got n=", s.n);
    return req;
  }
  if (req == ForwardPath::kFused) {
    TC_CHECK_ARG(s.r >= 1 && s.r <= kMaxFusedRank, "masked_lowrank forward: the fused path "
                 "serves 1 <= r <= ", kMaxFusedRank, ", got r=", s.r);
    return req;
  }
  if (req == ForwardPath::kSplit) return req;
  if (s.n <= kDecodeMaxRows) return ForwardPath::kDecode;
  // The fused kernel recomputes t once per column group; use it only when the
  // row tiles alone nearly fill the GPU (groups <= 2), else split at t.
  const int64_t row_tiles = ceil_div(s.n, kTile);
  if (s.r >= 1 && s.r <= kMaxFusedRank && 2 * row_tiles >= std::max<int64_t>(sms, 1)) {
    return ForwardPath::kFused;
  }
  return ForwardPath::kSplit;
}

inline ForwardPlan plan_forward(const Shape& s, int requested, int64_t sms) {
  check_shape(s, "masked_lowrank forward");
  TC_CHECK_ARG(sms >= 1, "masked_lowrank forward: sms must be >= 1, got ", sms);
  ForwardPlan p;
  p.path = resolve_forward_path(s, requested, sms);
  const int64_t es = elem_size(s.dtype);
  size_t off = 0;
  if (p.path == ForwardPath::kDecode) {
    if (s.r > 0 && s.n > 0) {
      p.decode_split = split_reduction(s.k, ceil_div(s.r, kDecodeRanksPerBlock), sms,
                                       kDecodeChunk, kDecodeChunk);
      p.off_t_partial = off;
      off += align256(static_cast<size_t>(p.decode_split.count * s.n * s.r) * 4);
    }
  } else if (p.path == ForwardPath::kSplit) {
    if (s.r > 0 && s.n > 0) {
      const int64_t tiles = ceil_div(s.n, kTile) * ceil_div(s.r, kTile);
      p.t_split = split_reduction(s.k, tiles, sms, 64, 256);
      p.off_t_partial = off;
      off += align256(static_cast<size_t>(p.t_split.count * s.n * s.r) * 4);
      p.off_tm = off;
      off += align256(static_cast<size_t>(s.n * s.r * es));
      if (range_scaled(s.dtype)) {
        p.off_qpart = off;
        off += align256(static_cast<size_t>(elementwise_block_count(s.n * s.r)) * 4);
        p.off_q = off;
        off += align256(2 * 4);
      }
    }
  } else {  // fused
    const int64_t row_tiles = std::max<int64_t>(1, ceil_div(s.n, kTile));
    const int64_t col_tiles = std::max<int64_t>(1, ceil_div(s.m, kTile));
    p.fused_groups = std::max<int64_t>(
        1, std::min(col_tiles, ceil_div(std::max<int64_t>(sms, 1), row_tiles)));
  }
  p.workspace_bytes = off;
  return p;
}

struct BackwardPlan {
  bool run_g = false;      // g = dy U, epilogue: h = s g mask, dmask partials
  bool need_h = false;
  bool run_tm = false;     // tm = T(t * mask * s) for dU
  int64_t row_tiles = 0;   // dmask partial count
  Split du_split, dv_split, db_split;
  size_t off_h = 0, off_dmask = 0, off_tm = 0, off_du = 0, off_dv = 0, off_db = 0;
  // range scaling (fp16): fp32 h, partial maxima, [2^e, 2^-e] of h then of t*s*mask
  size_t off_h32 = 0, off_qpart = 0, off_q = 0;
  size_t workspace_bytes = 0;
};

inline BackwardPlan plan_backward(const Shape& s, int needs, int64_t sms) {
  check_shape(s, "masked_lowrank backward");
  TC_CHECK_ARG(sms >= 1, "masked_lowrank backward: sms must be >= 1, got ", sms);
  TC_CHECK_ARG(needs >= 0 && needs < 32, "masked_lowrank backward: needs must be a 5-bit mask, got ",
               needs);
  BackwardPlan p;
  const int64_t es = elem_size(s.dtype);
  const bool have_r = s.r > 0 && s.n > 0;
  p.need_h = have_r && (needs & (kNeedX | kNeedV));
  p.run_g = p.need_h || (have_r && (needs & kNeedMask));
  p.run_tm = have_r && (needs & kNeedU) && s.m > 0;
  p.row_tiles = ceil_div(s.n, kTile);
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off += align256(bytes);
    return at;
  };
  if (p.need_h) p.off_h = take(static_cast<size_t>(s.n * s.r * es));
  if (range_scaled(s.dtype) && (p.need_h || p.run_tm)) {
    if (p.need_h) p.off_h32 = take(static_cast<size_t>(s.n * s.r) * 4);
    p.off_qpart = take(static_cast<size_t>(elementwise_block_count(s.n * s.r)) * 4);
    p.off_q = take(4 * 4);
  }
  if ((needs & kNeedMask) && s.r > 0) {
    p.off_dmask = take(static_cast<size_t>(std::max<int64_t>(p.row_tiles, 1) * s.r) * 4);
  }
  if (p.run_tm) p.off_tm = take(static_cast<size_t>(s.n * s.r * es));
  if ((needs & kNeedU) && s.m > 0 && s.r > 0) {
    p.du_split = split_reduction(s.n, ceil_div(s.m, kTile) * ceil_div(s.r, kTile), sms, 64, 256);
    p.off_du = take(static_cast<size_t>(p.du_split.count * s.m * s.r) * 4);
  }
  if ((needs & kNeedV) && s.r > 0 && s.k > 0) {
    p.dv_split = split_reduction(s.n, ceil_div(s.r, kTile) * ceil_div(s.k, kTile), sms, 64, 256);
    p.off_dv = take(static_cast<size_t>(p.dv_split.count * s.r * s.k) * 4);
  }
  if ((needs & kNeedBias) && s.m > 0) {
    p.db_split = split_reduction(s.n, ceil_div(s.m, kColsumThreads), sms, 32, 256);
    p.off_db = take(static_cast<size_t>(p.db_split.count * s.m) * 4);
  }
  p.workspace_bytes = off;
  return p;
}

// --- launch arguments ------------------------------------------------------------

template <typename P>
inline P* as_ptr(uint64_t v) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(v));
}

struct ForwardArgs {
  const void *x = nullptr, *U = nullptr, *mask = nullptr, *V = nullptr;
  const void *bias = nullptr, *W0 = nullptr, *b0 = nullptr;
  void *y = nullptr, *t = nullptr, *ws = nullptr;
  size_t ws_bytes = 0;
  Shape shape;
  // Device array [a, s] (fp32): the kernels load the blend scales, the host never reads
  // them (no sync; under torch.compile they are data, not constants).
  const float* scales = nullptr;
  ForwardPlan plan;
};

inline ForwardArgs make_forward_args(uint64_t x, uint64_t U, uint64_t mask, uint64_t V,
                                     uint64_t bias, uint64_t W0, uint64_t b0, uint64_t y,
                                     uint64_t t, uint64_t ws, uint64_t ws_bytes, int64_t n,
                                     int64_t k, int64_t m, int64_t r, int64_t dtype,
                                     uint64_t scales, int64_t path, int64_t sms) {
  const char* who = "masked_lowrank forward";
  TC_CHECK_ARG(is_known_dtype_code(dtype), who, ": unknown dtype code ", dtype,
               " (expected 0=float32, 1=float16, 2=bfloat16)");
  ForwardArgs a;
  a.shape = Shape{n, k, m, r, static_cast<DType>(dtype)};
  a.plan = plan_forward(a.shape, static_cast<int>(path), sms);
  TC_CHECK_ARG(n * k == 0 || x != 0, who, ": x pointer is null");
  TC_CHECK_ARG(m * r == 0 || U != 0, who, ": U pointer is null");
  TC_CHECK_ARG(r == 0 || mask != 0, who, ": mask pointer is null");
  TC_CHECK_ARG(r * k == 0 || V != 0, who, ": V pointer is null");
  TC_CHECK_ARG(n * m == 0 || y != 0, who, ": y pointer is null");
  TC_CHECK_ARG(n * r == 0 || t != 0, who, ": t pointer is null");
  TC_CHECK_ARG(b0 == 0 || W0 != 0, who, ": teacher_bias given without teacher_weight");
  TC_CHECK_ARG(scales != 0, who, ": scales pointer is null");
  TC_CHECK_ARG(ws_bytes >= a.plan.workspace_bytes, who, ": workspace of ", ws_bytes,
               " bytes is smaller than the plan's ", a.plan.workspace_bytes);
  TC_CHECK_ARG(a.plan.workspace_bytes == 0 || ws != 0, who, ": workspace pointer is null");
  a.x = as_ptr<const void>(x);
  a.U = as_ptr<const void>(U);
  a.mask = as_ptr<const void>(mask);
  a.V = as_ptr<const void>(V);
  a.bias = as_ptr<const void>(bias);
  a.W0 = as_ptr<const void>(W0);
  a.b0 = as_ptr<const void>(b0);
  a.y = as_ptr<void>(y);
  a.t = as_ptr<void>(t);
  a.ws = as_ptr<void>(ws);
  a.ws_bytes = static_cast<size_t>(ws_bytes);
  a.scales = as_ptr<const float>(scales);
  return a;
}

struct BackwardArgs {
  const void *dy = nullptr, *x = nullptr, *U = nullptr, *mask = nullptr, *V = nullptr;
  const void *t = nullptr, *W0 = nullptr;
  void *dx = nullptr, *dU = nullptr, *dmask = nullptr, *dV = nullptr, *dbias = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  Shape shape;
  const float* scales = nullptr;  // device [a, s], as in ForwardArgs
  int needs = 0;
  BackwardPlan plan;
};

inline BackwardArgs make_backward_args(uint64_t dy, uint64_t x, uint64_t U, uint64_t mask,
                                       uint64_t V, uint64_t t, uint64_t W0, uint64_t dx,
                                       uint64_t dU, uint64_t dmask, uint64_t dV, uint64_t dbias,
                                       uint64_t ws, uint64_t ws_bytes, int64_t n, int64_t k,
                                       int64_t m, int64_t r, int64_t dtype, uint64_t scales,
                                       int64_t needs, int64_t sms) {
  const char* who = "masked_lowrank backward";
  TC_CHECK_ARG(is_known_dtype_code(dtype), who, ": unknown dtype code ", dtype,
               " (expected 0=float32, 1=float16, 2=bfloat16)");
  BackwardArgs a;
  a.shape = Shape{n, k, m, r, static_cast<DType>(dtype)};
  a.plan = plan_backward(a.shape, static_cast<int>(needs), sms);
  a.needs = static_cast<int>(needs);
  const bool nx = needs & kNeedX, nu = needs & kNeedU, nm = needs & kNeedMask,
             nv = needs & kNeedV, nb = needs & kNeedBias;
  TC_CHECK_ARG(n * m == 0 || dy != 0, who, ": grad_y pointer is null");
  TC_CHECK_ARG(!nv || n * k == 0 || x != 0, who, ": x pointer is null");
  TC_CHECK_ARG(m * r == 0 || U != 0, who, ": U pointer is null");
  TC_CHECK_ARG(r == 0 || mask != 0, who, ": mask pointer is null");
  TC_CHECK_ARG(!nx || r * k == 0 || V != 0, who, ": V pointer is null");
  TC_CHECK_ARG(!(nu || nm) || n * r == 0 || t != 0, who, ": t pointer is null");
  TC_CHECK_ARG(!nx || n * k == 0 || dx != 0, who, ": dx pointer is null");
  TC_CHECK_ARG(!nu || m * r == 0 || dU != 0, who, ": dU pointer is null");
  TC_CHECK_ARG(!nm || r == 0 || dmask != 0, who, ": dmask pointer is null");
  TC_CHECK_ARG(!nv || r * k == 0 || dV != 0, who, ": dV pointer is null");
  TC_CHECK_ARG(!nb || m == 0 || dbias != 0, who, ": dbias pointer is null");
  TC_CHECK_ARG(scales != 0, who, ": scales pointer is null");
  TC_CHECK_ARG(ws_bytes >= a.plan.workspace_bytes, who, ": workspace of ", ws_bytes,
               " bytes is smaller than the plan's ", a.plan.workspace_bytes);
  TC_CHECK_ARG(a.plan.workspace_bytes == 0 || ws != 0, who, ": workspace pointer is null");
  a.dy = as_ptr<const void>(dy);
  a.x = as_ptr<const void>(x);
  a.U = as_ptr<const void>(U);
  a.mask = as_ptr<const void>(mask);
  a.V = as_ptr<const void>(V);
  a.t = as_ptr<const void>(t);
  a.W0 = as_ptr<const void>(W0);
  a.dx = as_ptr<void>(dx);
  a.dU = as_ptr<void>(dU);
  a.dmask = as_ptr<void>(dmask);
  a.dV = as_ptr<void>(dV);
  a.dbias = as_ptr<void>(dbias);
  a.ws = as_ptr<void>(ws);
  a.ws_bytes = static_cast<size_t>(ws_bytes);
  a.scales = as_ptr<const float>(scales);
  return a;
}

}  // namespace mlr

// csrc/cuda/mlr_api.cu (only linked when built with CUDA). Asynchronous on `stream`
// (a cudaStream_t owned by the caller) of the current device.
void mlr_forward_cuda(const mlr::ForwardArgs& a, void* stream);
void mlr_backward_cuda(const mlr::BackwardArgs& a, void* stream);

}  // namespace tunecomp
