// GEMM and grouped GEMM on CPU. Large products go to OpenBLAS (cblas_sgemm/dgemm), the
// machine's own best GEMM, but not as one multi-threaded call: OpenBLAS splits work by thread
// count, and its results then differ in the last bits between 1 and 2 threads. Instead the
// output is cut into fixed kTile x kTile tiles and each tile is one single-threaded BLAS call
// (OpenBLAS runs single-threaded inside a parallel region), so the numbers never depend on
// the thread count; packing costs under 1% at these tile sizes. Groups of at most kSkinnyRows rows
// (decode: one to a few tokens per expert) are memory-bound, and BLAS would pack the whole weight
// first, reading it twice; the skinny kernel streams each weight row once instead. bf16 weights are
// widened on load. Reference: ref::gemm / ref::grouped_gemm.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels/cpu/gemm_checks.h"
#include "kernels/instantiate.h"
#include "switchyard/kernels/cpu.h"

namespace sy::cpu {

namespace {

using detail::check_gemm;
using detail::check_grouped;
using detail::kSkinnyRows;
constexpr int64_t kSkinnyMaxBlock = 1024;
constexpr int64_t kTileK = 16;  // weight rows per register-blocked tile
constexpr int64_t kTile = 384;  // rows and columns of one single-threaded BLAS tile

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) { return to_float(v); }

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M),
              int(N), int(K), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M),
              int(N), int(K), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

// A SIMD vector of 64 bytes (GCC/Clang vector extension: zmm with AVX-512, else split).
template <class T>
using Vec [[gnu::vector_size(64)]] = T;
template <class T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <class T>
inline Vec<T> load_wide(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// 16 bf16 -> 16 f32: the bf16 bits are the high half of the f32 bits.
inline Vec<float> load_wide(const bf16* p) {
  using U16 [[gnu::vector_size(32)]] = uint16_t;
  using U32 [[gnu::vector_size(64)]] = uint32_t;
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  return std::bit_cast<Vec<float>>(__builtin_convertvector(h, U32) << 16);
}

// One column block of the skinny GEMM for exactly MR rows:
//   acc[m][0:nb] += sum_{k < K} x[m][k] w[k][0:nb]   (nb a multiple of the vector width)
// The MR accumulators of one column vector stay in registers across a tile of kTileK weight
// rows, so each weight vector is loaded once and feeds MR FMAs (with broadcast x operands).
// The next tile's rows are prefetched: each row segment is only a few KiB, too short for the
// hardware prefetcher to ramp up on its own.
template <int MR, class T, class W>
void skinny_block(const T* x, int64_t ldx, int64_t K, const W* w, int64_t ldw, int64_t nb, T* acc,
                  int64_t ld_acc) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const int64_t kt = std::min(kTileK, K - k0);
    const bool ahead = k0 + kTileK + kt <= K;
    for (int64_t n = 0; n < nb; n += L) {
      if (ahead)
        for (int64_t r = 0; r < kt; ++r) __builtin_prefetch(w + (k0 + kTileK + r) * ldw + n);
      Vec<T> a[MR];
      for (int m = 0; m < MR; ++m) std::memcpy(&a[m], acc + m * ld_acc + n, sizeof(Vec<T>));
      for (int64_t kk = 0; kk < kt; ++kk) {
        const Vec<T> v = load_wide(w + (k0 + kk) * ldw + n);
        for (int m = 0; m < MR; ++m) a[m] += x[m * ldx + k0 + kk] * v;
      }
      for (int m = 0; m < MR; ++m) std::memcpy(acc + m * ld_acc + n, &a[m], sizeof(Vec<T>));
    }
  }
}

template <class T, class W, int... MR>
void skinny_block_dispatch(std::integer_sequence<int, MR...>, int64_t M, const T* x, int64_t ldx,
                           int64_t K, const W* w, int64_t ldw, int64_t nb, T* acc, int64_t ld_acc) {
  ((M == MR + 1 ? skinny_block<MR + 1>(x, ldx, K, w, ldw, nb, acc, ld_acc) : void()), ...);
}

// ys = xs w for few rows. xs: [M, K], w: [K, N] -> ys: [M, N], M <= kSkinnyRows.
// Memory-bound: w is read once. Columns are split into blocks, one thread per block; each
// output element is summed over k in the same order whatever the blocking, so the result does
// not depend on the thread count.
template <class T, class W>
void skinny_gemm(ConstMatrixView<T> xs, ConstMatrixView<W> w, MatrixView<T> ys) {
  constexpr int64_t L = kLanes<T>;
  const int64_t M = xs.rows, K = w.rows, N = w.cols;
  SY_CHECK(M >= 1 && M <= kSkinnyRows, "skinny gemm with {} rows", M);
  const int64_t threads = omp_get_max_threads();
  const int64_t per_thread = (N + 2 * threads - 1) / (2 * threads);
  const int64_t block = std::clamp<int64_t>((per_thread + L - 1) / L * L, L, kSkinnyMaxBlock);
  const int64_t n_blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) if (n_blocks > 1 && M * K * N > (1 << 16))
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t n0 = b * block, nb = std::min(block, N - n0), nv = nb / L * L;
    // Rows padded by one vector: a 4 KiB row stride would alias the rows in L1.
    constexpr int64_t ld_acc = kSkinnyMaxBlock + L;
    alignas(64) T acc[kSkinnyRows * ld_acc];
    for (int64_t m = 0; m < M; ++m) std::fill_n(acc + m * ld_acc, nb, T(0));
    skinny_block_dispatch(std::make_integer_sequence<int, kSkinnyRows>(), M, xs.data, xs.cols, K,
                          w.data + n0, w.cols, nv, acc, ld_acc);
    for (int64_t m = 0; m < M; ++m)  // columns past the last full vector
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = nv; n < nb; ++n) acc[m * ld_acc + n] += xs(m, k) * widen(w(k, n0 + n));
    for (int64_t m = 0; m < M; ++m) std::copy_n(acc + m * ld_acc, nb, ys.row(m) + n0);
  }
}

// One tile of c = alpha op(a) op(b) + beta c: rows [i0, i1) and columns [j0, j1) of c.
template <class T>
struct GemmTile {
  bool ta, tb;
  ConstMatrixView<T> a, b;
  MatrixView<T> c;
  int64_t i0, i1, j0, j1;
};

template <class T>
void run_tile(const GemmTile<T>& t, T alpha, T beta) {
  const int64_t K = t.ta ? t.a.rows : t.a.cols;
  const T* a = t.ta ? t.a.data + t.i0 : t.a.data + t.i0 * t.a.cols;
  const T* b = t.tb ? t.b.data + t.j0 * t.b.cols : t.b.data + t.j0;
  blas_gemm(t.ta, t.tb, t.i1 - t.i0, t.j1 - t.j0, K, alpha, a, t.a.cols, b, t.b.cols, beta,
            t.c.data + t.i0 * t.c.cols + t.j0, t.c.cols);
}

// Appends the tiles of one product c = op(a) op(b).
template <class T>
void add_tiles(bool ta, bool tb, ConstMatrixView<T> a, ConstMatrixView<T> b, MatrixView<T> c,
               std::vector<GemmTile<T>>& tiles) {
  for (int64_t i0 = 0; i0 < c.rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < c.cols; j0 += kTile)
      tiles.push_back(
          {ta, tb, a, b, c, i0, std::min(i0 + kTile, c.rows), j0, std::min(j0 + kTile, c.cols)});
}

// Always inside a parallel region, even for one tile: outside one, OpenBLAS would split that
// tile over its own threads and the last bits would depend on the thread count.
template <class T>
void run_tiles(const std::vector<GemmTile<T>>& tiles, T alpha, T beta) {
  const int64_t n = int64_t(tiles.size());
  if (n == 0) return;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) run_tile(tiles[i], alpha, beta);
}

}  // namespace

template <class T>
void gemm(bool trans_a, bool trans_b, T alpha, ConstMatrixView<T> a, ConstMatrixView<T> b, T beta,
          MatrixView<T> c) {
  check_gemm(trans_a, trans_b, a, b, c);
  if (c.rows == 0 || c.cols == 0) return;
  if ((trans_a ? a.rows : a.cols) == 0) {
    for (int64_t i = 0; i < c.size(); ++i) c.data[i] = beta == T(0) ? T(0) : beta * c.data[i];
    return;
  }
  std::vector<GemmTile<T>> tiles;
  add_tiles(trans_a, trans_b, a, b, c, tiles);
  run_tiles(tiles, alpha, beta);
}

const char* blas_core_name() { return openblas_get_corename(); }

void blas_sgemm(ConstMatrixView<float> a, ConstMatrixView<float> b, MatrixView<float> c) {
  check_gemm(false, false, a, b, c);
  blas_gemm(false, false, c.rows, c.cols, a.cols, 1.0f, a.data, a.cols, b.data, b.cols, 0.0f,
            c.data, c.cols);
}

template <class T>
void grouped_gemm(ConstMatrixView<T> xs, StackedView<const T> w, std::span<const int32_t> offsets,
                  MatrixView<T> ys) {
  check_grouped(xs.rows, w.n, offsets);
  std::vector<GemmTile<T>> tiles;
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    if (r1 - r0 <= kSkinnyRows)
      skinny_gemm<T, T>(xs.slice_rows(r0, r1), w[g], ys.slice_rows(r0, r1));
    else
      add_tiles<T>(false, false, xs.slice_rows(r0, r1), w[g], ys.slice_rows(r0, r1), tiles);
  }
  run_tiles(tiles, T(1), T(0));
}

void grouped_gemm(ConstMatrixView<float> xs, StackedView<const bf16> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  check_grouped(xs.rows, w.n, offsets);
  std::vector<float> wide;  // one expert's weight in f32, for the groups BLAS handles
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    if (r1 - r0 <= kSkinnyRows) {
      skinny_gemm<float, bf16>(xs.slice_rows(r0, r1), w[g], ys.slice_rows(r0, r1));
      continue;
    }
    const MatrixView<const bf16> wg = w[g];
    wide.resize(size_t(wg.size()));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < wg.size(); ++i) wide[i] = to_float(wg.data[i]);
    gemm<float>(false, false, 1.0f, xs.slice_rows(r0, r1), {wide.data(), wg.rows, wg.cols}, 0.0f,
                ys.slice_rows(r0, r1));
  }
}

template <class T>
void grouped_gemm_bt(ConstMatrixView<T> dys, StackedView<const T> w,
                     std::span<const int32_t> offsets, T beta, MatrixView<T> dxs) {
  check_grouped(dys.rows, w.n, offsets);
  std::vector<GemmTile<T>> tiles;
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 > r0)
      add_tiles<T>(false, true, dys.slice_rows(r0, r1), w[g], dxs.slice_rows(r0, r1), tiles);
  }
  run_tiles(tiles, T(1), beta);
}

template <class T>
void grouped_gemm_at(ConstMatrixView<T> xs, ConstMatrixView<T> dys,
                     std::span<const int32_t> offsets, StackedView<T> dw) {
  check_grouped(xs.rows, dw.n, offsets);
  std::vector<GemmTile<T>> tiles;
  for (int64_t g = 0; g < dw.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 > r0)
      add_tiles<T>(true, false, xs.slice_rows(r0, r1), dys.slice_rows(r0, r1), dw[g], tiles);
  }
  run_tiles(tiles, T(1), T(1));
}

SY_INSTANTIATE_GEMM_KERNELS(float)
SY_INSTANTIATE_GEMM_KERNELS(double)

}  // namespace sy::cpu
