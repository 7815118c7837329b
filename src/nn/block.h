// One pre-norm transformer block, shared by the language model and the vision transformer:
//   x += attention(rmsnorm(x));  x += ffn(rmsnorm(x))   (ffn: the MoE layer or a dense SwiGLU)
// Internal to nn/: the models own the parameters, the caches and the loop over blocks.
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/exec_context.h"
#include "switchyard/core/tensor.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/nn/attention.h"
#include "switchyard/nn/model.h"

namespace sy::detail {

// Each MoE layer draws its own random numbers (jitter, random routing): the caller's seed mixed
// with the layer index.
ExecContext layer_context(const ExecContext& ctx, int64_t layer);

// What a block runs: its attention, and the MoE layer when its feed-forward is one (nullptr: a
// dense SwiGLU in l.w1/w3/w2).
struct BlockKind {
  const Attention* attention = nullptr;
  const MoeLayer* moe = nullptr;
  double norm_eps = 1e-5;
};

// x: [T, d], n_seq sequences of equal length, updated in place; lc keeps what backward needs.
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

// dst += src, elementwise, same shape.
template <class T>
void add_into(Tensor& dst, const Tensor& src);

}  // namespace sy::detail
