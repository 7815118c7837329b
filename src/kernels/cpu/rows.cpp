// Row-wise and elementwise CPU kernels: softmax, top-k, activations, SwiGLU, gather/scatter,
// RMSNorm. Parallel over rows (or, for scatter-add, over column blocks), so each output element
// is written by one thread in a fixed order: the same numbers at any thread count.
// Reference: the same-named functions in kernels/ref.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/vec_math.h"
#include "kernels/instantiate.h"
#include "switchyard/kernels/cpu.h"

namespace sy::cpu {

using detail::exp_fast;
using detail::sigmoid;

namespace {
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 14;
}  // namespace

template <class T>
void softmax_rows(ConstMatrixView<T> logits, MatrixView<T> probs, std::span<T> lse) {
  const int64_t E = logits.cols;
#pragma omp parallel for schedule(static) if (logits.size() > kParallelMin)
  for (int64_t t = 0; t < logits.rows; ++t) {
    const T* l = logits.row(t);
    T* p = probs.row(t);
    const T mx = *std::max_element(l, l + E);
    T s = 0;
    for (int64_t e = 0; e < E; ++e) s += (p[e] = exp_fast(l[e] - mx));
    const T inv = T(1) / s;
    for (int64_t e = 0; e < E; ++e) p[e] *= inv;
    lse[t] = mx + std::log(s);
  }
}

template <class T>
void softmax_rows_backward(ConstMatrixView<T> probs, ConstMatrixView<T> dprobs,
                           MatrixView<T> dlogits) {
  const int64_t E = probs.cols;
#pragma omp parallel for schedule(static) if (probs.size() > kParallelMin)
  for (int64_t t = 0; t < probs.rows; ++t) {
    const T *p = probs.row(t), *dp = dprobs.row(t);
    T dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e];
    T* dl = dlogits.row(t);
    for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - dot);
  }
}

template <class T>
void softmax_causal_rows(ConstMatrixView<T> scores, int64_t offset, MatrixView<T> probs) {
  const int64_t m = scores.cols;
  SY_CHECK(offset >= 0 && offset + scores.rows <= m, "causal rows {} at offset {} of {} keys",
           scores.rows, offset, m);
#pragma omp parallel for schedule(static) if (scores.size() > kParallelMin)
  for (int64_t i = 0; i < scores.rows; ++i) {
    const int64_t seen = offset + i + 1;
    const T* s = scores.row(i);
    T* p = probs.row(i);
    const T mx = *std::max_element(s, s + seen);
    T sum = 0;
    for (int64_t j = 0; j < seen; ++j) sum += (p[j] = exp_fast(s[j] - mx));
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < seen; ++j) p[j] *= inv;
    std::fill(p + seen, p + m, T(0));
  }
}

template <class T>
double cross_entropy_rows(ConstMatrixView<T> logits, std::span<const int32_t> target, T scale,
                          MatrixView<T> dlogits) {
  const int64_t V = logits.cols;
  SY_CHECK(int64_t(target.size()) == logits.rows, "{} targets for {} rows", target.size(),
           logits.rows);
  const bool grad = dlogits.rows > 0;
  std::vector<double> row_loss(size_t(logits.rows), 0.0);
#pragma omp parallel for schedule(static) if (logits.size() > kParallelMin)
  for (int64_t t = 0; t < logits.rows; ++t) {
    const T* l = logits.row(t);
    const int32_t y = target[t];
    T* dl = grad ? dlogits.row(t) : nullptr;
    if (y < 0) {
      if (grad) std::fill(dl, dl + V, T(0));
      continue;
    }
    SY_CHECK(y < V, "target {} of row {} outside [0, {})", y, t, V);
    const T mx = *std::max_element(l, l + V);
    const T ly = l[y];
    T sum = 0;
    if (grad) {
      for (int64_t v = 0; v < V; ++v) sum += (dl[v] = exp_fast(l[v] - mx));
      const T s = scale / sum;
      for (int64_t v = 0; v < V; ++v) dl[v] *= s;
      dl[y] -= scale;
    } else {
      for (int64_t v = 0; v < V; ++v) sum += exp_fast(l[v] - mx);
    }
    row_loss[t] = double(mx) + std::log(double(sum)) - double(ly);
  }
  double total = 0;
  for (double v : row_loss) total += v;
  return total;
}

// Insertion into a sorted list of k: O(E k) per row, which beats a heap for the k <= 8 and
// E <= 256 of MoE routers and keeps the tie rule (lower index first) obvious.
template <class T>
void topk_rows(ConstMatrixView<T> scores, MatrixView<int32_t> idx, MatrixView<T> val) {
  const int64_t E = scores.cols, k = idx.cols;
  SY_CHECK(k <= E && val.cols == k, "top-{} of {} scores", k, E);
#pragma omp parallel for schedule(static) if (scores.size() > kParallelMin)
  for (int64_t t = 0; t < scores.rows; ++t) {
    const T* s = scores.row(t);
    int32_t* id = idx.row(t);
    T* v = val.row(t);
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (n == k && !(s[e] > v[k - 1])) continue;
      int64_t j = (n < k) ? n++ : k - 1;
      // Strictly greater moves an entry down, so equal scores keep index order.
      while (j > 0 && s[e] > v[j - 1]) {
        v[j] = v[j - 1];
        id[j] = id[j - 1];
        --j;
      }
      v[j] = s[e];
      id[j] = int32_t(e);
    }
  }
}

template <class T>
void silu(std::span<const T> x, std::span<T> y) {
  const int64_t n = int64_t(x.size());
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * sigmoid(x[i]);
}

template <class T>
void gelu(std::span<const T> x, std::span<T> y) {
  const int64_t n = int64_t(x.size());
  const T inv_sqrt2 = T(0.70710678118654752440);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = T(0.5) * x[i] * (T(1) + std::erf(x[i] * inv_sqrt2));
}

template <class T>
void swiglu(ConstMatrixView<T> h1, ConstMatrixView<T> h3, MatrixView<T> a) {
  const int64_t n = h1.size();
  const T *g = h1.data, *u = h3.data;
  T* out = a.data;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
}

template <class T>
void swiglu_backward(ConstMatrixView<T> h1, ConstMatrixView<T> h3, ConstMatrixView<T> da,
                     MatrixView<T> dh1, MatrixView<T> dh3) {
  const int64_t n = h1.size();
  const T *g = h1.data, *u = h3.data, *d = da.data;
  T *d1 = dh1.data, *d3 = dh3.data;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(g[i]);
    d1[i] = d[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    d3[i] = d[i] * g[i] * s;
  }
}

template <class T>
void gather_rows(ConstMatrixView<T> x, std::span<const int32_t> token, MatrixView<T> xs) {
  const int64_t n = int64_t(token.size()), d = x.cols;
#pragma omp parallel for schedule(static) if (n * d > kParallelMin)
  for (int64_t i = 0; i < n; ++i) std::memcpy(xs.row(i), x.row(token[i]), size_t(d) * sizeof(T));
}

// Rows may repeat in `token`, so rows cannot be split between threads without races or
// atomics; columns can: each thread owns a column block and walks all rows in order.
template <class T>
void scatter_add_rows(ConstMatrixView<T> dys, std::span<const int32_t> token, std::span<const T> w,
                      MatrixView<T> dx) {
  const int64_t n = int64_t(token.size()), d = dx.cols;
#pragma omp parallel if (n * d > kParallelMin)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t block = (d + nt * 16 - 1) / (nt * 16) * 16;
    const int64_t c0 = std::min(d, tid * block), c1 = std::min(d, c0 + block);
    for (int64_t i = 0; i < n; ++i) {
      const T wi = w.empty() ? T(1) : w[i];
      const T* src = dys.row(i);
      T* dst = dx.row(token[i]);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += wi * src[c];
    }
  }
}

template <class T>
void rmsnorm(ConstMatrixView<T> x, std::span<const T> gain, T eps, MatrixView<T> y,
             std::span<T> rstd) {
  const int64_t d = x.cols;
#pragma omp parallel for schedule(static) if (x.size() > kParallelMin)
  for (int64_t t = 0; t < x.rows; ++t) {
    const T* xr = x.row(t);
    T ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += xr[c] * xr[c];
    const T r = T(1) / std::sqrt(ss / T(d) + eps);
    rstd[t] = r;
    T* yr = y.row(t);
    for (int64_t c = 0; c < d; ++c) yr[c] = xr[c] * r * gain[c];
  }
}

// dgain is a sum over rows; each thread owns a column block of it (as in scatter_add_rows).
template <class T>
void rmsnorm_backward(ConstMatrixView<T> x, std::span<const T> gain, std::span<const T> rstd,
                      ConstMatrixView<T> dy, MatrixView<T> dx, std::span<T> dgain) {
  const int64_t d = x.cols;
#pragma omp parallel for schedule(static) if (x.size() > kParallelMin)
  for (int64_t t = 0; t < x.rows; ++t) {
    const T *xr = x.row(t), *dyr = dy.row(t), r = rstd[t];
    T dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += dyr[c] * gain[c] * xr[c];
    dot *= r / T(d);
    T* dxr = dx.row(t);
    for (int64_t c = 0; c < d; ++c) dxr[c] = r * (dyr[c] * gain[c] - xr[c] * r * dot);
  }
#pragma omp parallel if (x.size() > kParallelMin)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t block = (d + nt - 1) / nt;
    const int64_t c0 = std::min(d, tid * block), c1 = std::min(d, c0 + block);
    for (int64_t t = 0; t < x.rows; ++t) {
      const T *xr = x.row(t), *dyr = dy.row(t), r = rstd[t];
      for (int64_t c = c0; c < c1; ++c) dgain[c] += dyr[c] * xr[c] * r;
    }
  }
}

SY_INSTANTIATE_ROW_KERNELS(float)
SY_INSTANTIATE_ROW_KERNELS(double)

}  // namespace sy::cpu
