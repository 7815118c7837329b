// The pre-norm block of nn/block.h. Derivation of the backward: docs/transformer_backward.md.
#include "nn/block.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy::detail {

namespace {

template <class T>
void copy_into(Tensor& dst, const Tensor& src) {
  dst.resize(src.shape(), src.dtype());
  std::memcpy(dst.data<T>(), src.data<T>(), src.nbytes());
}

// Rows [r0, r0 + rows) of src into dst (resized), or of src into rows [r0, ...) of dst.
template <class T>
void copy_rows_out(const Tensor& src, int64_t r0, int64_t rows, Tensor& dst) {
  const int64_t d = src.dim(1);
  dst.resize_for_overwrite({rows, d}, src.dtype());
  std::memcpy(dst.data<T>(), src.data<T>() + r0 * d, size_t(rows * d) * sizeof(T));
}
template <class T>
void copy_rows_in(const Tensor& src, Tensor& dst, int64_t r0) {
  const int64_t d = dst.dim(1);
  std::memcpy(dst.data<T>() + r0 * d, src.data<T>(), src.nbytes());
}

// y = attention(h) over all rows, or segment by segment.
template <class T>
void attention_forward(const BlockKind& kind, const LayerParams& l, const Tensor& h, int64_t n_seq,
                       LayerCache& lc, Tensor& y, const ExecContext& ctx) {
  if (kind.segments.empty()) return kind.attention->forward(l.attn, h, n_seq, y, lc.attn, ctx);
  y.resize_for_overwrite({h.dim(0), h.dim(1)}, h.dtype());
  lc.segment_attn.resize(kind.segments.size());
  int64_t next = 0;
  for (size_t s = 0; s < kind.segments.size(); ++s) {
    const AttentionSegment& seg = kind.segments[s];
    const int64_t rows = seg.n_seq * seg.seq_len;
    SY_CHECK(seg.row0 == next, "attention segment {} starts at row {}: expected {}", s, seg.row0, next);
    next += rows;
    if (rows == 0) continue;
    copy_rows_out<T>(h, seg.row0, rows, lc.segment_in);
    seg.attention->forward(l.attn, lc.segment_in, seg.n_seq, lc.segment_out, lc.segment_attn[s], ctx);
    copy_rows_in<T>(lc.segment_out, y, seg.row0);
  }
  SY_CHECK(next == h.dim(0), "attention segments cover {} rows of {}", next, h.dim(0));
}

// dx = d loss / d h for dy = d loss / d attention(h); gl.attn +=.
template <class T>
void attention_backward(const BlockKind& kind, const LayerParams& l, LayerCache& lc,
                        LayerParams& gl, const Tensor& dy, Tensor& dx, const ExecContext& ctx) {
  if (kind.segments.empty()) return kind.attention->backward(l.attn, lc.attn, dy, gl.attn, dx, ctx);
  dx.resize_for_overwrite({dy.dim(0), dy.dim(1)}, dy.dtype());
  for (size_t s = 0; s < kind.segments.size(); ++s) {
    const AttentionSegment& seg = kind.segments[s];
    const int64_t rows = seg.n_seq * seg.seq_len;
    if (rows == 0) continue;
    copy_rows_out<T>(dy, seg.row0, rows, lc.segment_in);
    seg.attention->backward(l.attn, lc.segment_attn[s], lc.segment_in, gl.attn, lc.segment_out, ctx);
    copy_rows_in<T>(lc.segment_out, dx, seg.row0);
  }
}

}  // namespace

ExecContext layer_context(const ExecContext& ctx, int64_t layer) {
  ExecContext c = ctx;
  c.seed = (ctx.seed ^ 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull + uint64_t(layer);
  return c;
}

void append_named(LayerParams& l, const std::string& at,
                  std::vector<std::pair<std::string, Tensor*>>& out) {
  auto add = [&](std::string name, Tensor& t) {
    if (!t.empty()) out.emplace_back(std::move(name), &t);
  };
  add(at + "norm_attn", l.norm_attn);
  add(at + "attn.w_qkv", l.attn.w_qkv);
  add(at + "attn.w_o", l.attn.w_o);
  add(at + "norm_ffn", l.norm_ffn);
  add(at + "moe.w_gate", l.moe.w_gate);
  add(at + "moe.w1", l.moe.w1);
  add(at + "moe.w3", l.moe.w3);
  add(at + "moe.w2", l.moe.w2);
  add(at + "moe.expert_bias", l.moe.expert_bias);
  add(at + "moe.w_noise", l.moe.w_noise);
  add(at + "moe.shared_w1", l.moe.shared_w1);
  add(at + "moe.shared_w3", l.moe.shared_w3);
  add(at + "moe.shared_w2", l.moe.shared_w2);
  add(at + "ffn.w1", l.w1);
  add(at + "ffn.w3", l.w3);
  add(at + "ffn.w2", l.w2);
}

Tensor normal_tensor(std::initializer_list<int64_t> shape, double stddev, uint64_t seed,
                     uint64_t stream, DType dtype) {
  Tensor t(shape, DType::kF64);
  fill_normal(t.span<double>(), Philox(seed, stream), stddev);
  return convert(t, dtype);
}

Tensor ones_tensor(int64_t n, DType dtype) {
  Tensor t({n}, DType::kF64);
  for (double& v : t.span<double>()) v = 1.0;
  return convert(t, dtype);
}

LayerParams init_layer_params(const AttentionConfig& attention, const MoeConfig* moe, int64_t d_ff,
                              double out_scale, DType dtype, uint64_t layer_seed) {
  const int64_t d = attention.d_model;
  auto normal = [&](std::initializer_list<int64_t> shape, double stddev, uint64_t stream) {
    return normal_tensor(shape, stddev, layer_seed, stream, dtype);
  };
  auto ones = [&](int64_t n) { return ones_tensor(n, dtype); };
  auto scaled = [&](Tensor t, double s) {
    Tensor w = convert(t, DType::kF64);
    for (double& v : w.span<double>()) v *= s;
    return convert(w, dtype);
  };
  LayerParams l;
  l.norm_attn = ones(d);
  l.norm_ffn = ones(d);
  l.attn = init_attention_params(attention, dtype, layer_seed, out_scale);
  if (moe != nullptr) {
    l.moe = init_moe_params(*moe, dtype, layer_seed + 17);
    l.moe.w2 = scaled(std::move(l.moe.w2), out_scale);
    if (!l.moe.shared_w2.empty()) l.moe.shared_w2 = scaled(std::move(l.moe.shared_w2), out_scale);
  } else {
    l.w1 = normal({d, d_ff}, 1.0 / std::sqrt(double(d)), 2);
    l.w3 = normal({d, d_ff}, 1.0 / std::sqrt(double(d)), 3);
    l.w2 = normal({d_ff, d}, out_scale / std::sqrt(double(d_ff)), 4);
  }
  return l;
}

template <class T>
void add_into(Tensor& dst, const Tensor& src) {
  T* d = dst.data<T>();
  const T* s = src.data<T>();
  const int64_t n = dst.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) d[i] += s[i];
}

template <class T>
MoeForward block_forward(const BlockKind& kind, const LayerParams& l, Tensor& x, int64_t n_seq,
                         LayerCache& lc, const ExecContext& ctx,
                         std::span<const int32_t> token_ids, const RouteGroups& groups) {
  const int64_t n = x.dim(0), d = x.dim(1);
  const DType dt = dtype_of<T>();
  const T eps = T(kind.norm_eps);
  copy_into<T>(lc.x_attn, x);
  lc.h_attn.resize({n, d}, dt);
  lc.rstd_attn.resize({n}, dt);
  cpu::rmsnorm<T>(x.matrix<T>(), l.norm_attn.span<T>(), eps, lc.h_attn.matrix<T>(),
                  lc.rstd_attn.span<T>());
  attention_forward<T>(kind, l, lc.h_attn, n_seq, lc, lc.out, ctx);
  add_into<T>(x, lc.out);

  copy_into<T>(lc.x_ffn, x);
  lc.h_ffn.resize({n, d}, dt);
  lc.rstd_ffn.resize({n}, dt);
  cpu::rmsnorm<T>(x.matrix<T>(), l.norm_ffn.span<T>(), eps, lc.h_ffn.matrix<T>(),
                  lc.rstd_ffn.span<T>());
  MoeForward mf;
  if (kind.moe != nullptr) {
    mf = kind.moe->forward(l.moe, lc.h_ffn, lc.out, lc.moe, ctx, token_ids, groups);
  } else {
    lc.out.resize({n, d}, dt);
    const std::vector<int32_t> all = {0, int32_t(n)};
    experts_forward<T>(backend_of(ctx), one<T>(l.w1), one<T>(l.w3), one<T>(l.w2),
                       lc.h_ffn.matrix<T>(), all, lc.out.matrix<T>(), lc.ffn);
  }
  add_into<T>(x, lc.out);
  return mf;
}

template <class T>
void block_backward(const BlockKind& kind, const LayerParams& l, LayerCache& lc, LayerParams& gl,
                    Tensor& dx, Tensor& dh, Tensor& dsub, const ExecContext& ctx) {
  const int64_t n = dx.dim(0), d = dx.dim(1);
  const DType dt = dtype_of<T>();
  // x_out = x_ffn + ffn(rmsnorm(x_ffn)): dx passes through and gains the branch's part.
  if (kind.moe != nullptr) {
    kind.moe->backward(l.moe, lc.moe, dx, gl.moe, dh, ctx);
  } else {
    dh.resize({n, d}, dt);
    const std::vector<int32_t> all = {0, int32_t(n)};
    experts_backward<T>(backend_of(ctx), one<T>(l.w1), one<T>(l.w3), one<T>(l.w2),
                        lc.h_ffn.matrix<T>(), all, dx.matrix<T>(), lc.ffn, one<T>(gl.w1),
                        one<T>(gl.w3), one<T>(gl.w2), dh.matrix<T>());
  }
  dsub.resize({n, d}, dt);
  cpu::rmsnorm_backward<T>(lc.x_ffn.matrix<T>(), l.norm_ffn.span<T>(), lc.rstd_ffn.span<T>(),
                           dh.matrix<T>(), dsub.matrix<T>(), gl.norm_ffn.span<T>());
  add_into<T>(dx, dsub);
  // x_ffn = x_attn + attention(rmsnorm(x_attn)).
  attention_backward<T>(kind, l, lc, gl, dx, dh, ctx);
  cpu::rmsnorm_backward<T>(lc.x_attn.matrix<T>(), l.norm_attn.span<T>(), lc.rstd_attn.span<T>(),
                           dh.matrix<T>(), dsub.matrix<T>(), gl.norm_attn.span<T>());
  add_into<T>(dx, dsub);
}

#define SY_INSTANTIATE_BLOCK(T)                                                                \
  template void add_into<T>(Tensor&, const Tensor&);                                           \
  template MoeForward block_forward<T>(const BlockKind&, const LayerParams&, Tensor&, int64_t, \
                                       LayerCache&, const ExecContext&,                        \
                                       std::span<const int32_t>, const RouteGroups&);          \
  template void block_backward<T>(const BlockKind&, const LayerParams&, LayerCache&,           \
                                  LayerParams&, Tensor&, Tensor&, Tensor&, const ExecContext&);
SY_INSTANTIATE_BLOCK(float)
SY_INSTANTIATE_BLOCK(double)
#undef SY_INSTANTIATE_BLOCK

}  // namespace sy::detail
