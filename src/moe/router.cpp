// Softmax top-k router and its auxiliary losses; see router.h for the math.
#include "switchyard/moe/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "switchyard/core/rng.h"

#include "switchyard/kernels/cpu.h"

namespace sy {

Router::Router(const MoeConfig& cfg) : cfg_(cfg) {}

template <class T>
void Router::limit_groups(MatrixView<T> scores) const {
  const int64_t G = cfg_.n_groups, per = cfg_.n_experts / G, keep = cfg_.topk_groups;
  std::vector<T> group_score(static_cast<size_t>(G));
  std::vector<int32_t> order(static_cast<size_t>(G));
  for (int64_t t = 0; t < scores.rows; ++t) {
    T* s = scores.row(t);
    for (int64_t g = 0; g < G; ++g) {
      T a = -INFINITY, b = -INFINITY;  // the group's two highest scores
      for (int64_t e = g * per; e < (g + 1) * per; ++e)
        if (s[e] > a) b = a, a = s[e];
        else if (s[e] > b) b = s[e];
      group_score[g] = per >= 2 ? a + b : a;
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t x, int32_t y) { return group_score[x] > group_score[y]; });
    for (int64_t r = keep; r < G; ++r)
      for (int64_t e = order[r] * per; e < (order[r] + 1) * per; ++e) s[e] = -INFINITY;
  }
}

template <class T>
void Router::forward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                     std::span<const T> bias, const RouterInput& in) const {
  const int64_t n_tok = x.rows, d = x.cols, E = cfg_.n_experts, k = cfg_.slots_per_token();
  const DType dt = dtype_of<T>();
  c.logits.resize({n_tok, E}, dt);
  c.probs.resize({n_tok, E}, dt);
  c.lse.resize({n_tok}, dt);
  c.weight.resize({n_tok, k}, dt);
  c.expert.resize(size_t(n_tok * k));
  c.demand.assign(size_t(E), 0);
  c.loss_balance = c.loss_z = 0;
  if (n_tok == 0) return;

  // Switch's multiplicative jitter: the router sees x * u, u ~ U(1 - eps, 1 + eps).
  ConstMatrixView<T> xr = x;
  const bool jitter = cfg_.jitter_eps > 0 && in.training;
  c.jittered = jitter;
  if (jitter) {
    c.jitter.resize({n_tok, d}, dt);
    c.x_jit.resize({n_tok, d}, dt);
    const double eps = cfg_.jitter_eps;
    fill_uniform(c.jitter.span<T>(), Philox(in.seed, /*stream=*/0x717), T(1 - eps), T(1 + eps));
    T *u = c.jitter.data<T>(), *xj = c.x_jit.data<T>();
    for (int64_t i = 0; i < n_tok * d; ++i) xj[i] = x.data[i] * u[i];
    xr = c.x_jit.matrix<T>();
  }
  cpu::gemm<T>(false, false, T(1), xr, w_gate, T(0), c.logits.matrix<T>());
  cpu::softmax_rows<T>(c.logits.matrix<T>(), c.probs.matrix<T>(), c.lse.span<T>());
  MatrixView<int32_t> expert{c.expert.data(), n_tok, k};
  MatrixView<T> weight = c.weight.matrix<T>();
  ConstMatrixView<T> probs = c.probs.matrix<T>();
  switch (cfg_.gating) {
    case Gating::kSigmoidBias: {
      // Choose by s + bias (within the best groups), weigh by s alone (normalised below).
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
      if (cfg_.n_groups > 0) limit_groups<T>(b);
      cpu::topk_rows<T>(b, expert, weight);
      for (int64_t t = 0; t < n_tok; ++t)
        for (int64_t j = 0; j < k; ++j) weight(t, j) = s(t, expert(t, j));
      break;
    }
    case Gating::kSoftmaxTopK:
      if (cfg_.n_groups > 0) {
        c.choice.resize({n_tok, E}, dt);
        std::copy_n(probs.data, n_tok * E, c.choice.data<T>());
        limit_groups<T>(c.choice.matrix<T>());
        cpu::topk_rows<T>(c.choice.matrix<T>(), expert, weight);
      } else {
        cpu::topk_rows<T>(probs, expert, weight);
      }
      break;
    case Gating::kExpertChoice:
      // Every (token, expert) pair is a slot; the plan's capacity, granted in order of
      // probability (MoeLayer ranks the slots), makes each expert keep its top-C tokens.
      for (int64_t t = 0; t < n_tok; ++t)
        for (int64_t e = 0; e < E; ++e) {
          expert(t, e) = int32_t(e);
          weight(t, e) = probs(t, e);
        }
      break;
    case Gating::kHash:
    case Gating::kRandom: {
      SY_CHECK(cfg_.gating == Gating::kRandom || int64_t(in.token_ids.size()) == n_tok,
               "hash routing needs {} token ids, got {}", n_tok, in.token_ids.size());
      std::vector<int32_t> pool(static_cast<size_t>(E));
      for (int64_t t = 0; t < n_tok; ++t) {
        if (cfg_.gating == Gating::kHash) {
          // k consecutive experts from a hashed start: distinct, and equal ids share experts.
          const uint32_t h = Philox(0x5EED, 0).bits(uint64_t(uint32_t(in.token_ids[t])))[0];
          const int64_t start = int64_t(h % uint32_t(E));
          for (int64_t j = 0; j < k; ++j) expert(t, j) = int32_t((start + j) % E);
        } else {
          // k distinct experts: a partial Fisher-Yates shuffle from fresh bits per token.
          std::iota(pool.begin(), pool.end(), 0);
          const auto bits = Philox(in.seed, /*stream=*/0x4A5).bits(uint64_t(t));
          for (int64_t j = 0; j < k; ++j) {
            const uint32_t r = j < 4 ? bits[j] : Philox(in.seed, 0x4A5 + uint64_t(j)).bits(uint64_t(t))[0];
            std::swap(pool[j], pool[j + int64_t(r % uint32_t(E - j))]);
            expert(t, j) = pool[j];
          }
        }
        for (int64_t j = 0; j < k; ++j) weight(t, j) = T(1) / T(k);
      }
      break;
    }
  }
  if (normalises_weights()) {
    for (int64_t t = 0; t < n_tok; ++t) {
      T sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += weight(t, j);
      for (int64_t j = 0; j < k; ++j) weight(t, j) /= sum;
    }
  }
  for (int32_t e : c.expert) ++c.demand[e];

  // Losses are sums over tokens; accumulated in double, in token order, on one thread. Expert
  // choice is balanced by construction, and hash and random routing train no router, so the
  // balance loss is for top-k routers only; the z-loss for every trained router.
  if (cfg_.loss_balance_weight > 0 && uses_balance_loss()) {
    std::vector<double> p_mean(size_t(E), 0.0);
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t e = 0; e < E; ++e) p_mean[e] += double(probs(t, e));
    double s = 0;
    for (int64_t e = 0; e < E; ++e)
      s += double(c.demand[e]) / double(n_tok * k) * p_mean[e] / double(n_tok);
    c.loss_balance = cfg_.loss_balance_weight * double(E) * s;
  }
  if (cfg_.loss_z_weight > 0 && cfg_.router_trained()) {
    double s = 0;
    for (T l : c.lse.span<T>()) s += double(l) * double(l);
    c.loss_z = cfg_.loss_z_weight * s / double(n_tok);
  }
}

template <class T>
void Router::backward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                      ConstMatrixView<T> dweight, MatrixView<T> dw_gate, MatrixView<T> dx) const {
  const int64_t n_tok = x.rows, E = cfg_.n_experts, k = cfg_.slots_per_token();
  if (n_tok == 0) return;
  if (!cfg_.router_trained()) {  // the routing used no router weights: no gradient to them
    std::fill_n(dx.data, dx.size(), T(0));
    return;
  }
  const DType dt = dtype_of<T>();
  c.dprobs.resize({n_tok, E}, dt);
  c.dlogits.resize({n_tok, E}, dt);
  MatrixView<T> dprobs = c.dprobs.matrix<T>();
  ConstMatrixView<T> probs = c.probs.matrix<T>();
  ConstMatrixView<T> weight = c.weight.matrix<T>();

  // Balance loss: d/dprobs[t, e] = w_b * E * f_e / T, the same for every token.
  std::vector<T> dbal(size_t(E), T(0));
  if (cfg_.loss_balance_weight > 0 && uses_balance_loss())
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
  if (c.jittered) {
    // logits = (x * u) w_gate: the weight sees the jittered input, x the factor u.
    cpu::gemm<T>(true, false, T(1), c.x_jit.matrix<T>(), dlogits, T(1), dw_gate);
    cpu::gemm<T>(false, true, T(1), dlogits, w_gate, T(0), dx);
    const T* u = c.jitter.data<T>();
    for (int64_t i = 0; i < n_tok * x.cols; ++i) dx.data[i] *= u[i];
    return;
  }
  cpu::gemm<T>(true, false, T(1), x, dlogits, T(1), dw_gate);
  cpu::gemm<T>(false, true, T(1), dlogits, w_gate, T(0), dx);
}

template void Router::forward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                              std::span<const float>, const RouterInput&) const;
template void Router::forward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                              std::span<const double>, const RouterInput&) const;
template void Router::backward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                               ConstMatrixView<float>, MatrixView<float>, MatrixView<float>) const;
template void Router::backward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                               ConstMatrixView<double>, MatrixView<double>,
                               MatrixView<double>) const;

}  // namespace sy
