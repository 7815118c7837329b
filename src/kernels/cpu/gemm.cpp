// GEMM and grouped GEMM on CPU. Large products go to OpenBLAS (cblas_sgemm/dgemm), the
// machine's own best GEMM. Groups of at most kSkinnyRows rows (decode: one to a few tokens per
// expert) are memory-bound, and BLAS would pack the whole weight first, reading it twice; the
// skinny kernel streams each weight row once instead. bf16 weights are widened on load.
// Reference: ref::gemm / ref::grouped_gemm.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "switchyard/kernels/cpu.h"
#include "kernels/instantiate.h"

namespace sy::cpu {

namespace {

constexpr int64_t kSkinnyRows = 16;
constexpr int64_t kSkinnyMaxBlock = 1024;

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16 v) { return to_float(v); }

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              int(M), int(N), int(K), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              int(M), int(N), int(K), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

// ys = xs w for few rows. xs: [M, K], w: [K, N] -> ys: [M, N], M <= kSkinnyRows.
// Columns are split into blocks, one thread per block, each output element summed over k in
// the same order whatever the blocking: the result does not depend on the thread count.
template <class T, class W>
void skinny_gemm(ConstMatrixView<T> xs, ConstMatrixView<W> w, MatrixView<T> ys) {
  const int64_t M = xs.rows, K = w.rows, N = w.cols;
  SY_CHECK(M <= kSkinnyRows, "skinny gemm with {} rows", M);
  const int64_t per_thread = (N + 2 * omp_get_max_threads() - 1) / (2 * omp_get_max_threads());
  const int64_t block = std::clamp<int64_t>((per_thread + 15) / 16 * 16, 16, kSkinnyMaxBlock);
  const int64_t n_blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) if (n_blocks > 1 && M * K * N > (1 << 16))
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t n0 = b * block, nb = std::min(block, N - n0);
    alignas(64) T acc[kSkinnyRows][kSkinnyMaxBlock];
    for (int64_t m = 0; m < M; ++m) std::fill_n(acc[m], nb, T(0));
    int64_t k = 0;
    // Four weight rows at a time: one pass over each accumulator row per four loads.
    for (; k + 4 <= K; k += 4) {
      const W* w0 = w.row(k) + n0;
      const W* w1 = w.row(k + 1) + n0;
      const W* w2 = w.row(k + 2) + n0;
      const W* w3 = w.row(k + 3) + n0;
      for (int64_t m = 0; m < M; ++m) {
        const T x0 = xs(m, k), x1 = xs(m, k + 1), x2 = xs(m, k + 2), x3 = xs(m, k + 3);
        T* a = acc[m];
#pragma omp simd
        for (int64_t n = 0; n < nb; ++n)
          a[n] += x0 * widen(w0[n]) + x1 * widen(w1[n]) + x2 * widen(w2[n]) + x3 * widen(w3[n]);
      }
    }
    for (; k < K; ++k) {
      const W* w0 = w.row(k) + n0;
      for (int64_t m = 0; m < M; ++m) {
        const T x0 = xs(m, k);
        T* a = acc[m];
#pragma omp simd
        for (int64_t n = 0; n < nb; ++n) a[n] += x0 * widen(w0[n]);
      }
    }
    for (int64_t m = 0; m < M; ++m) std::copy_n(acc[m], nb, ys.row(m) + n0);
  }
}

template <class T>
void check_grouped(int64_t n_rows, StackedView<const T> w, std::span<const int32_t> offsets) {
  SY_CHECK(int64_t(offsets.size()) == w.n + 1, "offsets size {} for {} groups", offsets.size(),
           w.n);
  SY_CHECK(offsets.front() == 0 && offsets.back() == n_rows, "offsets span [{}, {}] for {} rows",
           offsets.front(), offsets.back(), n_rows);
}

}  // namespace

template <class T>
void gemm(bool trans_a, bool trans_b, T alpha, ConstMatrixView<T> a, ConstMatrixView<T> b, T beta,
          MatrixView<T> c) {
  const int64_t M = c.rows, N = c.cols, K = trans_a ? a.rows : a.cols;
  SY_CHECK((trans_a ? a.cols : a.rows) == M && (trans_b ? b.cols : b.rows) == K &&
               (trans_b ? b.rows : b.cols) == N,
           "gemm shapes a [{}, {}] b [{}, {}] c [{}, {}]", a.rows, a.cols, b.rows, b.cols, M, N);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < c.size(); ++i) c.data[i] = beta == T(0) ? T(0) : beta * c.data[i];
    return;
  }
  blas_gemm(trans_a, trans_b, M, N, K, alpha, a.data, a.cols, b.data, b.cols, beta, c.data,
            c.cols);
}

template <class T>
void grouped_gemm(ConstMatrixView<T> xs, StackedView<const T> w, std::span<const int32_t> offsets,
                  MatrixView<T> ys) {
  check_grouped(xs.rows, w, offsets);
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    if (r1 - r0 <= kSkinnyRows)
      skinny_gemm<T, T>(xs.slice_rows(r0, r1), w[g], ys.slice_rows(r0, r1));
    else
      gemm<T>(false, false, T(1), xs.slice_rows(r0, r1), w[g], T(0), ys.slice_rows(r0, r1));
  }
}

void grouped_gemm(ConstMatrixView<float> xs, StackedView<const bf16> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  check_grouped(xs.rows, w, offsets);
  std::vector<float> wide;  // one expert's weight in f32, only for groups BLAS handles
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
  check_grouped(dys.rows, w, offsets);
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 > r0)
      gemm<T>(false, true, T(1), dys.slice_rows(r0, r1), w[g], beta, dxs.slice_rows(r0, r1));
  }
}

template <class T>
void grouped_gemm_at(ConstMatrixView<T> xs, ConstMatrixView<T> dys,
                     std::span<const int32_t> offsets, StackedView<T> dw) {
  check_grouped(xs.rows, StackedView<const T>(dw), offsets);
  for (int64_t g = 0; g < dw.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 > r0)
      gemm<T>(true, false, T(1), xs.slice_rows(r0, r1), dys.slice_rows(r0, r1), T(1), dw[g]);
  }
}

SY_INSTANTIATE_GEMM_KERNELS(float)
SY_INSTANTIATE_GEMM_KERNELS(double)

}  // namespace sy::cpu
