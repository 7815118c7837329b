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

namespace {

double softplus(double v) { return std::max(v, 0.0) + std::log1p(std::exp(-std::abs(v))); }
double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double normal_cdf(double z) { return 0.5 * std::erfc(-z * M_SQRT1_2); }
double normal_pdf(double z) { return std::exp(-0.5 * z * z) * (0.5 * M_2_SQRTPI * M_SQRT1_2); }

// CV(v)^2 = var / (mean^2 + eps) over experts, population variance, and its gradient.
constexpr double kCvEps = 1e-10;
double cv_squared(const std::vector<double>& v) {
  const double n = double(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= n;
  for (double x : v) var += (x - mean) * (x - mean);
  return var / n / (mean * mean + kCvEps);
}
std::vector<double> cv_squared_grad(const std::vector<double>& v, double scale) {
  const double n = double(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= n;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double den = mean * mean + kCvEps;
  std::vector<double> g(v.size());
  for (size_t e = 0; e < v.size(); ++e)
    g[e] = scale * (2 * (v[e] - mean) / (n * den) - var * 2 * mean / (n * den * den));
  return g;
}

// The expert whose H is e's threshold for token t: the k-th best other than e. That is the
// runner-up when e is among the chosen, else the k-th chosen; -1 when every expert is chosen.
int32_t threshold_expert(std::span<const int32_t> chosen, int32_t runner_up, int32_t e) {
  for (int32_t c : chosen)
    if (c == e) return runner_up;
  return chosen.back();
}

}  // namespace

template <class T>
void Router::noisy_topk_forward(ConstMatrixView<T> xr, ConstMatrixView<T> w_noise,
                                RouterCache& c, const RouterInput& in) const {
  const int64_t n_tok = xr.rows, E = cfg_.n_experts, k = cfg_.top_k;
  SY_CHECK(w_noise.data != nullptr && w_noise.rows == xr.cols && w_noise.cols == E,
           "noisy top-k needs w_noise [{}, {}], got [{}, {}]", xr.cols, E, w_noise.rows,
           w_noise.cols);
  const DType dt = dtype_of<T>();
  c.noise_logits.resize({n_tok, E}, dt);
  c.noise.resize({n_tok, E}, dt);
  c.choice.resize({n_tok, E}, dt);
  c.backend->gemm<T>(false, false, T(1), xr, w_noise, T(0), c.noise_logits.matrix<T>());
  if (in.training)
    fill_normal(c.noise.span<T>(), Philox(in.seed, /*stream=*/0x9015E), T(1));
  else
    c.noise.fill_zero();
  ConstMatrixView<T> logits = c.logits.matrix<T>(), nl = c.noise_logits.matrix<T>(),
                     noise = c.noise.matrix<T>();
  MatrixView<T> h = c.choice.matrix<T>();
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t e = 0; e < E; ++e)
      h(t, e) = logits(t, e) + noise(t, e) * T(softplus(double(nl(t, e))));
  MatrixView<int32_t> expert{c.expert.data(), n_tok, k};
  MatrixView<T> weight = c.weight.matrix<T>();
  cpu::topk_rows<T>(ConstMatrixView<T>(h), expert, weight);
  c.runner_up.assign(size_t(n_tok), -1);
  for (int64_t t = 0; t < n_tok; ++t) {
    // Softmax over the k chosen H (the first is the largest).
    T sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += (weight(t, j) = std::exp(weight(t, j) - h(t, expert(t, 0))));
    for (int64_t j = 0; j < k; ++j) weight(t, j) /= sum;
    const std::span<const int32_t> chosen(expert.row(t), size_t(k));
    for (int32_t e = 0; e < E; ++e) {
      if (std::find(chosen.begin(), chosen.end(), e) != chosen.end()) continue;
      if (c.runner_up[t] < 0 || h(t, e) > h(t, c.runner_up[t])) c.runner_up[t] = e;
    }
  }
  c.importance.assign(size_t(E), 0.0);
  c.load.assign(size_t(E), 0.0);
  for (int64_t t = 0; t < n_tok; ++t) {
    const std::span<const int32_t> chosen(expert.row(t), size_t(k));
    for (int64_t j = 0; j < k; ++j) c.importance[chosen[j]] += double(weight(t, j));
    for (int32_t e = 0; e < E; ++e) {
      const int32_t m = threshold_expert(chosen, c.runner_up[t], e);
      if (m < 0) {
        c.load[e] += 1;
        continue;
      }
      const double sp = softplus(double(nl(t, e)));
      c.load[e] += normal_cdf((double(logits(t, e)) - double(h(t, m))) / sp);
    }
  }
  c.loss_balance = cfg_.loss_importance_weight * cv_squared(c.importance) +
                   cfg_.loss_load_weight * cv_squared(c.load);
}

template <class T>
void Router::noisy_topk_backward(RouterCache& c, ConstMatrixView<T> dweight,
                                 MatrixView<T> dlogits) const {
  const int64_t n_tok = dlogits.rows, E = cfg_.n_experts, k = cfg_.top_k;
  const std::vector<double> gi = cv_squared_grad(c.importance, cfg_.loss_importance_weight);
  const std::vector<double> gl = cv_squared_grad(c.load, cfg_.loss_load_weight);
  c.dnoise_logits.resize({n_tok, E}, dtype_of<T>());
  MatrixView<T> dh = c.dprobs.matrix<T>(), dnl = c.dnoise_logits.matrix<T>();
  ConstMatrixView<T> logits = c.logits.matrix<T>(), nl = c.noise_logits.matrix<T>(),
                     noise = c.noise.matrix<T>(), h = c.choice.matrix<T>(),
                     weight = c.weight.matrix<T>();
  std::fill_n(dh.data, dh.size(), T(0));
  std::fill_n(dnl.data, dnl.size(), T(0));
  std::fill_n(dlogits.data, dlogits.size(), T(0));
  for (int64_t t = 0; t < n_tok; ++t) {
    const std::span<const int32_t> chosen(c.expert.data() + t * k, size_t(k));
    // Weights: softmax of the chosen H, with the importance loss's gradient on each weight.
    double dot = 0;
    for (int64_t j = 0; j < k; ++j) dot += double(weight(t, j)) * (double(dweight(t, j)) + gi[chosen[j]]);
    for (int64_t j = 0; j < k; ++j)
      dh(t, chosen[j]) += T(double(weight(t, j)) * (double(dweight(t, j)) + gi[chosen[j]] - dot));
    // Load: P_te = Phi(z), z = (logits_te - H_tm) / softplus(nl_te).
    for (int32_t e = 0; e < E; ++e) {
      const int32_t m = threshold_expert(chosen, c.runner_up[t], e);
      if (m < 0 || gl[e] == 0) continue;
      const double sp = softplus(double(nl(t, e)));
      const double z = (double(logits(t, e)) - double(h(t, m))) / sp;
      const double g = gl[e] * normal_pdf(z) / sp;
      dlogits(t, e) += T(g);
      dh(t, m) -= T(g);
      dnl(t, e) += T(-g * z * sigmoid(double(nl(t, e))));
    }
  }
  // H = logits + noise * softplus(nl).
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t e = 0; e < E; ++e) {
      dlogits(t, e) += dh(t, e);
      dnl(t, e) += dh(t, e) * noise(t, e) * T(sigmoid(double(nl(t, e))));
    }
}

template <class T>
void Router::balance_loss(RouterCache& c, const RouterInput& in) const {
  if (cfg_.loss_balance_weight <= 0 || !uses_balance_loss()) return;
  const int64_t n_tok = c.probs.dim(0), E = cfg_.n_experts, k = cfg_.slots_per_token();
  ConstMatrixView<T> probs = c.probs.matrix<T>();
  // [demand_e (E), sum_t probs_te (E), T]: sums over the batch, of every rank's tokens when the
  // batch is spread over several.
  std::vector<double> sums(size_t(2 * E + 1), 0.0);
  for (int64_t e = 0; e < E; ++e) sums[e] = double(c.demand[e]);
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t e = 0; e < E; ++e) sums[E + e] += double(probs(t, e));
  sums[2 * E] = double(n_tok);
  // A rank's gradients are averaged over world ranks after backward, so each rank carries
  // world times its share of the batch loss's gradient.
  double share = 1;
  if (in.parallel != nullptr) {
    in.parallel->world_allreduce_sum(sums);
    share = double(in.parallel->world_size());
  }
  const double n_all = sums[2 * E];
  if (n_all == 0) return;
  double s = 0;
  for (int64_t e = 0; e < E; ++e) {
    const double f = sums[e] / (n_all * double(k));
    s += f * sums[E + e] / n_all;
    c.balance_grad[e] = cfg_.loss_balance_weight * double(E) * f / n_all * share;
  }
  c.loss_balance = cfg_.loss_balance_weight * double(E) * s;
}

template <class T>
void Router::forward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                     std::span<const T> bias, const RouterInput& in,
                     ConstMatrixView<T> w_noise) const {
  const int64_t n_tok = x.rows, d = x.cols, E = cfg_.n_experts, k = cfg_.slots_per_token();
  const DType dt = dtype_of<T>();
  c.backend = (in.backend != nullptr ? in.backend : &backend_of(ExecContext{}))->f32;
  c.logits.resize({n_tok, E}, dt);
  c.probs.resize({n_tok, E}, dt);
  c.lse.resize({n_tok}, dt);
  c.weight.resize({n_tok, k}, dt);
  c.expert.resize(size_t(n_tok * k));
  c.demand.assign(size_t(E), 0);
  c.loss_balance = c.loss_z = c.loss_guide = 0;
  c.balance_grad.assign(size_t(E), 0.0);
  c.guide.assign(in.guide.begin(), in.guide.end());
  if (!c.guide.empty()) {
    if (int64_t(c.guide.size()) != n_tok)
      throw ShapeError(fmt::format("router guidance: {} targets for {} rows: expected one per row",
                                   c.guide.size(), n_tok));
    if (!cfg_.router_trained())
      throw ConfigError("router guidance with an untrained router (moe.router = hash or random): "
                        "expected a router with weights to guide");
    for (int32_t e : c.guide)
      if (e < -1 || e >= E)
        throw ShapeError(fmt::format("router guidance target {}: expected -1 (none) or 0..{} "
                                     "(moe.n_experts - 1)",
                                     e, E - 1));
  }
  if (n_tok == 0) {
    balance_loss<T>(c, in);  // other ranks' collective needs this one's zeros
    return;
  }

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
  c.backend->gemm<T>(false, false, T(1), xr, w_gate, T(0), c.logits.matrix<T>());
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
    case Gating::kNoisyTopK:
      noisy_topk_forward<T>(xr, w_noise, c, in);
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
  balance_loss<T>(c, in);
  if (cfg_.loss_z_weight > 0 && cfg_.router_trained()) {
    double s = 0;
    for (T l : c.lse.span<T>()) s += double(l) * double(l);
    c.loss_z = cfg_.loss_z_weight * s / double(n_tok);
  }
  if (const int64_t n_guided = guided_rows(c); n_guided > 0) {
    double s = 0;
    for (int64_t t = 0; t < n_tok; ++t)
      if (const int32_t e = c.guide[size_t(t)]; e >= 0)
        s += double(c.lse.data<T>()[t]) - double(c.logits.matrix<T>()(t, e));
    c.loss_guide = cfg_.loss_guide_weight * s / double(n_guided);
  }
}

template <class T>
void Router::backward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& c,
                      ConstMatrixView<T> dweight, MatrixView<T> dw_gate, MatrixView<T> dx,
                      ConstMatrixView<T> w_noise, MatrixView<T> dw_noise) const {
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

  // Balance loss: the same gradient for every token, from forward.
  std::vector<T> dbal(c.balance_grad.begin(), c.balance_grad.end());

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

  MatrixView<T> dlogits = c.dlogits.matrix<T>();
  const bool noisy = cfg_.gating == Gating::kNoisyTopK;
  if (noisy) {
    noisy_topk_backward<T>(c, dweight, dlogits);
  } else {
  #pragma omp parallel for schedule(static) if (n_tok * E > (1 << 14))
    for (int64_t t = 0; t < n_tok; ++t) {
      T* dp = dprobs.row(t);
      for (int64_t e = 0; e < E; ++e) dp[e] = dbal[e];
      if (cfg_.gating == Gating::kSigmoidBias) continue;  // its weights come from s, below
      const int32_t* ex = c.expert.data() + t * k;
      const auto [dot, sum] = chosen_grad_terms(probs, t);
      for (int64_t j = 0; j < k; ++j) dp[ex[j]] += (dweight(t, j) - dot) / sum;
    }
    cpu::softmax_rows_backward<T>(probs, dprobs, dlogits);
  }
  if (cfg_.loss_z_weight > 0) {
    // d/dlogits[t] of w_z * mean_t lse_t^2 = w_z * 2 lse_t / T * probs[t].
    const T* lse = c.lse.data<T>();
    const T scale = T(2 * cfg_.loss_z_weight / double(n_tok));
    for (int64_t t = 0; t < n_tok; ++t)
      for (int64_t e = 0; e < E; ++e) dlogits(t, e) += scale * lse[t] * probs(t, e);
  }
  if (const int64_t n_guided = guided_rows(c); n_guided > 0) {
    // d/dlogits[t] of w_g * mean CE = w_g / n_guided * (probs[t] - onehot(target_t)).
    const T scale = T(cfg_.loss_guide_weight / double(n_guided));
    for (int64_t t = 0; t < n_tok; ++t) {
      const int32_t target = c.guide[size_t(t)];
      if (target < 0) continue;
      for (int64_t e = 0; e < E; ++e) dlogits(t, e) += scale * probs(t, e);
      dlogits(t, target) -= scale;
    }
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
  // logits = xr w_gate (and noise logits = xr w_noise), xr = x * u with jitter, else x.
  ConstMatrixView<T> xr = c.jittered ? ConstMatrixView<T>(c.x_jit.matrix<T>()) : x;
  c.backend->gemm<T>(true, false, T(1), xr, dlogits, T(1), dw_gate);
  c.backend->gemm<T>(false, true, T(1), dlogits, w_gate, T(0), dx);
  if (noisy) {
    c.backend->gemm<T>(true, false, T(1), xr, c.dnoise_logits.matrix<T>(), T(1), dw_noise);
    c.backend->gemm<T>(false, true, T(1), c.dnoise_logits.matrix<T>(), w_noise, T(1), dx);
  }
  if (c.jittered) {
    const T* u = c.jitter.data<T>();
    for (int64_t i = 0; i < n_tok * x.cols; ++i) dx.data[i] *= u[i];
  }
}

template void Router::forward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                              std::span<const float>, const RouterInput&,
                              ConstMatrixView<float>) const;
template void Router::forward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                              std::span<const double>, const RouterInput&,
                              ConstMatrixView<double>) const;
template void Router::backward(ConstMatrixView<float>, ConstMatrixView<float>, RouterCache&,
                               ConstMatrixView<float>, MatrixView<float>, MatrixView<float>,
                               ConstMatrixView<float>, MatrixView<float>) const;
template void Router::backward(ConstMatrixView<double>, ConstMatrixView<double>, RouterCache&,
                               ConstMatrixView<double>, MatrixView<double>, MatrixView<double>,
                               ConstMatrixView<double>, MatrixView<double>) const;

}  // namespace sy
