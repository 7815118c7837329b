// Softmax top-k router and its auxiliary losses; see router.h for the math.
#include "switchyard/moe/router.h"

#include <cmath>
#include <utility>

#include "switchyard/kernels/cpu.h"

namespace sy {

Router::Router(const MoeConfig& cfg) : cfg_(cfg) {}

template <class T>
void Router::forward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                     std::span<const T> bias) const {
  const int64_t n_tok = x.rows, E = cfg_.n_experts, k = cfg_.top_k;
  const DType dt = dtype_of<T>();
  c.logits.resize({n_tok, E}, dt);
  c.probs.resize({n_tok, E}, dt);
  c.lse.resize({n_tok}, dt);
  c.weight.resize({n_tok, k}, dt);
  c.expert.resize(size_t(n_tok * k));
  c.demand.assign(size_t(E), 0);
  c.loss_balance = c.loss_z = 0;
  if (n_tok == 0) return;

  cpu::gemm<T>(false, false, T(1), x, w_gate, T(0), c.logits.matrix<T>());
  cpu::softmax_rows<T>(c.logits.matrix<T>(), c.probs.matrix<T>(), c.lse.span<T>());
  MatrixView<int32_t> expert{c.expert.data(), n_tok, k};
  MatrixView<T> weight = c.weight.matrix<T>();
  if (cfg_.gating == Gating::kSigmoidBias) {
    // Choose by s + bias, weigh by s alone (normalised below).
    c.scores.resize({n_tok, E}, dt);
    MatrixView<T> s = c.scores.matrix<T>();
    ConstMatrixView<T> logits = c.logits.matrix<T>();
    c.choice.resize({n_tok, E}, dt);
    MatrixView<T> b = c.choice.matrix<T>();
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t e = 0; e < E; ++e) {
        s(t, e) = T(1) / (T(1) + std::exp(-logits(t, e)));
        b(t, e) = s(t, e) + (bias.empty() ? T(0) : bias[e]);
      }
    cpu::topk_rows<T>(b, expert, weight);
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t j = 0; j < k; ++j) weight(t, j) = s(t, expert(t, j));
  } else {
    cpu::topk_rows<T>(c.probs.matrix<T>(), expert, weight);
  }
  if (normalises_weights()) {
    for (int64_t t = 0; t < n_tok; ++t) {
      T sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += weight(t, j);
      for (int64_t j = 0; j < k; ++j) weight(t, j) /= sum;
    }
  }
  for (int32_t e : c.expert) ++c.demand[e];

  // Losses are sums over tokens; accumulated in double, in token order, on one thread.
  ConstMatrixView<T> probs = c.probs.matrix<T>();
  if (cfg_.loss_balance_weight > 0) {
    std::vector<double> p_mean(size_t(E), 0.0);
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t e = 0; e < E; ++e) p_mean[e] += double(probs(t, e));
    double s = 0;
    for (int64_t e = 0; e < E; ++e)
      s += double(c.demand[e]) / double(n_tok * k) * p_mean[e] / double(n_tok);
    c.loss_balance = cfg_.loss_balance_weight * double(E) * s;
  }
  if (cfg_.loss_z_weight > 0) {
    double s = 0;
    for (T l : c.lse.span<T>()) s += double(l) * double(l);
    c.loss_z = cfg_.loss_z_weight * s / double(n_tok);
  }
}

template <class T>
void Router::backward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                      ConstMatrixView<T> dweight, MatrixView<T> dw_gate, MatrixView<T> dx) const {
  const int64_t n_tok = x.rows, E = cfg_.n_experts, k = cfg_.top_k;
  if (n_tok == 0) return;
  const DType dt = dtype_of<T>();
  c.dprobs.resize({n_tok, E}, dt);
  c.dlogits.resize({n_tok, E}, dt);
  MatrixView<T> dprobs = c.dprobs.matrix<T>();
  ConstMatrixView<T> probs = c.probs.matrix<T>();
  ConstMatrixView<T> weight = c.weight.matrix<T>();

  // Balance loss: d/dprobs[t, e] = w_b * E * f_e / T, the same for every token.
  std::vector<T> dbal(size_t(E), T(0));
  if (cfg_.loss_balance_weight > 0)
    for (int64_t e = 0; e < E; ++e)
      dbal[e] = T(cfg_.loss_balance_weight * double(E) * double(c.demand[e]) / double(n_tok * k) /
                  double(n_tok));

  // The weights are the chosen scores c (softmax probs, or sigmoids), normalised or not. With
  // weight_j = c_j / S, S = sum of the chosen c: d/dc_j = (dweight_j - <dweight, weight>) / S;
  // unnormalised, d/dc_j = dweight_j. Returns {<dweight, weight>, S}, or {0, 1}.
  const bool normalised = normalises_weights();
  auto chosen_grad_terms = [&](ConstMatrixView<T> scores, int64_t t) -> std::pair<T, T> {
    if (!normalised) return {T(0), T(1)};
    const int32_t* ex = c.expert.data() + t * k;
    T dot = 0, sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      sum += scores(t, ex[j]);
      dot += dweight(t, j) * weight(t, j);
    }
    return {dot, sum};
  };

#pragma omp parallel for schedule(static) if (n_tok * E > (1 << 14))
  for (int64_t t = 0; t < n_tok; ++t) {
    T* dp = dprobs.row(t);
    for (int64_t e = 0; e < E; ++e) dp[e] = dbal[e];
    if (cfg_.gating == Gating::kSigmoidBias) continue;  // its weights come from s, below
    const int32_t* ex = c.expert.data() + t * k;
    const auto [dot, sum] = chosen_grad_terms(probs, t);
    for (int64_t j = 0; j < k; ++j) dp[ex[j]] += (dweight(t, j) - dot) / sum;
  }
  MatrixView<T> dlogits = c.dlogits.matrix<T>();
  cpu::softmax_rows_backward<T>(probs, dprobs, dlogits);
  if (cfg_.loss_z_weight > 0) {
    // d/dlogits[t] of w_z * mean_t lse_t^2 = w_z * 2 lse_t / T * probs[t].
    const T* lse = c.lse.data<T>();
    const T scale = T(2 * cfg_.loss_z_weight / double(n_tok));
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t e = 0; e < E; ++e) dlogits(t, e) += scale * lse[t] * probs(t, e);
  }
  if (cfg_.gating == Gating::kSigmoidBias) {
    // Through the chosen sigmoids: ds/dlogit = s (1 - s).
    ConstMatrixView<T> s = c.scores.matrix<T>();
    for (int64_t t = 0; t < n_tok; ++t) {
      const int32_t* ex = c.expert.data() + t * k;
      const auto [dot, sum] = chosen_grad_terms(s, t);
      for (int64_t j = 0; j < k; ++j) {
        const T sv = s(t, ex[j]);
        dlogits(t, ex[j]) += (dweight(t, j) - dot) / sum * sv * (T(1) - sv);
      }
    }
  }
  cpu::gemm<T>(true, false, T(1), x, dlogits, T(1), dw_gate);
  cpu::gemm<T>(false, true, T(1), dlogits, w_gate, T(0), dx);
}

template void Router::forward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                              std::span<const float>) const;
template void Router::forward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                              std::span<const double>) const;
template void Router::backward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                               ConstMatrixView<float>, MatrixView<float>, MatrixView<float>) const;
template void Router::backward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                               ConstMatrixView<double>, MatrixView<double>,
                               MatrixView<double>) const;

}  // namespace sy
