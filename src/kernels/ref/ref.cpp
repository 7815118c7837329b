// Reference kernels: the definitions the fast CPU kernels must match. Plain loops, double
// accumulation, one thread. Dense comments on purpose: this file is the spec.
#include "switchyard/kernels/ref.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/instantiate.h"

namespace sy::ref {

namespace {
// Element (i, j) of op(m), op = transpose when trans.
template <class T>
double at(ConstMatrixView<T> m, bool trans, int64_t i, int64_t j) {
  return double(trans ? m(j, i) : m(i, j));
}
template <class T>
double wide(T v) {
  if constexpr (std::is_same_v<T, bf16>)
    return to_float(v);
  else
    return double(v);
}
}  // namespace

template <class T>
void gemm(bool trans_a, bool trans_b, T alpha, ConstMatrixView<T> a, ConstMatrixView<T> b, T beta,
          MatrixView<T> c) {
  const int64_t M = c.rows, N = c.cols, K = trans_a ? a.rows : a.cols;
  SY_CHECK((trans_a ? a.cols : a.rows) == M && (trans_b ? b.cols : b.rows) == K &&
               (trans_b ? b.rows : b.cols) == N,
           "gemm shapes a [{}, {}] b [{}, {}] c [{}, {}]", a.rows, a.cols, b.rows, b.cols, M, N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t p = 0; p < K; ++p) s += at(a, trans_a, i, p) * at(b, trans_b, p, j);
      // beta == 0 overwrites, as BLAS does, so an uninitialised c is fine.
      c(i, j) = T(double(alpha) * s + (beta == T(0) ? 0.0 : double(beta) * double(c(i, j))));
    }
}

// Group g multiplies its rows by its own matrix w[g]; written as the plain triple loop.
template <class T, class W>
static void grouped_gemm_impl(ConstMatrixView<T> xs, StackedView<const W> w,
                              std::span<const int32_t> offsets, MatrixView<T> ys) {
  for (int64_t g = 0; g < w.n; ++g)
    for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i)
      for (int64_t j = 0; j < w.cols; ++j) {
        double s = 0;
        for (int64_t p = 0; p < w.rows; ++p) s += double(xs(i, p)) * wide(w[g](p, j));
        ys(i, j) = T(s);
      }
}
template <class T>
void grouped_gemm(ConstMatrixView<T> xs, StackedView<const T> w, std::span<const int32_t> offsets,
                  MatrixView<T> ys) {
  grouped_gemm_impl(xs, w, offsets, ys);
}
void grouped_gemm(ConstMatrixView<float> xs, StackedView<const bf16> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  grouped_gemm_impl(xs, w, offsets, ys);
}

template <class T>
void grouped_gemm_bt(ConstMatrixView<T> dys, StackedView<const T> w,
                     std::span<const int32_t> offsets, T beta, MatrixView<T> dxs) {
  for (int64_t g = 0; g < w.n; ++g) {
    auto rows = [&](auto m) { return m.slice_rows(offsets[g], offsets[g + 1]); };
    gemm<T>(false, true, T(1), rows(dys), w[g], beta, rows(dxs));
  }
}

template <class T>
void grouped_gemm_at(ConstMatrixView<T> xs, ConstMatrixView<T> dys,
                     std::span<const int32_t> offsets, StackedView<T> dw) {
  for (int64_t g = 0; g < dw.n; ++g) {
    auto rows = [&](auto m) { return m.slice_rows(offsets[g], offsets[g + 1]); };
    gemm<T>(true, false, T(1), rows(xs), rows(dys), T(1), dw[g]);
  }
}

// probs[t] = exp(logits[t] - lse[t]), lse[t] = log sum_e exp(logits[t, e]).
template <class T>
void softmax_rows(ConstMatrixView<T> logits, MatrixView<T> probs, std::span<T> lse) {
  for (int64_t t = 0; t < logits.rows; ++t) {
    double mx = -INFINITY;
    for (int64_t e = 0; e < logits.cols; ++e) mx = std::max(mx, double(logits(t, e)));
    double s = 0;
    for (int64_t e = 0; e < logits.cols; ++e) s += std::exp(double(logits(t, e)) - mx);
    double l = mx + std::log(s);
    lse[t] = T(l);
    for (int64_t e = 0; e < logits.cols; ++e) probs(t, e) = T(std::exp(double(logits(t, e)) - l));
  }
}

// Row i sees columns 0..offset+i: softmax over those, zero after.
template <class T>
void softmax_causal_rows(ConstMatrixView<T> scores, int64_t offset, MatrixView<T> probs) {
  for (int64_t i = 0; i < scores.rows; ++i) {
    const int64_t seen = offset + i + 1;
    double mx = -INFINITY;
    for (int64_t j = 0; j < seen; ++j) mx = std::max(mx, double(scores(i, j)));
    double s = 0;
    for (int64_t j = 0; j < seen; ++j) s += std::exp(double(scores(i, j)) - mx);
    for (int64_t j = 0; j < scores.cols; ++j)
      probs(i, j) = j < seen ? T(std::exp(double(scores(i, j)) - mx) / s) : T(0);
  }
}

// loss_t = logsumexp(l_t) - l_t[y_t]; dl_t = scale * (softmax(l_t) - onehot(y_t)); y_t < 0 skipped.
template <class T>
double cross_entropy_rows(ConstMatrixView<T> logits, std::span<const int32_t> target, T scale,
                          MatrixView<T> dlogits) {
  double total = 0;
  for (int64_t t = 0; t < logits.rows; ++t) {
    const int32_t y = target[t];
    if (y < 0) {
      for (int64_t v = 0; v < dlogits.cols && dlogits.rows > 0; ++v) dlogits(t, v) = T(0);
      continue;
    }
    double mx = -INFINITY;
    for (int64_t v = 0; v < logits.cols; ++v) mx = std::max(mx, double(logits(t, v)));
    double s = 0;
    for (int64_t v = 0; v < logits.cols; ++v) s += std::exp(double(logits(t, v)) - mx);
    const double lse = mx + std::log(s), ly = double(logits(t, y));
    total += lse - ly;
    if (dlogits.rows == 0) continue;
    for (int64_t v = 0; v < logits.cols; ++v)
      dlogits(t, v) = T(double(scale) * (std::exp(double(logits(t, v)) - lse) - (v == y ? 1 : 0)));
  }
  return total;
}

// dlogits = probs * (dprobs - <dprobs, probs>), the Jacobian of softmax applied to dprobs.
template <class T>
void softmax_rows_backward(ConstMatrixView<T> probs, ConstMatrixView<T> dprobs,
                           MatrixView<T> dlogits) {
  for (int64_t t = 0; t < probs.rows; ++t) {
    double dot = 0;
    for (int64_t e = 0; e < probs.cols; ++e) dot += double(dprobs(t, e)) * double(probs(t, e));
    for (int64_t e = 0; e < probs.cols; ++e)
      dlogits(t, e) = T(double(probs(t, e)) * (double(dprobs(t, e)) - dot));
  }
}

// Sort each row's indices by (score descending, index ascending) and keep the first k.
template <class T>
void topk_rows(ConstMatrixView<T> scores, MatrixView<int32_t> idx, MatrixView<T> val) {
  std::vector<int32_t> order(scores.cols);
  for (int64_t t = 0; t < scores.rows; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return scores(t, a) > scores(t, b); });
    for (int64_t j = 0; j < idx.cols; ++j) {
      idx(t, j) = order[j];
      val(t, j) = scores(t, order[j]);
    }
  }
}

template <class T>
void silu(std::span<const T> x, std::span<T> y) {
  for (size_t i = 0; i < x.size(); ++i) y[i] = T(double(x[i]) / (1.0 + std::exp(-double(x[i]))));
}

template <class T>
void gelu(std::span<const T> x, std::span<T> y) {
  for (size_t i = 0; i < x.size(); ++i)
    y[i] = T(0.5 * double(x[i]) * (1.0 + std::erf(double(x[i]) / std::sqrt(2.0))));
}

template <class T>
void swiglu(ConstMatrixView<T> h1, ConstMatrixView<T> h3, MatrixView<T> a) {
  for (int64_t i = 0; i < h1.size(); ++i) {
    double g = double(h1.data[i]);
    a.data[i] = T(g / (1.0 + std::exp(-g)) * double(h3.data[i]));
  }
}

// d silu(g)/dg = s (1 + g (1 - s)) with s = sigmoid(g).
template <class T>
void swiglu_backward(ConstMatrixView<T> h1, ConstMatrixView<T> h3, ConstMatrixView<T> da,
                     MatrixView<T> dh1, MatrixView<T> dh3) {
  for (int64_t i = 0; i < h1.size(); ++i) {
    double g = double(h1.data[i]), s = 1.0 / (1.0 + std::exp(-g));
    dh1.data[i] = T(double(da.data[i]) * double(h3.data[i]) * s * (1.0 + g * (1.0 - s)));
    dh3.data[i] = T(double(da.data[i]) * g * s);
  }
}

template <class T>
void gather_rows(ConstMatrixView<T> x, std::span<const int32_t> token, MatrixView<T> xs) {
  for (size_t i = 0; i < token.size(); ++i)
    for (int64_t c = 0; c < x.cols; ++c) xs(int64_t(i), c) = x(token[i], c);
}

template <class T>
void scatter_add_rows(ConstMatrixView<T> dys, std::span<const int32_t> token, std::span<const T> w,
                      MatrixView<T> dx) {
  for (size_t i = 0; i < token.size(); ++i) {
    double wi = w.empty() ? 1.0 : double(w[i]);
    for (int64_t c = 0; c < dx.cols; ++c)
      dx(token[i], c) = T(double(dx(token[i], c)) + wi * double(dys(int64_t(i), c)));
  }
}

template <class T>
void rmsnorm(ConstMatrixView<T> x, std::span<const T> gain, T eps, MatrixView<T> y,
             std::span<T> rstd) {
  for (int64_t t = 0; t < x.rows; ++t) {
    double ss = 0;
    for (int64_t c = 0; c < x.cols; ++c) ss += double(x(t, c)) * double(x(t, c));
    double r = 1.0 / std::sqrt(ss / double(x.cols) + double(eps));
    rstd[t] = T(r);
    for (int64_t c = 0; c < x.cols; ++c) y(t, c) = T(double(x(t, c)) * r * double(gain[c]));
  }
}

// With xhat = x r: dx = r (g dy - xhat mean(g dy xhat)); dgain += sum_t dy xhat.
template <class T>
void rmsnorm_backward(ConstMatrixView<T> x, std::span<const T> gain, std::span<const T> rstd,
                      ConstMatrixView<T> dy, MatrixView<T> dx, std::span<T> dgain) {
  for (int64_t t = 0; t < x.rows; ++t) {
    double r = double(rstd[t]), dot = 0;
    for (int64_t c = 0; c < x.cols; ++c)
      dot += double(dy(t, c)) * double(gain[c]) * double(x(t, c)) * r;
    dot /= double(x.cols);
    for (int64_t c = 0; c < x.cols; ++c) {
      double xhat = double(x(t, c)) * r;
      dx(t, c) = T(r * (double(dy(t, c)) * double(gain[c]) - xhat * dot));
      dgain[c] = T(double(dgain[c]) + double(dy(t, c)) * xhat);
    }
  }
}

SY_INSTANTIATE_GEMM_KERNELS(float)
SY_INSTANTIATE_GEMM_KERNELS(double)
SY_INSTANTIATE_ROW_KERNELS(float)
SY_INSTANTIATE_ROW_KERNELS(double)

}  // namespace sy::ref
