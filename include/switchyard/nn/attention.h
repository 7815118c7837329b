// Causal multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021).
//   qkv = x w_qkv; q, k rotated by their position; per head  P = causal_softmax(q k^T / sqrt(dh)),
//   o = P v; heads concatenated; y = o w_o.
// RoPE rotates the pair (i, i + dh/2) of each head by the angle pos * theta^(-2i/dh).
// AttentionConfig::causal = false and rope = false give a vision encoder's attention instead:
// P = softmax(q k^T / sqrt(dh)) over the whole sequence, q and k unrotated.
// Backward (docs/transformer_backward.md) keeps P from forward, so it recomputes nothing.
//
//   Attention attn({.d_model = 256, .n_heads = 4, .max_context = 256});
//   attn.forward(p, x, /*n_seq=*/B, y, cache, ctx);  // x, y: [B*L, d], sequences one after another
//   attn.backward(p, cache, dy, g, dx, ctx);         // g += ..., dx = ...
//   attn.decode(p, x_new, kv, y_new, ctx);            // generation: appends to the KV cache
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/kernels/backend.h"

namespace sy {

struct AttentionConfig {
  int64_t d_model = 0;
  int64_t n_heads = 1;      // d_model / n_heads is the head width dh, which must be even
  int64_t max_context = 0;  // longest sequence (RoPE table size, KV cache length)
  double rope_theta = 10000.0;
  // A language model's attention is causal with RoPE; a vision encoder's (ViT) attends both ways
  // and takes its positions from learned embeddings added to the input instead.
  bool causal = true;
  bool rope = true;
  void validate() const;  // throws ConfigError naming `model.<field>`
};

struct AttentionParams {
  Tensor w_qkv;  // [d, 3d]: columns [q | k | v], head h at columns h*dh..(h+1)*dh of each
  Tensor w_o;    // [d, d]
};

struct AttentionCache {
  Tensor x;           // [T, d] the input
  Tensor q, k, v;     // [B, H, L, dh] q and k rotated
  Tensor probs;       // [B, H, L, L] causal attention weights
  Tensor o;           // [T, d] heads concatenated
  Tensor qkv, dqkv;   // [T, 3d] scratch
  Tensor dq, dk, dv;  // [B, H, L, dh] backward scratch
  Tensor scratch;     // per thread: one head's o (forward), or dP and do (backward)
  int64_t n_seq = 0;
};

// Keys and values of the positions seen so far, for generating one sequence token by token.
struct KvCache {
  Tensor k, v;        // [H, max_context, dh], k rotated
  int64_t n_pos = 0;  // positions filled
};

class Attention {
 public:
  explicit Attention(const AttentionConfig& cfg);  // throws ConfigError
  const AttentionConfig& config() const { return cfg_; }
  int64_t head_dim() const { return cfg_.d_model / cfg_.n_heads; }

  // x: [n_seq * L, d] -> y: [n_seq * L, d] (=), L <= max_context. f32 or f64.
  void forward(const AttentionParams& p, const Tensor& x, int64_t n_seq, Tensor& y,
               AttentionCache& cache, const ExecContext& ctx) const;
  // dy: [T, d] -> dx: [T, d] (=), g (+=).
  void backward(const AttentionParams& p, AttentionCache& cache, const Tensor& dy,
                AttentionParams& g, Tensor& dx, const ExecContext& ctx) const;

  // n new positions of one sequence: x: [n, d] -> y: [n, d] (=); their keys and values are
  // appended to kv (which start() sized). Throws ShapeError past max_context, ConfigError for
  // bidirectional attention (a later position would change earlier outputs).
  void decode(const AttentionParams& p, const Tensor& x, KvCache& kv, Tensor& y,
              const ExecContext& ctx) const;
  // Several sequences at once: rows [starts[s], starts[s+1]) of x are sequence s's new
  // positions, appended to *kvs[s]. The q/k/v and output projections run over all rows
  // together (the weights are read once per step); attention itself per sequence.
  void decode_batch(const AttentionParams& p, const Tensor& x, std::span<const int64_t> starts,
                    std::span<KvCache* const> kvs, Tensor& y, const ExecContext& ctx) const;
  KvCache start(DType dtype) const;

  void check_params(const AttentionParams& p) const;  // throws ShapeError naming the tensor

 private:
  template <class T>
  void forward_impl(const AttentionParams& p, const Tensor& x, int64_t n_seq, Tensor& y,
                    AttentionCache& c, const Backend& be) const;
  template <class T>
  void backward_impl(const AttentionParams& p, AttentionCache& c, const Tensor& dy,
                     AttentionParams& g, Tensor& dx, const Backend& be) const;
  template <class T>
  void decode_impl(const AttentionParams& p, const Tensor& x, std::span<const int64_t> starts,
                   std::span<KvCache* const> kvs, Tensor& y, const Backend& be) const;

  AttentionConfig cfg_;
  std::vector<double> cos_, sin_;  // [max_context, dh/2]
};

AttentionParams init_attention_params(const AttentionConfig& cfg, DType dtype, uint64_t seed,
                                      double out_scale = 1.0);

}  // namespace sy
