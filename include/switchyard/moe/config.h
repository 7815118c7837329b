// Configuration of one MoE layer. validate() is the one place bad values are caught: it throws
// ConfigError naming the field (as `moe.<field>`), the value and the accepted range.
#pragma once

#include <cstdint>

namespace sy {

// How the router turns logits into a choice of experts and their weights.
//   kSoftmaxTopK: top-k of softmax(logits); weights the chosen probabilities (see renormalize).
//     With top_k = 1, renormalize = false and jitter_eps > 0 it is the Switch Transformer router.
//   kSigmoidBias: scores s = sigmoid(logits); top-k of s + expert_bias chooses, the weights are
//     the chosen s, normalised to sum to 1 when renormalize (DeepSeek-V3's norm_topk_prob);
//     the bias never enters the weights or the gradient, and MoeLayer::update_bias moves it
//     against the observed load (DeepSeek-V3's auxiliary-loss-free balancing).
//   kExpertChoice: each expert takes the C tokens with the highest softmax probability for it
//     (Zhou et al. 2022), C = capacity(T); a token may get several experts or none; weights are
//     the probabilities. Balanced by construction, but a token's routing depends on the other
//     tokens of the batch (in a causal LM, on later ones too).
//   kHash: token id t goes to experts h(t), h(t)+1, ... (mod E), weight 1/k (Roller et al.
//     2021); needs token ids, not trained.
//   kRandom: k distinct experts drawn at random per token and call, weight 1/k; a baseline.
//   kNoisyTopK: Shazeer et al. 2017. H = x w_gate + n * softplus(x w_noise), n ~ N(0, 1) in
//     training (no noise in evaluation); top-k of H chooses, the weights are the softmax of the
//     k chosen H. Balanced by its own two losses (loss_importance_weight, loss_load_weight)
//     instead of the Switch loss.
enum class Gating { kSoftmaxTopK, kSigmoidBias, kExpertChoice, kHash, kRandom, kNoisyTopK };

struct MoeConfig {
  int64_t d_model = 0;    // token width d
  int64_t d_ff = 0;       // hidden width f of each SwiGLU expert
  int64_t n_experts = 0;  // E
  int64_t top_k = 2;      // experts per token, 1..E
  Gating gating = Gating::kSoftmaxTopK;
  // Rescale the k chosen probabilities (or sigmoid scores) to sum to 1 (Mixtral, DeepSeek-V3);
  // off: the raw values (Switch, GShard's first expert, OLMoE). With top_k = 1 a renormalised
  // weight is always 1, so the router gets no gradient from the task loss, only from the
  // auxiliary losses: top-1 routers want renormalize = false.
  bool renormalize = true;
  // Rows an expert takes: ceil(factor * T * k / E). Train and eval differ as in Switch
  // Transformer: a larger eval factor drops fewer tokens at inference.
  double capacity_factor_train = 1.25;
  double capacity_factor_eval = 2.0;
  bool dropless = false;  // no capacity: every chosen slot is computed
  // Batch prioritized routing (V-MoE, Riquelme et al. 2021): when capacity binds, tokens with
  // the highest top-1 router probability keep their slots first, still choice by choice.
  // Off: token order within each choice.
  bool batch_prioritized = false;
  // Multiplicative jitter on the router input in training, x * U(1 - eps, 1 + eps) (Switch
  // Transformer); 0: off.
  double jitter_eps = 0.0;
  // Group-limited routing (DeepSeek-V3): the experts form n_groups equal groups; each token
  // keeps the topk_groups groups with the highest group score (the sum of the group's two
  // highest scores) and picks its top-k experts inside them. 0: off.
  int64_t n_groups = 0;
  int64_t topk_groups = 0;
  // Shared experts (DeepSeekMoE): SwiGLU experts of width d_ff_shared (0: d_ff) that every
  // token passes through with weight 1, beside its routed experts. 0: none.
  int64_t n_shared_experts = 0;
  int64_t d_ff_shared = 0;
  // Weights of the auxiliary losses added to the training loss (0 turns one off).
  double loss_balance_weight = 0.01;  // Switch load-balancing loss, E * sum_e f_e P_e
  double loss_z_weight = 0.001;       // router z-loss, mean_t logsumexp(logits_t)^2
  // kNoisyTopK's losses: CV(v)^2 (variance / mean^2 over experts) of the importance
  // v_e = sum_t weight_te, and of the smooth load v_e = sum_t P(token t picks e); see router.h.
  double loss_importance_weight = 0.01;
  double loss_load_weight = 0.01;
  // Router guidance (Mobile V-MoE's super-class routing): when the caller gives each routed row
  // a target expert, loss_guide_weight * mean cross-entropy of softmax(logits) against it.
  double loss_guide_weight = 0.0;
  // kSigmoidBias: step of each bias update, b_e += rate * sign(mean load - load_e).
  double bias_update_rate = 0.001;

  void validate() const;
  // Throws ConfigError for a layer that validate() accepts for inference but that cannot learn
  // its routing: a top-1 router whose one weight is always 1 (softmax top-k or sigmoid
  // renormalised, noisy top-k's softmax over the chosen logit), so the task loss gives it no
  // gradient, unless a guidance target trains it (`guided`).
  void check_trainable(bool guided) const;
  // Rows each expert takes for n_tokens tokens; -1 means unbounded (dropless).
  int64_t capacity(int64_t n_tokens, bool training) const;
  int64_t shared_width() const { return d_ff_shared > 0 ? d_ff_shared : d_ff; }
  // Routing slots per token: top_k, or every expert under expert choice (most stay empty).
  int64_t slots_per_token() const { return gating == Gating::kExpertChoice ? n_experts : top_k; }
  // Whether the router's weights get gradients (hash and random routing never use them).
  bool router_trained() const { return gating != Gating::kHash && gating != Gating::kRandom; }
};

}  // namespace sy
