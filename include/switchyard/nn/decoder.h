// Decoder-only transformers as the published MoE models define them (Mixtral, Qwen2-MoE,
// Qwen3-MoE, OLMoE, DeepSeek-V3, and the dense Llama / Qwen2 / Qwen3), for inference:
//   x = embed[tokens]
//   per layer:  x += attention(rmsnorm(x));  x += ffn(rmsnorm(x))
//   logits = rmsnorm(x) lm_head
// Attention is grouped-query (n_kv_heads <= n_heads, head_dim from the config) with optional
// q/k/v biases, q/k RMS norms (per head, or over the full projection), clipping, a sliding
// window per layer and RoPE (default, linear, llama3, yarn; rotate-half or interleaved pairs),
// or DeepSeek's multi-head latent attention (MLA). The feed-forward is a dense SwiGLU or an MoE
// layer (moe/) with optional shared experts, gated by a sigmoid (Qwen2-MoE) or not (DeepSeek),
// and a scale on the routed experts' sum (DeepSeek's routed_scaling_factor).
// io/hf_model.h fills a DecoderConfig and DecoderParams from a Hugging Face model directory.
//
//   DecoderModel model(cfg);                       // throws ConfigError
//   DecoderState s = model.start();
//   model.forward(p, prompt_ids, s, logits, ctx);  // logits: [n, V] for the n new positions
//   model.forward(p, {next}, s, logits, ctx);      // one more position, from the KV cache
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/config.h"
#include "switchyard/moe/moe_layer.h"

namespace sy {

// Rotary position embedding: which frequencies, over which dims of a head. Follows
// transformers' rope_parameters (modeling_rope_utils): inv_freq_i = theta^(-2i/dim), changed
// by the scaling type; cos and sin are multiplied by attention_factor (yarn).
struct RopeConfig {
  std::string type = "default";  // default | linear | llama3 | yarn
  double theta = 10000.0;
  int64_t dim = 0;      // rotated dims of each head (even); 0: the whole qk head
  double factor = 1.0;  // linear, llama3, yarn
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position = 0;                     // llama3, yarn
  double beta_fast = 32.0, beta_slow = 1.0;              // yarn
  double mscale = 0.0, mscale_all_dim = 0.0;             // yarn (DeepSeek)
  double attention_factor = 0.0;                         // yarn; 0: from factor and mscale
  bool truncate = true;                                  // yarn
  // Pairs (2i, 2i+1) rotated together (DeepSeek's rope_interleave) instead of (i, i + dim/2).
  bool interleaved = false;

  void validate() const;  // throws ConfigError naming `rope.<field>`
  // inv_freq: [dim/2] as float32, as transformers computes it, and the cos/sin multiplier.
  std::vector<float> inv_freq() const;
  double cos_sin_scale() const;
};

enum class QkNorm { kNone, kPerHead, kFull };

struct DecoderConfig {
  std::string arch;  // the model_type it came from ("mixtral", ...), for messages
  int64_t vocab = 0, d_model = 0, n_layers = 0;
  int64_t n_heads = 0, n_kv_heads = 0;
  int64_t head_dim = 0;    // q and k width per head (MLA: nope + rope)
  int64_t v_head_dim = 0;  // v width per head
  int64_t max_context = 0;
  double norm_eps = 1e-6;
  RopeConfig rope;
  bool qkv_bias = false, o_bias = false;
  QkNorm qk_norm = QkNorm::kNone;
  double clip_qkv = 0;    // OLMoE: q, k, v clamped to [-clip, clip]; 0: off
  double attn_scale = 0;  // softmax scale of q.k; 0: 1/sqrt(head_dim)
  // Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0:
  //   q = q_b(norm(q_a(x))) (or q_proj(x) with q_lora_rank 0), per head [nope | rope];
  //   [c | k_rope] = kv_a(x); [k_nope | v] per head = kv_b(norm(c)); k = [k_nope | k_rope].
  int64_t q_lora_rank = 0, kv_lora_rank = 0, qk_nope_dim = 0, qk_rope_dim = 0;
  std::vector<int64_t> window;  // [n_layers]: sliding window (keys j > i - w), 0: full
  std::vector<char> moe_layer;  // [n_layers]: MoE feed-forward, or dense SwiGLU of width d_ff
  int64_t d_ff = 0;
  MoeConfig moe;                // d_ff is the expert width; n_shared_experts stays 0 (below)
  double routed_scaling = 1.0;  // the routed experts' sum is multiplied by it (DeepSeek)
  int64_t shared_ff = 0;        // a shared SwiGLU expert of this width beside the routed ones
  bool shared_gate = false;     // its output multiplied by sigmoid(x w_shared_gate) (Qwen2-MoE)
  bool tie_embeddings = false;

  bool mla() const { return kv_lora_rank > 0; }
  void validate() const;  // throws ConfigError naming the field
  int64_t n_moe_layers() const;
  // Weights a token multiplies by per layer (attention and the k experts it uses, plus shared).
  int64_t active_params() const;
  int64_t total_params() const;
};

// Weights in Switchyard's layout: a projection is [in, out] (x w), experts stacked [E, in, out].
// Matrices keep the dtype they had in the file (f32 or bf16); norms, biases and the router are
// f32. Empty tensors are the parts an architecture does not have.
struct DecoderLayerParams {
  Tensor norm_attn, norm_ffn;  // [d]
  Tensor wq, wk, wv, wo;       // [d, H*dh], [d, Hkv*dh], [d, Hkv*dv], [H*dv, d]
  Tensor bq, bk, bv, bo;       // biases, when qkv_bias / o_bias
  Tensor q_norm, k_norm;       // [dh] (per head) or [H*dh] / [Hkv*dh] (full width)
  // MLA: wq_a [d, rq], q_a_norm [rq], wq_b [rq, H*dh] (or wq [d, H*dh] when rq = 0),
  // wkv_a [d, rkv + dr], kv_a_norm [rkv], wkv_b [rkv, H*(dn + dv)]; wo as above.
  Tensor wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wkv_b;
  Tensor w1, w3, w2;                       // dense SwiGLU: [1, d, f], [1, d, f], [1, f, d]
  MoeParams moe;                           // w_gate [d, E], w1/w3/w2 [E, ...], expert_bias [E]
  Tensor shared_w1, shared_w3, shared_w2;  // [1, d, g], [1, d, g], [1, g, d]
  Tensor shared_gate;                      // [d, 1]
};

struct DecoderParams {
  Tensor embed;  // [V, d]
  std::vector<DecoderLayerParams> layers;
  Tensor norm_out;        // [d]
  Tensor lm_head;         // [d, V]
  int64_t bytes() const;  // of every tensor
};

// One sequence's keys and values so far, every layer. Rows are positions: k [pos, Hkv, dh].
struct DecoderState {
  struct Layer {
    std::vector<float> k, v;
  };
  std::vector<Layer> layers;
  int64_t n_pos = 0;
};

// Wall seconds of the last forward's phases, summed over layers, when ExecContext::profile is
// set: attention's projections (with norms and RoPE), the attention itself, its output
// projection, the MoE layers (moe: their router, gather, experts and combine), the dense and
// shared feed-forwards, and the LM head.
struct DecoderTimes {
  double qkv = 0, attend = 0, out_proj = 0, dense_ffn = 0, shared = 0, lm_head = 0;
  MoeTimes moe;
  double moe_total = 0;
};

// Scratch reused between calls (no allocation in the steady state of decoding).
struct DecoderScratch {
  Tensor x, h, q, k, v, o, y, a, b, c, latent, kv, last;
  Tensor logits_all;
  MoeCache moe;
  ExpertsCache experts;
  std::vector<float> probs;
};

// Softmax attention of one sequence's n new queries, at positions first .. first + n - 1, over
// its cached keys and values at positions 0 .. first + n - 1: causal and, when window > 0,
// limited to each query's last `window` positions. Query head h reads kv head
// h / (n_heads / n_kv_heads). Scores are scale * q.k in float32 and the softmax is float32, as
// transformers' eager attention computes them. Long runs of queries take f32 GEMMs (be.f32) per
// (kv head, block of 64 positions); a few queries (decoding) take one pass over the keys per
// head.
//   q: [n, H, dk], k: [first + n, Hkv, dk], v: [first + n, Hkv, dv] -> o: [n, H, dv] (=)
struct AttentionShape {
  int64_t n_heads = 0, n_kv_heads = 0, dk = 0, dv = 0, window = 0;
  float scale = 1;
};
void cached_attention(const AttentionShape& s, const float* q, int64_t n, int64_t first,
                      const float* k, const float* v, float* o, const Backend& be);

class DecoderModel {
 public:
  explicit DecoderModel(const DecoderConfig& cfg);  // throws ConfigError
  const DecoderConfig& config() const { return cfg_; }

  DecoderState start() const;
  // Feeds tokens at the next positions of one sequence; logits: [n, V] (=), one row per new
  // position, or [1, V] for the last one only when !all_positions (generation: the LM head is
  // then one skinny product instead of n rows). Throws ShapeError for a token outside
  // [0, vocab) or past max_context.
  void forward(const DecoderParams& p, std::span<const int32_t> tokens, DecoderState& s,
               Tensor& logits, const ExecContext& ctx, bool all_positions = true) const;
  // Several sequences in one call (continuous batching): sequence i feeds tokens[i] at its next
  // positions in *states[i]. Projections, norms and the feed-forward layers (the MoE's experts
  // each read once for all the rows that chose them) take every sequence's rows at once;
  // attention runs per row over its own sequence's cache. logits: [n_seq, V] (=), each
  // sequence's last position. Each sequence's logits are those forward() gives it alone, up to
  // the GEMMs' rounding at different row counts (dropless MoE: routing is per token).
  void forward_batch(const DecoderParams& p, std::span<const std::span<const int32_t>> tokens,
                     std::span<DecoderState* const> states, Tensor& logits,
                     const ExecContext& ctx) const;
  // Routing of the last forward: one RoutingStats per MoE layer, in layer order.
  const std::vector<RoutingStats>& last_routing() const { return routing_; }
  // [MoE layer][row * k + j] of the last forward: every expert each row chose, in rank order.
  const std::vector<std::vector<int32_t>>& last_experts() const { return experts_; }
  // [MoE layer][row] of the last forward: each row's first-choice expert (of last_experts).
  std::vector<std::vector<int32_t>> last_top1() const;
  // Phases of the last forward (zeros unless it ran with ExecContext::profile).
  const DecoderTimes& last_times() const { return times_; }

  void check_params(const DecoderParams& p) const;  // throws ShapeError naming the tensor

 private:
  // The rows of one call: row i belongs to sequence seq[i] at position pos[i]; sequence q's rows
  // are [start[q], start[q + 1]).
  struct Rows {
    std::span<DecoderState* const> states;
    std::vector<int32_t> seq;
    std::vector<int64_t> pos, start;
    int64_t n() const { return int64_t(seq.size()); }
  };
  // Every layer over the rows; leaves the final norm's output in scratch_.h and advances the
  // states.
  void forward_rows(const DecoderParams& p, std::span<const std::span<const int32_t>> tokens,
                    std::span<DecoderState* const> states, const ExecContext& ctx) const;
  void attention(const DecoderLayerParams& lp, int64_t layer, const Rows& rows, DecoderScratch& sc,
                 const ExecContext& ctx) const;
  void feed_forward(const DecoderLayerParams& lp, int64_t layer, int64_t n, DecoderScratch& sc,
                    const ExecContext& ctx) const;

  DecoderConfig cfg_;
  std::vector<float> inv_freq_;
  float rope_scale_ = 1;
  std::optional<MoeLayer> moe_;
  mutable DecoderScratch scratch_;
  mutable std::vector<RoutingStats> routing_;
  mutable std::vector<std::vector<int32_t>> experts_;
  mutable DecoderTimes times_;
};

}  // namespace sy
