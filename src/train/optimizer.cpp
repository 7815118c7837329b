#include "switchyard/train/optimizer.h"

#include <cmath>
#include <numbers>
#include <vector>

#include "switchyard/train/parallel.h"

namespace sy {

template <class Params>
BasicAdamW<Params>::BasicAdamW(const TrainConfig& cfg, const Params& like)
    : cfg_(cfg), m_(zeros_like(like)), v_(zeros_like(like)) {}

template <class Params>
void BasicAdamW<Params>::step(Params& p, const Params& g, double lr) {
  ++t_;
  const double b1 = cfg_.beta1, b2 = cfg_.beta2;
  const double c1 = 1.0 / (1.0 - std::pow(b1, double(t_))), c2 = 1.0 / (1.0 - std::pow(b2, double(t_)));
  auto params = p.named();
  auto grads = g.named();
  auto ms = m_.named();
  auto vs = v_.named();
  SY_CHECK(params.size() == grads.size() && params.size() == ms.size(), "{} params, {} grads",
           params.size(), grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].first;
    if (name.ends_with("expert_bias")) continue;
    Tensor& w = *params[i].second;
    const Tensor& grad = *grads[i].second;
    Tensor &mt = *ms[i].second, &vt = *vs[i].second;
    const float* gr = grad.data<float>();
    float *wp = w.data<float>(), *m = mt.data<float>(), *v = vt.data<float>();
    const float decay = w.rank() >= 2 ? float(lr * cfg_.weight_decay) : 0.0f;
    const float fb1 = float(b1), fb2 = float(b2), fc1 = float(c1), fc2 = float(c2);
    const float flr = float(lr), eps = float(cfg_.adam_eps);
    const int64_t n = w.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t j = 0; j < n; ++j) {
      m[j] = fb1 * m[j] + (1 - fb1) * gr[j];
      v[j] = fb2 * v[j] + (1 - fb2) * gr[j] * gr[j];
      wp[j] -= flr * (m[j] * fc1) / (std::sqrt(v[j] * fc2) + eps) + decay * wp[j];
    }
  }
}

template class BasicAdamW<LmParams>;
template class BasicAdamW<VitParams>;
template class BasicAdamW<MmParams>;

double learning_rate(const TrainConfig& cfg, int64_t step) {
  if (step < cfg.warmup) return cfg.lr * double(step + 1) / double(cfg.warmup);
  const double span = double(std::max<int64_t>(1, cfg.steps - cfg.warmup));
  const double progress = std::min(1.0, double(step - cfg.warmup) / span);
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

namespace {

template <class Params>
double clip_grad_norm_impl(Params& g, double max_norm, const ParallelGroup* grid) {
  // Partial sums over fixed chunks, added in order: the same norm at any thread count.
  constexpr int64_t kChunk = 1 << 14;
  double sq = 0, sq_experts = 0;
  std::vector<double> part;
  for (auto& [name, t] : g.named()) {
    double& total = grid != nullptr && is_expert_weight(name) ? sq_experts : sq;
    const Tensor& grad = *t;
    const float* v = grad.data<float>();
    const int64_t n = t->numel(), chunks = (n + kChunk - 1) / kChunk;
    part.assign(size_t(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      double s = 0;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += double(v[i]) * double(v[i]);
      part[c] = s;
    }
    for (double s : part) total += s;
  }
  if (grid != nullptr) {
    // Expert shards differ over an expert group and repeat over its replicas.
    grid->world_allreduce_sum({&sq_experts, 1});
    sq += sq_experts / double(grid->dp_size());
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float s = float(max_norm / norm);
    for (auto& [name, t] : g.named()) {
      Tensor& grad = *t;
      float* v = grad.data<float>();
      const int64_t n = t->numel();
#pragma omp parallel for schedule(static) if (n > kChunk)
      for (int64_t i = 0; i < n; ++i) v[i] *= s;
    }
  }
  return norm;
}

}  // namespace

double clip_grad_norm(LmParams& g, double max_norm, const ParallelGroup* grid) {
  return clip_grad_norm_impl(g, max_norm, grid);
}

double clip_grad_norm(VitParams& g, double max_norm) {
  return clip_grad_norm_impl(g, max_norm, nullptr);
}

double clip_grad_norm(MmParams& g, double max_norm) { return clip_grad_norm_impl(g, max_norm, nullptr); }

}  // namespace sy
