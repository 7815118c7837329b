// AdamW (Loshchilov & Hutter 2019) over the model's parameters, the learning-rate schedule
// (linear warm-up, then cosine decay to min_lr) and global-norm gradient clipping.
#pragma once

#include <cstdint>

#include "switchyard/core/parallel.h"
#include "switchyard/nn/model.h"
#include "switchyard/nn/multimodal.h"
#include "switchyard/nn/vision.h"
#include "switchyard/train/run_config.h"

namespace sy {

// Over any parameter set with named() and zeros_like(): the language model's LmParams (AdamW)
// the vision transformer's VitParams (VitAdamW) and the multimodal model's MmParams (MmAdamW).
template <class Params>
class BasicAdamW {
 public:
  BasicAdamW(const TrainConfig& cfg, const Params& like);  // moments zero, same shapes
  // p -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p); decay on matrices only (not
  // norm gains), and MoE expert_bias (moved by its own balancing rule) is left alone.
  void step(Params& p, const Params& g, double lr);
  int64_t n_steps() const { return t_; }
  void set_n_steps(int64_t t) { t_ = t; }
  Params& m() { return m_; }
  Params& v() { return v_; }
  const Params& m() const { return m_; }
  const Params& v() const { return v_; }

 private:
  TrainConfig cfg_;
  Params m_, v_;
  int64_t t_ = 0;
};
using AdamW = BasicAdamW<LmParams>;
using VitAdamW = BasicAdamW<VitParams>;
using MmAdamW = BasicAdamW<MmParams>;

// Learning rate at step s (0-based) of cfg.steps.
double learning_rate(const TrainConfig& cfg, int64_t step);

// Scales g so its global L2 norm is at most max_norm (0: no clipping); returns the norm before.
// With grid (expert parallelism, gradients already all-reduced), the norm is the whole model's:
// every rank's expert shards count once.
double clip_grad_norm(LmParams& g, double max_norm, const ParallelGroup* grid = nullptr);
double clip_grad_norm(VitParams& g, double max_norm);
double clip_grad_norm(MmParams& g, double max_norm);

}  // namespace sy
