// Linear router with softmax top-k gating, and the two auxiliary losses it is trained with.
//   logits = x w_gate; probs = softmax(logits); expert = top-k of probs;
//   weight = chosen probs (divided by their sum when cfg.renormalize).
//   loss_balance = w_b * E * sum_e f_e P_e   (Switch Transformer; f_e: share of the T*k slots
//                  that chose e, not differentiable; P_e: mean router probability of e)
//   loss_z       = w_z * mean_t logsumexp(logits_t)^2   (ST-MoE)
//   loss_guide   = w_g * mean_t -log softmax(logits_t)[target_t], over the rows given a target
//                  expert (RouterInput::guide; Mobile V-MoE's super-class guidance)
// Noisy top-k (Shazeer et al. 2017) chooses by H = logits + n * softplus(x w_noise) and, in
// place of loss_balance, adds
//   w_imp * CV(importance)^2 + w_load * CV(load)^2,  CV(v)^2 = var_e(v) / (mean_e(v)^2 + 1e-10)
//   importance_e = sum_t weight_te;  load_e = sum_t Phi((logits_te - thr_te) / softplus_te),
//   thr_te = the k-th largest H_t among the experts other than e: the probability, over fresh
//   noise on e alone, that e is in t's top k (differentiable, unlike the count of choices).
// Derivations: docs/moe_backward.md.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "switchyard/core/parallel.h"
#include "switchyard/core/tensor.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/moe/config.h"

namespace sy {

// What some policies need beyond x: token ids (hash routing), a seed (random routing and
// jitter; vary it per step), and whether this is training (jitter is off in evaluation).
struct RouterInput {
  std::span<const int32_t> token_ids;  // [T], for Gating::kHash
  uint64_t seed = 0;
  bool training = true;
  // Set when the batch is spread over several ranks: the balance loss is then of the whole
  // batch (its statistics summed over ranks). Noisy top-k's losses stay per rank.
  const ParallelGroup* parallel = nullptr;
  // The GEMM kernels; the router always runs on their f32 twin (its logits pick the experts, and
  // bf16 rounding would flip near-ties). nullptr: the default f32 backend.
  const Backend* backend = nullptr;
  // [T] or empty: each row's target expert for the guidance loss (cfg.loss_guide_weight);
  // -1: not scored.
  std::span<const int32_t> guide;
};

struct RouterCache {
  Tensor logits;                // [T, E]
  Tensor probs;                 // [T, E]
  Tensor lse;                   // [T]
  std::vector<int32_t> expert;  // [T*k]: slot t*k+j holds token t's j-th choice, best first
  Tensor scores;                // [T, E]: sigmoid(logits), with Gating::kSigmoidBias only
  Tensor choice;                // [T, E]: scores + bias, forward's scratch for the top-k
  Tensor weight;                // [T, k]: combine weights (k = slots per token)
  Tensor noise_logits, noise;   // [T, E]: x w_noise and n ~ N(0, 1), with Gating::kNoisyTopK
  std::vector<int32_t> runner_up;  // [T]: noisy top-k's (k+1)-th expert by H; -1 when k = E
  std::vector<double> importance, load;  // [E]: noisy top-k's balancing statistics
  Tensor jitter, x_jit;         // [T, d]: jitter factors and the jittered input, with jitter
  bool jittered = false;        // whether forward applied the jitter
  std::vector<int32_t> demand;  // [E]: slots that chose each expert
  std::vector<double> balance_grad;  // [E]: d loss_balance / d probs[t, e], equal for all t
  double loss_balance = 0;      // weighted, as added to the training loss
  double loss_z = 0;            // weighted
  std::vector<int32_t> guide;   // [T] or empty: forward's guidance targets
  double loss_guide = 0;        // weighted
  Tensor dprobs, dlogits;       // [T, E]: backward's scratch, kept to avoid reallocation
  Tensor dnoise_logits;         // [T, E]: backward's scratch (noisy top-k)
  const Backend* backend = nullptr;  // forward's f32 kernels, for backward
};

class Router {
 public:
  explicit Router(const MoeConfig& cfg);  // cfg must already be validated

  // w_gate: [d, E], x: [T, d] -> cache (expert, weight, losses, ...). bias: [E] or empty (zero);
  // used by Gating::kSigmoidBias for the choice of experts only. w_noise: [d, E], needed by
  // Gating::kNoisyTopK only.
  template <class T>
  void forward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& cache,
               std::span<const T> bias = {}, const RouterInput& in = {},
               ConstMatrixView<T> w_noise = {}) const;

  // dweight: [T, k] (gradient of the task loss w.r.t. the combine weights). Adds the gradients
  // of the auxiliary losses. dw_gate: [d, E] (+=), dx: [T, d] (=), dw_noise: [d, E] (+=, noisy
  // top-k only).
  template <class T>
  void backward(ConstMatrixView<T> w_gate, ConstMatrixView<T> x, RouterCache& cache,
                ConstMatrixView<T> dweight, MatrixView<T> dw_gate, MatrixView<T> dx,
                ConstMatrixView<T> w_noise = {}, MatrixView<T> dw_noise = {}) const;

 private:
  // Sigmoid gating and softmax top-k normalise the chosen scores when cfg.renormalize.
  bool normalises_weights() const {
    return (cfg_.gating == Gating::kSigmoidBias || cfg_.gating == Gating::kSoftmaxTopK) &&
           cfg_.renormalize;
  }
  // Rows with a guidance target, when the guidance loss is on; 0 otherwise.
  int64_t guided_rows(const RouterCache& c) const {
    if (cfg_.loss_guide_weight == 0) return 0;
    int64_t n = 0;
    for (int32_t e : c.guide) n += e >= 0;
    return n;
  }
  bool uses_balance_loss() const {
    return cfg_.gating == Gating::kSoftmaxTopK || cfg_.gating == Gating::kSigmoidBias;
  }
  // loss_balance and balance_grad from c.demand and c.probs.
  template <class T>
  void balance_loss(RouterCache& c, const RouterInput& in) const;
  // Scores outside the token's topk_groups best groups set to -inf (group-limited routing).
  template <class T>
  void limit_groups(MatrixView<T> scores) const;
  // Noisy top-k's choice, weights and losses (forward), and its gradient to the clean logits
  // (dlogits, =) and the noise logits (c.dnoise_logits, =).
  template <class T>
  void noisy_topk_forward(ConstMatrixView<T> xr, ConstMatrixView<T> w_noise, RouterCache& c,
                          const RouterInput& in) const;
  template <class T>
  void noisy_topk_backward(RouterCache& c, ConstMatrixView<T> dweight,
                           MatrixView<T> dlogits) const;

  MoeConfig cfg_;
};

}  // namespace sy
