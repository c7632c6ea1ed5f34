// Tiled GEMM core shared by every masked low-rank kernel:
//
//   C[128 x 128] (+)= sum_k A(m, k) B(k, n)          256 threads (8 warps)
//
// * Operands live in global memory as row-major matrices; each operand is either
//   "K-contiguous" (KC: A stored [M][K], B stored [N][K]) or "MN-contiguous"
//   (A stored [K][M], B stored [K][N]). Tiles are copied to shared memory in the
//   operand's own layout, so no transposes are ever materialised.
// * Loads: 16-byte cp.async chunks, double-buffered (two stages), when the
//   operand is 16-byte aligned (pointer and row pitch) and the chunk is fully in
//   bounds; otherwise guarded element loads with zero fill. Out-of-range rows,
//   columns and k are zeros in shared memory, so edge tiles need no special math.
// * Math policies:
//     WmmaPolicy<T> (T = half, bfloat16): tensor cores through nvcuda::wmma
//       m16n16k16 with fp32 accumulators; the 8 warps form a 4 x 2 grid with a
//       32 x 64 warp tile (2 x 4 fragments). Fragments lying wholly outside the
//       valid rows/columns are skipped (warp-uniform branches).
//     SimtPolicy (T = float): fp32 FMA, an 8 x 8 micro-tile per thread at rows
//       ty + 16 i, columns tx + 16 j (spread to avoid shared-memory bank conflicts).
//   Fragment element order is never assumed: accumulators leave through
//   `stage()` into a [128][132] fp32 shared tile, and every epilogue works there.
#pragma once

#include <type_traits>

#include "cuda/mlr_device.cuh"

namespace tunecomp {
namespace mlr {

constexpr int kThreads = 256;
constexpr int kBM = 128;  // tile rows (M)
constexpr int kBN = 128;  // tile columns (N)
constexpr int kLdC = kBN + 4;  // fp32 staging tile pitch (floats): 528 bytes, 16-byte multiple
constexpr int kStageCBytes = kBM * kLdC * 4;  // 67584

template <typename T>
struct TileCfg {
  static constexpr int kEpc = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kBK = 64 / static_cast<int>(sizeof(T));   // 32 (half) / 16 (float)
  static constexpr int kPad = kEpc;                               // keeps 16 / 32-byte alignment
  static constexpr int kLdKC = kBK + kPad;    // pitch of a KC tile [128][kBK]
  static constexpr int kLdMN = kBM + kPad;    // pitch of an MN tile [kBK][128]
  static constexpr int kOperandBytes =
      (kBM * kLdKC > kBK * kLdMN ? kBM * kLdKC : kBK * kLdMN) * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = 2 * kOperandBytes;  // A and B
  static constexpr int kPipeBytes = 2 * kStageBytes;     // two stages
  static constexpr int kLdFull = kBN + kPad;  // pitch of a resident [128][128] tile (fused path)
  static constexpr int kFullBytes = kBM * kLdFull * static_cast<int>(sizeof(T));
};

// A global operand: row-major [rows][cols] with row pitch `ld` (elements).
// `vec`: base pointer and pitch are 16-byte aligned, so 16-byte chunks may use cp.async.
template <typename T>
struct Operand {
  const T* p = nullptr;
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  bool vec = false;
};

// Copy the [TR x TC] tile at (r0, c0) of a row-major global matrix into shared
// memory with pitch `lds`, reading only rows < row_lim and columns < col_lim
// (zeros elsewhere). Only the first `c_extent` columns of the tile are written
// (a multiple of the chunk width). Caller commits the cp.async group.
template <typename T, int TR, int TC>
TC_DEV void load_tile(T* s, int lds, const T* g, int64_t ld, int64_t row_lim, int64_t col_lim,
                      int64_t r0, int64_t c0, bool vec, int c_extent = TC) {
  constexpr int kEpc = TileCfg<T>::kEpc;
  constexpr int kChunksPerRow = TC / kEpc;
  const T zero = from_f<T>(0.f);
  for (int c = thread_rank(); c < TR * kChunksPerRow; c += kThreads) {
    const int rr = c / kChunksPerRow;
    const int cc = (c % kChunksPerRow) * kEpc;
    if (cc >= c_extent) continue;
    const int64_t gr = r0 + rr;
    const int64_t gc = c0 + cc;
    T* dst = s + rr * lds + cc;
    if (vec && gr < row_lim && gc + kEpc <= col_lim) {
      cp_async16(dst, g + gr * ld + gc);
    } else {
#pragma unroll
      for (int e = 0; e < kEpc; ++e) {
        dst[e] = (gr < row_lim && gc + e < col_lim) ? g[gr * ld + gc + e] : zero;
      }
    }
  }
}

// Load the k-slice [k0, k0 + kBK) of an operand tile (m/n origin mn0), k < k_end.
template <typename T, bool KC>
TC_DEV void load_operand(T* s, const Operand<T>& op, int64_t mn0, int64_t k0, int64_t k_end) {
  using C = TileCfg<T>;
  if constexpr (KC) {
    // global [MN][K]: rows = mn, cols = k
    load_tile<T, kBM, C::kBK>(s, C::kLdKC, op.p, op.ld, op.rows, k_end, mn0, k0, op.vec);
  } else {
    // global [K][MN]: rows = k, cols = mn
    load_tile<T, C::kBK, kBM>(s, C::kLdMN, op.p, op.ld, k_end, op.cols, k0, mn0, op.vec);
  }
}

// ---------------------------------------------------------------------------------
// Tensor-core policy (half / bfloat16)
// ---------------------------------------------------------------------------------
template <typename T>
struct WmmaPolicy {
  static constexpr int kFM = 2;  // 16-row fragments per warp
  static constexpr int kFN = 4;  // 16-column fragments per warp
  static constexpr int kKStep = 16;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct Acc {
    AccFrag f[kFM][kFN];
  };

  static TC_DEV int warp_row0() { return (thread_rank() / 32) / 2 * (16 * kFM); }
  static TC_DEV int warp_col0() { return (thread_rank() / 32) % 2 * (16 * kFN); }

  static TC_DEV void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
  }

  // Uniform scaling is layout-independent, so touching x[] directly is safe.
  static TC_DEV void scale(Acc& acc, float a) {
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j)
#pragma unroll
        for (int e = 0; e < acc.f[i][j].num_elements; ++e) acc.f[i][j].x[e] *= a;
  }

  // acc += A[0:128, 0:klen] B[0:klen, 0:128] from shared memory; klen % 16 == 0.
  template <bool AKC, bool BKC>
  static TC_DEV void compute(Acc& acc, const T* sA, int lda, const T* sB, int ldb, int klen,
                             int rows_valid, int cols_valid) {
    namespace wmma = nvcuda::wmma;
    using LA = typename std::conditional<AKC, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<BKC, wmma::col_major, wmma::row_major>::type;
    const int m_base = warp_row0();
    const int n_base = warp_col0();
    for (int kk = 0; kk < klen; kk += kKStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa[kFM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb[kFN];
#pragma unroll
      for (int i = 0; i < kFM; ++i) {
        const int m0 = m_base + 16 * i;
        if (m0 < rows_valid) {
          wmma::load_matrix_sync(fa[i], AKC ? sA + m0 * lda + kk : sA + kk * lda + m0, lda);
        }
      }
#pragma unroll
      for (int j = 0; j < kFN; ++j) {
        const int n0 = n_base + 16 * j;
        if (n0 < cols_valid) {
          wmma::load_matrix_sync(fb[j], BKC ? sB + n0 * ldb + kk : sB + kk * ldb + n0, ldb);
        }
      }
#pragma unroll
      for (int i = 0; i < kFM; ++i)
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
          if (m_base + 16 * i < rows_valid && n_base + 16 * j < cols_valid) {
            wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
          }
        }
    }
  }

  // Write the accumulators into the fp32 tile C[128][ldc] (fragments outside the
  // valid range are skipped; their C entries are never read).
  static TC_DEV void stage(const Acc& acc, float* C, int ldc, int rows_valid, int cols_valid) {
    const int m_base = warp_row0();
    const int n_base = warp_col0();
#pragma unroll
    for (int i = 0; i < kFM; ++i)
#pragma unroll
      for (int j = 0; j < kFN; ++j) {
        const int m0 = m_base + 16 * i;
        const int n0 = n_base + 16 * j;
        if (m0 < rows_valid && n0 < cols_valid) {
          nvcuda::wmma::store_matrix_sync(C + m0 * ldc + n0, acc.f[i][j], ldc,
                                          nvcuda::wmma::mem_row_major);
        }
      }
  }
};

// ---------------------------------------------------------------------------------
// fp32 policy: SIMT FMA (fp32 inputs must stay exact to ~1e-5; TF32 would not)
// ---------------------------------------------------------------------------------
struct SimtPolicy {
  static constexpr int kKStep = 1;
  struct Acc {
    float v[8][8];
  };
  static TC_DEV int ty() { return thread_rank() / 16; }
  static TC_DEV int tx() { return thread_rank() % 16; }

  static TC_DEV void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc.v[i][j] = 0.f;
  }
  static TC_DEV void scale(Acc& acc, float a) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc.v[i][j] *= a;
  }

  template <bool AKC, bool BKC>
  static TC_DEV void compute(Acc& acc, const float* sA, int lda, const float* sB, int ldb,
                             int klen, int /*rows_valid*/, int /*cols_valid*/) {
    const int y = ty();
    const int x = tx();
    for (int k = 0; k < klen; ++k) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int m = y + 16 * i;
        a[i] = AKC ? sA[m * lda + k] : sA[k * lda + m];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = x + 16 * j;
        b[j] = BKC ? sB[n * ldb + k] : sB[k * ldb + n];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  static TC_DEV void stage(const Acc& acc, float* C, int ldc, int /*rows_valid*/,
                           int /*cols_valid*/) {
    const int y = ty();
    const int x = tx();
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) C[(y + 16 * i) * ldc + x + 16 * j] = acc.v[i][j];
  }
};

template <typename T>
struct PolicyOf {
  using type = WmmaPolicy<T>;
};
template <>
struct PolicyOf<float> {
  using type = SimtPolicy;
};

// ---------------------------------------------------------------------------------
// Main loop: acc += A[m0:m0+128, k_begin:k_end] B[k_begin:k_end, n0:n0+128]
// using the two pipeline stages at `pipe` (TileCfg<T>::kPipeBytes of shared memory).
// Every thread of the block must call it (it synchronises the block). On return the
// pipeline buffers are free for reuse.
// ---------------------------------------------------------------------------------
template <typename T, bool AKC, bool BKC>
TC_DEV void mainloop(typename PolicyOf<T>::type::Acc& acc, const Operand<T>& A,
                     const Operand<T>& B, int64_t m0, int64_t n0, int64_t k_begin,
                     int64_t k_end, char* pipe, int rows_valid, int cols_valid) {
  using C = TileCfg<T>;
  using P = typename PolicyOf<T>::type;
  const int64_t k_tiles = k_end > k_begin ? (k_end - k_begin + C::kBK - 1) / C::kBK : 0;
  if (k_tiles == 0) return;
  auto sA = [pipe](int stage) {
    return reinterpret_cast<T*>(pipe + stage * C::kStageBytes);
  };
  auto sB = [pipe](int stage) {
    return reinterpret_cast<T*>(pipe + stage * C::kStageBytes + C::kOperandBytes);
  };
  load_operand<T, AKC>(sA(0), A, m0, k_begin, k_end);
  load_operand<T, BKC>(sB(0), B, n0, k_begin, k_end);
  cp_async_commit();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int cur = static_cast<int>(kt & 1);
    if (kt + 1 < k_tiles) {
      const int64_t k_next = k_begin + (kt + 1) * C::kBK;
      load_operand<T, AKC>(sA(cur ^ 1), A, m0, k_next, k_end);
      load_operand<T, BKC>(sB(cur ^ 1), B, n0, k_next, k_end);
    }
    cp_async_commit();      // possibly empty: keeps the group count uniform
    cp_async_wait<1>();     // the group holding stage `cur` has landed
    __syncthreads();        // ... for every thread's copies and plain stores
    P::template compute<AKC, BKC>(acc, sA(cur), AKC ? C::kLdKC : C::kLdMN, sB(cur),
                                  BKC ? C::kLdKC : C::kLdMN, C::kBK, rows_valid, cols_valid);
    __syncthreads();        // stage `cur` may be overwritten by the next iteration
  }
}

}  // namespace mlr
}  // namespace tunecomp
