// Decoder-only transformer language model with MoE feed-forward layers:
//   x = embed[tokens]
//   per layer:  x += attention(rmsnorm(x));  x += ffn(rmsnorm(x))   (ffn: MoE or dense SwiGLU)
//   logits = rmsnorm(x) lm_head;  loss = mean cross-entropy against the next tokens
// Forward fills an LmCache; backward reads it and adds the gradient of (loss + the MoE layers'
// weighted auxiliary losses) into a parameter set of the same type.
//
//   LanguageModel model(cfg);                       // throws ConfigError
//   LmParams p = init_lm_params(cfg, DType::kF32, seed), g = zeros_like(p);
//   LmStep s = model.forward(p, tokens, targets, n_seq, cache, ctx);
//   model.backward(p, cache, g, ctx);
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/config.h"
#include "switchyard/moe/experts.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/nn/attention.h"

namespace sy {

struct LmConfig {
  int64_t vocab = 256;    // byte-level
  int64_t context = 256;  // longest sequence
  int64_t d_model = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  // Which layers have an MoE feed-forward: layer i (from 0) when moe_every > 0 and
  // (i + 1) % moe_every == 0 (1: every layer, 2: every second); the others a dense SwiGLU of
  // width d_ff. 0: a dense model.
  int64_t moe_every = 1;
  int64_t d_ff = 1024;
  MoeConfig moe;  // moe.d_model is set from d_model
  // GEMM precision (kernels/backend.h): f32; bf16 (bf16 GEMM inputs, f32 accumulation, f32
  // weights and optimizer state); auto (the faster of the two on the CPU it runs on).
  Precision precision = Precision::kF32;

  void validate() const;  // throws ConfigError naming `model.<field>` or `moe.<field>`
  bool is_moe(int64_t layer) const { return moe_every > 0 && (layer + 1) % moe_every == 0; }
  AttentionConfig attention() const;
  MoeConfig moe_config() const;
  int64_t n_moe_layers() const;
  // Weights that one token multiplies by in forward (embedding lookup excluded): the FLOP count
  // of training is about 6 of these per token, plus attention.
  int64_t active_params() const;
  int64_t total_params() const;
  int64_t router_params() const;  // per MoE layer: w_gate, and w_noise with noisy top-k
  // Multiply-adds of attention scores and values per token at full context, summed over layers
  // (the causal half is not subtracted: the kernels compute the whole square).
  int64_t attention_macs_per_token() const;
};

struct LayerParams {
  Tensor norm_attn;  // [d]
  AttentionParams attn;
  Tensor norm_ffn;    // [d]
  MoeParams moe;      // MoE layers
  Tensor w1, w3, w2;  // dense layers: [d, f], [d, f], [f, d]
};

struct LmParams {
  Tensor embed;  // [V, d]
  std::vector<LayerParams> layers;
  Tensor norm_out;  // [d]
  Tensor lm_head;   // [d, V]

  // Every non-empty tensor with its checkpoint name ("layers.0.attn.w_qkv"), in a fixed order.
  std::vector<std::pair<std::string, Tensor*>> named();
  std::vector<std::pair<std::string, const Tensor*>> named() const;
};

LmParams init_lm_params(const LmConfig& cfg, DType dtype, uint64_t seed);
LmParams zeros_like(const LmParams& p);

// Parameters for decoding on a bf16 backend: the routed experts' weights (moe.w1/w3/w2 of every
// MoE layer) rounded to bf16 once, everything else copied as is. A decode step streams each
// touched expert's weights once, and past about E/k sequences every expert is touched every
// step, so the expert bank is most of what a batched step reads: bf16 halves it. The router,
// attention, norms and embeddings stay f32. Only decode and decode_batch take these (bf16
// weights have no gradients).
LmParams bf16_expert_params(const LmParams& p);
// Whether decoding on `backend` reads the routed experts that way: on a bf16 backend.
bool decodes_with_bf16_experts(const Backend* backend);

struct LayerCache {
  Tensor x_attn, x_ffn;        // [T, d] residual stream entering each half
  Tensor h_attn, h_ffn, out;   // [T, d] normalised inputs and a sublayer's output
  Tensor rstd_attn, rstd_ffn;  // [T]
  AttentionCache attn;
  MoeCache moe;
  ExpertsCache ffn;
  // Attention by segments (the multimodal model): one cache per segment, and the segment's rows.
  std::vector<AttentionCache> segment_attn;
  Tensor segment_in, segment_out;
};

struct LmCache {
  std::vector<int32_t> targets;
  int64_t n_targets = 0;
  std::vector<int32_t> tokens;
  std::vector<LayerCache> layers;
  Tensor x_out, h_out, rstd_out;  // final norm
  Tensor logits;                  // [T, V]; backward turns it into dlogits
  Tensor dx, dh, dsub;            // [T, d] backward scratch
};

struct LmStep {
  double loss = 0;  // mean cross-entropy over the targets, in nats
  double aux = 0;   // sum of the MoE layers' weighted auxiliary losses
  int64_t n_targets = 0;
  std::vector<RoutingStats> routing;  // one per MoE layer, in layer order
};

struct DecodeState {
  std::vector<KvCache> kv;  // one per layer
  int64_t n_pos() const { return kv.empty() ? 0 : kv.front().n_pos; }
};

// What the MoE layers did with the rows of one decode_batch call (rows: every sequence's new
// tokens, sequence after sequence).
struct DecodeRouting {
  std::vector<RoutingStats> layers;        // one per MoE layer, in layer order
  std::vector<std::vector<int32_t>> top1;  // [MoE layer][row]: the expert of the first choice
};

class LanguageModel {
 public:
  explicit LanguageModel(const LmConfig& cfg);  // throws ConfigError
  const LmConfig& config() const { return cfg_; }

  // tokens, targets: [n_seq * L], sequences one after another, L <= context; a target < 0 is
  // not scored. Throws ShapeError for a token outside [0, vocab) or a bad length.
  LmStep forward(const LmParams& p, std::span<const int32_t> tokens,
                 std::span<const int32_t> targets, int64_t n_seq, LmCache& cache,
                 const ExecContext& ctx) const;
  // g += d(loss + aux)/dparams for the forward just before.
  void backward(const LmParams& p, LmCache& cache, LmParams& g, const ExecContext& ctx) const;

  // Generation: feeds tokens at the next positions of one sequence and returns the logits of
  // the last one. logits: [V]. Throws ShapeError past the context.
  DecodeState start(DType dtype) const;
  void decode(const LmParams& p, std::span<const int32_t> tokens, DecodeState& state,
              std::vector<float>& logits, const ExecContext& ctx) const;
  // Several sequences in one step (continuous batching): sequence i feeds tokens[i] (one or
  // more) at its next positions in *states[i]. Every projection, the MoE and the dense layers
  // take every sequence's rows at once, so each weight is read once per step; only attention
  // over the cache runs per sequence. logits: [n_seq, V], each sequence's last position. routing,
  // when given, receives what the MoE layers did. With a dropless MoE config each sequence's logits
  // are what decode() gives it alone.
  void decode_batch(const LmParams& p, std::span<const std::span<const int32_t>> tokens,
                    std::span<DecodeState* const> states, Tensor& logits, const ExecContext& ctx,
                    DecodeRouting* routing = nullptr) const;

  // Throws ShapeError naming the tensor; ep_size > 1: expert weights hold E / ep_size experts.
  // for_decode: routed expert weights may also be bf16 (bf16_expert_params).
  void check_params(const LmParams& p, int64_t ep_size = 1, bool for_decode = false) const;

 private:
  template <class T>
  LmStep forward_impl(const LmParams& p, int64_t n_seq, LmCache& c, const ExecContext& ctx) const;
  template <class T>
  void backward_impl(const LmParams& p, LmCache& c, LmParams& g, const ExecContext& ctx) const;

  LmConfig cfg_;
  Attention attention_;
  std::optional<MoeLayer> moe_;  // none in a dense model
};

}  // namespace sy
