// One pre-norm transformer block, shared by the language model and the vision transformer:
//   x += attention(rmsnorm(x));  x += ffn(rmsnorm(x))   (ffn: the MoE layer or a dense SwiGLU)
// Internal to nn/: the models own the parameters, the caches and the loop over blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/nn/attention.h"
#include "switchyard/nn/model.h"

namespace sy::detail {

// Each MoE layer draws its own random numbers (jitter, random routing): the caller's seed mixed
// with the layer index.
ExecContext layer_context(const ExecContext& ctx, int64_t layer);

// Rows [row0, row0 + n_seq * seq_len) of a block's input, n_seq sequences of seq_len, that
// attend among themselves with their own attention (causal or not); the attention weights are
// the block's either way.
struct AttentionSegment {
  const Attention* attention = nullptr;
  int64_t row0 = 0, n_seq = 0, seq_len = 0;
};

// What a block runs: its attention, and the MoE layer when its feed-forward is one (nullptr: a
// dense SwiGLU in l.w1/w3/w2). With segments (which must cover the rows one after another), the
// attention runs per segment instead, and the feed-forward still over all rows at once: one
// MoE layer over several kinds of sequence (the multimodal model).
struct BlockKind {
  const Attention* attention = nullptr;
  const MoeLayer* moe = nullptr;
  double norm_eps = 1e-5;
  std::span<const AttentionSegment> segments = {};
};

// x: [T, d], n_seq sequences of equal length (unused with segments), updated in place; lc keeps what backward needs.
// token_ids and groups go to the MoE layer (hash routing; routing by groups of rows). Returns
// the MoE layer's losses and statistics (zero and empty for a dense block).
template <class T>
MoeForward block_forward(const BlockKind& kind, const LayerParams& l, Tensor& x, int64_t n_seq,
                         LayerCache& lc, const ExecContext& ctx,
                         std::span<const int32_t> token_ids = {}, const RouteGroups& groups = {});

// dx: [T, d], d loss / d x after the block on entry, before it on return. dh, dsub: [T, d]
// scratch. gl (+=).
template <class T>
void block_backward(const BlockKind& kind, const LayerParams& l, LayerCache& lc, LayerParams& gl,
                    Tensor& dx, Tensor& dh, Tensor& dsub, const ExecContext& ctx);

// A dense SwiGLU is an expert group of one that owns every row.
template <class T>
StackedView<const T> one(const Tensor& w) {
  return {w.data<T>(), 1, w.dim(0), w.dim(1)};
}
template <class T>
StackedView<T> one(Tensor& w) {
  return {w.data<T>(), 1, w.dim(0), w.dim(1)};
}

// One block's non-empty tensors with their checkpoint names (prefix + "attn.w_qkv", ...), in the
// fixed order both models' named() list them.
void append_named(LayerParams& l, const std::string& prefix,
                  std::vector<std::pair<std::string, Tensor*>>& out);

// A block of the same structure, each tensor through f(tensor, routed_expert), routed_expert
// being true for the MoE layer's moe.w1/w3/w2.
template <class F>
LayerParams map_layer(const LayerParams& l, F f) {
  LayerParams z;
  z.norm_attn = f(l.norm_attn, false);
  z.norm_ffn = f(l.norm_ffn, false);
  z.attn = {f(l.attn.w_qkv, false), f(l.attn.w_o, false)};
  const MoeParams& m = l.moe;
  z.moe = {f(m.w_gate, false),    f(m.w1, true),           f(m.w3, true),
           f(m.w2, true),         f(m.expert_bias, false), f(m.shared_w1, false),
           f(m.shared_w3, false), f(m.shared_w2, false),   f(m.w_noise, false)};
  z.w1 = f(l.w1, false);
  z.w3 = f(l.w3, false);
  z.w2 = f(l.w2, false);
  return z;
}

// Initial values: N(0, stddev^2) from Philox(seed, stream), and ones (norm gains), drawn in f64
// and converted, so that an f32 and an f64 model start from the same numbers.
Tensor normal_tensor(std::initializer_list<int64_t> shape, double stddev, uint64_t seed,
                     uint64_t stream, DType dtype);
Tensor ones_tensor(int64_t n, DType dtype);

// A block's initial weights, drawn from layer_seed: unit norm gains, attention and SwiGLU (the
// MoE layer's when moe is given, else a dense one of width d_ff) with the residual branches'
// outputs scaled by out_scale.
LayerParams init_layer_params(const AttentionConfig& attention, const MoeConfig* moe, int64_t d_ff,
                              double out_scale, DType dtype, uint64_t layer_seed);

// Every block's shapes: n_layers of them, norms of width d, the attention's, and the MoE
// layer's where is_moe(i) (moe set), else a dense SwiGLU of width d_ff; throws ShapeError naming
// "layers.<i>.<tensor>".
template <class IsMoe>
void check_layers(const std::vector<LayerParams>& layers, int64_t n_layers, int64_t d,
                  int64_t d_ff, const Attention& attention, const MoeLayer* moe, IsMoe is_moe) {
  if (int64_t(layers.size()) != n_layers)
    throw ShapeError(fmt::format("parameters hold {} layers: expected {} (model.n_layers)",
                                 layers.size(), n_layers));
  for (int64_t i = 0; i < n_layers; ++i) {
    const LayerParams& l = layers[i];
    const std::string at = fmt::format("layers.{}.", i);
    expect_shape(l.norm_attn, {d}, at + "norm_attn");
    expect_shape(l.norm_ffn, {d}, at + "norm_ffn");
    attention.check_params(l.attn);
    if (is_moe(i)) {
      moe->check_params(l.moe);
      if (!l.w1.empty()) throw ShapeError(at + "ffn.w1 is set in an MoE layer");
    } else {
      expect_shape(l.w1, {d, d_ff}, at + "ffn.w1");
      expect_shape(l.w3, {d, d_ff}, at + "ffn.w3");
      expect_shape(l.w2, {d_ff, d}, at + "ffn.w2");
      if (!l.moe.w_gate.empty()) throw ShapeError(at + "moe.w_gate is set in a dense layer");
    }
  }
}

// images: [B, rows * cols * channels] -> patches: [B * Np, P*P*channels], the P x P squares in
// raster order, each flattened (row in patch, column in patch, channel). P divides rows and cols.
template <class T>
void patchify(ConstMatrixView<T> images, int64_t rows, int64_t cols, int64_t channels, int64_t P,
              MatrixView<T> patches) {
  const int64_t per_row = cols / P, np = (rows / P) * per_row, C = channels;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < images.rows; ++b)
    for (int64_t q = 0; q < np; ++q) {
      const int64_t r0 = (q / per_row) * P, c0 = (q % per_row) * P;
      T* out = patches.row(b * np + q);
      for (int64_t i = 0; i < P; ++i)
        std::copy_n(images.row(b) + ((r0 + i) * cols + c0) * C, P * C, out + i * P * C);
    }
}

// dst += src, elementwise, same shape.
template <class T>
void add_into(Tensor& dst, const Tensor& src);

}  // namespace sy::detail
