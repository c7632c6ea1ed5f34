// CPU path of the fused mask-gradient reduction (see common/mask_grad.h).
//
// Work is split into (column tile, row chunk) items. Both sizes are fixed
// constants, never derived from the thread count, and chunk partials are
// summed in chunk order, so results are bitwise identical for any number of
// OpenMP threads. Splitting rows as well as columns keeps all cores busy
// when r is small and n is large (the usual shape: n = tokens, r = rank).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/mask_grad.h"

namespace tunecomp {
namespace {

// Column tile: a row-major row slice of 16 elements is one or two cache lines.
constexpr int64_t kTileCols = 16;
// Rows per chunk; chunk partials cost chunks * r accumulators of memory.
constexpr int64_t kChunkRows = 2048;
// Below this many products, thread start-up costs more than it saves.
constexpr int64_t kParallelMinWork = 1 << 15;

struct F32 {
  using storage = float;
  using acc = float;
  static acc load(const storage* p, int64_t i) { return p[i]; }
};
struct F64 {
  using storage = double;
  using acc = double;
  static acc load(const storage* p, int64_t i) { return p[i]; }
};
struct F16 {
  using storage = uint16_t;
  using acc = float;
  static acc load(const storage* p, int64_t i) { return half_bits_to_float(p[i]); }
};
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static acc load(const storage* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

template <class E>
void tile_sum(const typename E::storage* t, const typename E::storage* g,
              const MaskGradArgs& a, int64_t tile, int64_t n0, int64_t n1,
              typename E::acc* dst) {
  using A = typename E::acc;
  const int64_t j0 = tile * kTileCols;
  const int64_t w = std::min(kTileCols, a.r - j0);
  A acc[kTileCols] = {};
  for (int64_t i = n0; i < n1; ++i) {
    const auto* trow = t + i * a.t_s0 + j0 * a.t_s1;
    const auto* grow = g + i * a.g_s0 + j0 * a.g_s1;
    for (int64_t jj = 0; jj < w; ++jj) {
      acc[jj] += E::load(trow, jj * a.t_s1) * E::load(grow, jj * a.g_s1);
    }
  }
  for (int64_t jj = 0; jj < w; ++jj) dst[j0 + jj] = acc[jj];
}

template <class E>
void mask_grad_cpu_impl(const MaskGradArgs& a) {
  using S = typename E::storage;
  using A = typename E::acc;
  const auto* t = static_cast<const S*>(a.t);
  const auto* g = static_cast<const S*>(a.g);
  auto* out = static_cast<A*>(a.out);
  const A scale = static_cast<A>(a.scale);
  const int64_t r = a.r;
  const int64_t tiles = (r + kTileCols - 1) / kTileCols;
  const int64_t chunks = std::max<int64_t>(1, (a.n + kChunkRows - 1) / kChunkRows);
  const bool parallel = a.n * r >= kParallelMinWork;
  (void)parallel;  // unused without OpenMP

  if (chunks == 1) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t tile = 0; tile < tiles; ++tile) {
      tile_sum<E>(t, g, a, tile, 0, a.n, out);
      const int64_t j1 = std::min(r, (tile + 1) * kTileCols);
      for (int64_t j = tile * kTileCols; j < j1; ++j) out[j] *= scale;
    }
    return;
  }

  std::vector<A> partial(static_cast<size_t>(chunks * r));
  const int64_t items = tiles * chunks;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int64_t chunk = item / tiles;
    const int64_t tile = item % tiles;
    const int64_t n0 = chunk * kChunkRows;
    const int64_t n1 = std::min(a.n, n0 + kChunkRows);
    tile_sum<E>(t, g, a, tile, n0, n1, partial.data() + chunk * r);
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t j = 0; j < r; ++j) {
    A s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * r + j];
    out[j] = s * scale;
  }
}

}  // namespace

void mask_grad_cpu(const MaskGradArgs& a) {
  if (a.r == 0) return;
  switch (a.dtype) {
    case DType::kFloat32: return mask_grad_cpu_impl<F32>(a);
    case DType::kFloat16: return mask_grad_cpu_impl<F16>(a);
    case DType::kBFloat16: return mask_grad_cpu_impl<BF16>(a);
    case DType::kFloat64: return mask_grad_cpu_impl<F64>(a);
  }
  TC_CHECK_ARG(false, "mask_grad_cpu: unknown dtype code ", static_cast<int>(a.dtype));
}

}  // namespace tunecomp
