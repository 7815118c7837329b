// A naive MoE layer for tests: loops over tokens and their chosen experts, written from the
// definitions alone (sort for top-k, a counter per expert for capacity, one SwiGLU per
// token and expert), sharing no code with the layer beyond the config.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <vector>

#include "switchyard/moe/config.h"
#include "switchyard/moe/moe_layer.h"

namespace sy::testing {

// A layer shape for parameterised tests; capacity_factor 0 means dropless.
struct LayerCase {
  int64_t T, d, f, E, k;
  bool renorm;
  double capacity_factor;    // 0: dropless
  bool prioritized = false;  // batch prioritized routing
  int64_t n_shared = 0;      // shared experts
  friend void PrintTo(const LayerCase& c, std::ostream* os) {
    *os << "T" << c.T << "_d" << c.d << "_f" << c.f << "_E" << c.E << "_k" << c.k
        << (c.renorm ? "_renorm" : "") << "_cf" << c.capacity_factor
        << (c.prioritized ? "_bpr" : "") << (c.n_shared ? "_shared" : "");
  }
};

inline MoeConfig config_of(const LayerCase& c) {
  MoeConfig cfg{
      .d_model = c.d, .d_ff = c.f, .n_experts = c.E, .top_k = c.k, .renormalize = c.renorm};
  cfg.dropless = c.capacity_factor == 0;
  if (!cfg.dropless) cfg.capacity_factor_train = cfg.capacity_factor_eval = c.capacity_factor;
  cfg.batch_prioritized = c.prioritized;
  cfg.n_shared_experts = c.n_shared;
  return cfg;
}

// Every non-empty tensor of p converted to dtype.
inline MoeParams convert_params(const MoeParams& p, DType dtype) {
  auto cv = [&](const Tensor& t) { return t.empty() ? Tensor() : convert(t, dtype); };
  return {cv(p.w_gate),      cv(p.w1),        cv(p.w3),        cv(p.w2),
          cv(p.expert_bias), cv(p.shared_w1), cv(p.shared_w3), cv(p.shared_w2),
          cv(p.w_noise)};
}

struct NaiveMoe {
  std::vector<double> y;        // [T, d]
  std::vector<bool> kept;       // [T*k]
  std::vector<int32_t> expert;  // [T*k]
};

// p, x in f64. capacity -1: none. group_rows > 1: routing by groups of that many consecutive
// rows, each group routed by its mean row; expert, kept and capacity then count groups.
inline NaiveMoe naive_moe(const MoeConfig& cfg, const MoeParams& p, const Tensor& x,
                          int64_t capacity, int64_t group_rows = 1) {
  const int64_t T = x.dim(0), d = cfg.d_model, f = cfg.d_ff, E = cfg.n_experts, k = cfg.top_k;
  const int64_t G = T / group_rows;
  auto X = x.matrix<double>();
  std::vector<double> mean(size_t(G * d), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) mean[(t / group_rows) * d + c] += X(t, c) / double(group_rows);
  auto R = [&](int64_t g, int64_t c) { return mean[g * d + c]; };
  auto Wg = p.w_gate.matrix<double>();
  auto W1 = p.w1.stacked<double>(), W3 = p.w3.stacked<double>(), W2 = p.w2.stacked<double>();
  NaiveMoe out{std::vector<double>(size_t(T * d), 0.0), std::vector<bool>(size_t(G * k)),
               std::vector<int32_t>(size_t(G * k))};
  std::vector<std::vector<double>> weight(static_cast<size_t>(G));
  std::vector<double> top1_prob(static_cast<size_t>(G));
  for (int64_t t = 0; t < G; ++t) {
    std::vector<double> logit(static_cast<size_t>(E), 0.0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t c = 0; c < d; ++c) logit[e] += R(t, c) * Wg(c, e);
    const double mx = *std::max_element(logit.begin(), logit.end());
    double z = 0;
    for (double l : logit) z += std::exp(l - mx);
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    if (cfg.gating == Gating::kSigmoidBias) {
      // Choose by sigmoid(logit) + bias; weigh by the chosen sigmoids, normalised.
      auto sig = [&](int32_t e) { return 1.0 / (1.0 + std::exp(-logit[e])); };
      auto bias = [&](int32_t e) {
        return p.expert_bias.empty() ? 0.0 : p.expert_bias.data<double>()[e];
      };
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return sig(a) + bias(a) > sig(b) + bias(b); });
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += sig(order[j]);
      for (int64_t j = 0; j < k; ++j) {
        out.expert[t * k + j] = order[j];
        weight[t].push_back(sig(order[j]) / sum);
      }
      top1_prob[t] = std::exp(logit[out.expert[t * k]] - mx) / z;
      continue;
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return logit[a] > logit[b]; });
    top1_prob[t] = std::exp(logit[order[0]] - mx) / z;
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      out.expert[t * k + j] = order[j];
      weight[t].push_back(std::exp(logit[order[j]] - mx) / z);
      sum += weight[t].back();
    }
    if (cfg.renormalize)
      for (double& w : weight[t]) w /= sum;
  }
  // Capacity: first choices of all tokens, then second choices, ...; tokens in index order,
  // or with batch prioritized routing by their top-1 probability, highest first.
  std::vector<int64_t> token_order(static_cast<size_t>(G));
  std::iota(token_order.begin(), token_order.end(), 0);
  if (cfg.batch_prioritized) {
    std::vector<double> top1(static_cast<size_t>(G));
    for (int64_t t = 0; t < G; ++t) top1[t] = top1_prob[t];
    std::stable_sort(token_order.begin(), token_order.end(),
                     [&](int64_t a, int64_t b) { return top1[a] > top1[b]; });
  }
  std::vector<int64_t> used(size_t(E), 0);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t : token_order) {
      const int32_t e = out.expert[t * k + j];
      out.kept[t * k + j] = capacity < 0 || used[e] < capacity;
      if (out.kept[t * k + j]) ++used[e];
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t slot = (t / group_rows) * k + j;
      if (!out.kept[slot]) continue;
      const int32_t e = out.expert[slot];
      std::vector<double> act(static_cast<size_t>(f));
      for (int64_t h = 0; h < f; ++h) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < d; ++c) {
          g += X(t, c) * W1[e](c, h);
          u += X(t, c) * W3[e](c, h);
        }
        act[h] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t c = 0; c < d; ++c) {
        double s = 0;
        for (int64_t h = 0; h < f; ++h) s += act[h] * W2[e](h, c);
        out.y[t * d + c] += weight[t / group_rows][j] * s;
      }
    }
  // Shared experts: every token, weight 1.
  for (int64_t sh = 0; sh < cfg.n_shared_experts; ++sh) {
    const int64_t g = cfg.shared_width();
    auto S1 = p.shared_w1.stacked<double>()[sh], S3 = p.shared_w3.stacked<double>()[sh];
    auto S2 = p.shared_w2.stacked<double>()[sh];
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> act(static_cast<size_t>(g));
      for (int64_t h = 0; h < g; ++h) {
        double gate = 0, up = 0;
        for (int64_t c = 0; c < d; ++c) gate += X(t, c) * S1(c, h), up += X(t, c) * S3(c, h);
        act[h] = gate / (1 + std::exp(-gate)) * up;
      }
      for (int64_t c = 0; c < d; ++c) {
        double acc = 0;
        for (int64_t h = 0; h < g; ++h) acc += act[h] * S2(h, c);
        out.y[t * d + c] += acc;
      }
    }
  }
  return out;
}

}  // namespace sy::testing
