// The multimodal MoE transformer of nn/multimodal.h: three input projections and heads around
// shared blocks whose attention runs per modality and whose MoE layers take every row at once.
#include "switchyard/nn/multimodal.h"

#include <algorithm>
#include <cmath>

#include "nn/block.h"
#include "switchyard/core/parallel.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

template <class F>
MmParams map_params(const MmParams& p, F f) {
  MmParams o;
  o.patch_w = f(p.patch_w);
  o.patch_b = f(p.patch_b);
  o.pos_image = f(p.pos_image);
  o.head_image_w = f(p.head_image_w);
  o.head_image_b = f(p.head_image_b);
  o.embed = f(p.embed);
  o.pos_text = f(p.pos_text);
  o.head_text = f(p.head_text);
  o.control_w = f(p.control_w);
  o.control_b = f(p.control_b);
  o.pos_control = f(p.pos_control);
  o.head_control_w = f(p.head_control_w);
  o.head_control_b = f(p.head_control_b);
  o.norm_out = f(p.norm_out);
  for (const LayerParams& l : p.layers)
    o.layers.push_back(detail::map_layer(l, [&](const Tensor& t, bool) { return f(t); }));
  return o;
}

// out rows = in w + bias + pos[row % L]; in: [n, k], out: [n, d] (=).
template <class T>
void project(const Backend& be, ConstMatrixView<T> in, const Tensor& w, const Tensor& bias,
             const Tensor& pos, MatrixView<T> out) {
  be.gemm<T>(false, false, T(1), in, w.matrix<T>(), T(0), out);
  const int64_t L = pos.dim(0), d = out.cols;
  const T* b = bias.empty() ? nullptr : bias.data<T>();
  ConstMatrixView<T> pv = pos.matrix<T>();
  for (int64_t r = 0; r < out.rows; ++r)
    for (int64_t i = 0; i < d; ++i) out(r, i) += pv(r % L, i) + (b ? b[i] : T(0));
}

// Adjoint of project: g_w += in^T dout, g_bias += column sums, g_pos[row % L] += dout rows.
template <class T>
void project_backward(const Backend& be, ConstMatrixView<T> in, ConstMatrixView<T> dout, Tensor& gw,
                      Tensor& gbias, Tensor& gpos) {
  be.gemm<T>(true, false, T(1), in, dout, T(1), gw.matrix<T>());
  const int64_t L = gpos.dim(0), d = dout.cols;
  MatrixView<T> gp = gpos.matrix<T>();
  T* gb = gbias.empty() ? nullptr : gbias.data<T>();
  for (int64_t r = 0; r < dout.rows; ++r)
    for (int64_t i = 0; i < d; ++i) {
      gp(r % L, i) += dout(r, i);
      if (gb) gb[i] += dout(r, i);
    }
}

}  // namespace

std::vector<std::pair<std::string, Tensor*>> MmParams::named() {
  std::vector<std::pair<std::string, Tensor*>> out;
  auto add = [&](std::string name, Tensor& t) {
    if (!t.empty()) out.emplace_back(std::move(name), &t);
  };
  add("image.patch_w", patch_w);
  add("image.patch_b", patch_b);
  add("image.pos", pos_image);
  add("image.head_w", head_image_w);
  add("image.head_b", head_image_b);
  add("text.embed", embed);
  add("text.pos", pos_text);
  add("text.head", head_text);
  add("control.w", control_w);
  add("control.b", control_b);
  add("control.pos", pos_control);
  add("control.head_w", head_control_w);
  add("control.head_b", head_control_b);
  for (size_t i = 0; i < layers.size(); ++i)
    detail::append_named(layers[i], fmt::format("layers.{}.", i), out);
  add("norm_out", norm_out);
  return out;
}

std::vector<std::pair<std::string, const Tensor*>> MmParams::named() const {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (auto& [name, t] : const_cast<MmParams*>(this)->named()) out.emplace_back(name, t);
  return out;
}

MmParams init_mm_params(const MultimodalConfig& cfg, DType dtype, uint64_t seed) {
  cfg.validate();
  const int64_t d = cfg.d_model;
  auto normal = [&](std::initializer_list<int64_t> shape, double stddev, uint64_t stream) {
    return detail::normal_tensor(shape, stddev, seed, stream, dtype);
  };
  auto fan_in = [](int64_t n) { return 1.0 / std::sqrt(double(n)); };
  MmParams p;
  p.patch_w = normal({cfg.patch_dim(), d}, fan_in(cfg.patch_dim()), 0);
  p.patch_b = Tensor({d}, dtype);
  p.pos_image = normal({cfg.n_patches(), d}, 0.02, 1);
  p.head_image_w = normal({d, cfg.n_classes}, fan_in(d), 2);
  p.head_image_b = Tensor({cfg.n_classes}, dtype);
  p.embed = normal({MultimodalConfig::kVocab, d}, 1.0, 3);
  p.pos_text = normal({cfg.text_context, d}, 0.02, 4);
  p.head_text = normal({d, MultimodalConfig::kVocab}, fan_in(d), 5);
  p.control_w = normal({cfg.control_features, d}, fan_in(cfg.control_features), 6);
  p.control_b = Tensor({d}, dtype);
  p.pos_control = normal({cfg.control_steps, d}, 0.02, 7);
  p.head_control_w = normal({d, cfg.control_actions}, fan_in(d), 8);
  p.head_control_b = Tensor({cfg.control_actions}, dtype);
  p.norm_out = detail::ones_tensor(d, dtype);
  const double out_scale = 1.0 / std::sqrt(2.0 * double(cfg.n_layers));
  const MoeConfig moe = cfg.moe_config();
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    p.layers.push_back(detail::init_layer_params(cfg.attention(true), cfg.is_moe(i) ? &moe : nullptr,
                                                 cfg.d_ff, out_scale, dtype,
                                                 seed + 1000003ull * uint64_t(i + 1)));
  return p;
}

MmParams zeros_like(const MmParams& p) {
  return map_params(
      p, [](const Tensor& t) { return t.empty() ? Tensor() : Tensor(t.shape(), t.dtype()); });
}

MultimodalModel::MultimodalModel(const MultimodalConfig& cfg)
    : cfg_((cfg.validate(), cfg)), bidirectional_(cfg.attention(false)), causal_(cfg.attention(true)) {
  if (cfg_.n_moe_layers() > 0) moe_.emplace(cfg_.moe_config());
}

void MultimodalModel::check_params(const MmParams& p) const {
  const int64_t d = cfg_.d_model;
  expect_shape(p.patch_w, {cfg_.patch_dim(), d}, "image.patch_w");
  expect_shape(p.patch_b, {d}, "image.patch_b");
  expect_shape(p.pos_image, {cfg_.n_patches(), d}, "image.pos");
  expect_shape(p.head_image_w, {d, cfg_.n_classes}, "image.head_w");
  expect_shape(p.head_image_b, {cfg_.n_classes}, "image.head_b");
  expect_shape(p.embed, {MultimodalConfig::kVocab, d}, "text.embed");
  expect_shape(p.pos_text, {cfg_.text_context, d}, "text.pos");
  expect_shape(p.head_text, {d, MultimodalConfig::kVocab}, "text.head");
  expect_shape(p.control_w, {cfg_.control_features, d}, "control.w");
  expect_shape(p.control_b, {d}, "control.b");
  expect_shape(p.pos_control, {cfg_.control_steps, d}, "control.pos");
  expect_shape(p.head_control_w, {d, cfg_.control_actions}, "control.head_w");
  expect_shape(p.head_control_b, {cfg_.control_actions}, "control.head_b");
  expect_shape(p.norm_out, {d}, "norm_out");
  detail::check_layers(p.layers, cfg_.n_layers, d, cfg_.d_ff, causal_, moe_ ? &*moe_ : nullptr,
                       [&](int64_t i) { return cfg_.is_moe(i); });
  const DType dt = p.patch_w.dtype();
  for (const auto& [name, t] : p.named()) expect_dtype(*t, dt, name, "image.patch_w's dtype");
}

Modality MultimodalModel::row_modality(const MmCache& c, int64_t r) {
  if (r < c.row0[1]) return Modality::kImage;
  return r < c.row0[2] ? Modality::kText : Modality::kControl;
}

MmStep MultimodalModel::forward(const MmParams& p, const MmBatch& b, MmCache& c,
                                const ExecContext& ctx) const {
  check_params(p);
  const DType dt = p.patch_w.dtype();
  const int64_t Bi = b.n_images(), Lt = cfg_.text_context, Lc = cfg_.control_steps;
  if (!b.images.empty()) {
    if (b.images.rank() != 2 || b.images.dim(1) != cfg_.image_dim())
      throw ShapeError(fmt::format("images {}: expected [B, {}] ({} x {}, model.image_rows x "
                                   "image_cols)",
                                   b.images.shape_str(), cfg_.image_dim(), cfg_.image_rows,
                                   cfg_.image_cols));
    expect_dtype(b.images, dt, "images", "the parameters' dtype");
  }
  if (int64_t(b.labels.size()) != Bi)
    throw ShapeError(fmt::format("{} labels for {} images: expected one per image", b.labels.size(), Bi));
  for (int32_t y : b.labels)
    if (y >= cfg_.n_classes)
      throw ShapeError(fmt::format("label {}: expected < {} (model.n_classes)", y, cfg_.n_classes));
  if (b.text.size() % size_t(Lt) != 0 || b.text_targets.size() != b.text.size())
    throw ShapeError(fmt::format("{} text bytes and {} targets: expected equal counts, a multiple "
                                 "of {} (model.text_context)",
                                 b.text.size(), b.text_targets.size(), Lt));
  for (size_t i = 0; i < b.text.size(); ++i)
    if (b.text[i] < 0 || b.text[i] >= MultimodalConfig::kVocab || b.text_targets[i] >= MultimodalConfig::kVocab)
      throw ShapeError(fmt::format("text position {}: byte {}, target {}: expected bytes 0..255",
                                   i, b.text[i], b.text_targets[i]));
  int64_t Bc = 0;
  if (!b.control.empty()) {
    if (b.control.rank() != 2 || b.control.dim(1) != cfg_.control_features ||
        b.control.dim(0) % Lc != 0)
      throw ShapeError(fmt::format("control inputs {}: expected [Bc * {}, {}] (model.control_steps, "
                                   "control_features)",
                                   b.control.shape_str(), Lc, cfg_.control_features));
    Bc = b.control.dim(0) / Lc;
    expect_dtype(b.control, dt, "control inputs", "the parameters' dtype");
  }
  const bool no_targets = b.control_targets.empty() && Bc == 0;
  if (!no_targets && (b.control_targets.rank() != 2 || b.control_targets.dim(0) != Bc * Lc ||
                      b.control_targets.dim(1) != cfg_.control_actions))
    throw ShapeError(fmt::format("control targets {}: expected [{}, {}], one action per control step",
                                 b.control_targets.shape_str(), Bc * Lc, cfg_.control_actions));
  if (Bc > 0) expect_dtype(b.control_targets, dt, "control targets", "the parameters' dtype");
  c.n_seq = {Bi, int64_t(b.text.size()) / Lt, Bc};
  c.row0 = {0, Bi * cfg_.n_patches(), Bi * cfg_.n_patches() + int64_t(b.text.size())};
  c.n_rows = c.row0[2] + Bc * Lc;
  if (c.n_rows == 0) throw ShapeError("an empty batch: expected images, text or control sequences");
  c.labels = b.labels;
  c.text = b.text;
  c.text_targets = b.text_targets;
  ThreadScope threads(ctx.n_threads);
  if (dt == DType::kF64) return forward_impl<double>(p, b, c, ctx);
  return forward_impl<float>(p, b, c, ctx);
}

template <class T>
MmStep MultimodalModel::forward_impl(const MmParams& p, const MmBatch& b, MmCache& c,
                                     const ExecContext& ctx) const {
  const int64_t d = cfg_.d_model, np = cfg_.n_patches();
  const int64_t Bi = c.n_seq[0], Bc = c.n_seq[2];
  const DType dt = dtype_of<T>();
  const Backend& be = backend_of(ctx);
  c.x.resize_for_overwrite({c.n_rows, d}, dt);
  MatrixView<T> x = c.x.matrix<T>();
  if (Bi > 0) {
    c.patches.resize_for_overwrite({Bi * np, cfg_.patch_dim()}, dt);
    detail::patchify<T>(b.images.matrix<T>(), cfg_.image_rows, cfg_.image_cols, 1, cfg_.patch,
                        c.patches.matrix<T>());
    project<T>(be, c.patches.matrix<T>(), p.patch_w, p.patch_b, p.pos_image,
               x.slice_rows(c.row0[0], c.row0[1]));
  }
  if (!c.text.empty()) {
    MatrixView<T> xt = x.slice_rows(c.row0[1], c.row0[2]);
    cpu::gather_rows<T>(p.embed.matrix<T>(), c.text, xt);
    ConstMatrixView<T> pos = p.pos_text.matrix<T>();
    for (int64_t r = 0; r < xt.rows; ++r)
      for (int64_t i = 0; i < d; ++i) xt(r, i) += pos(r % cfg_.text_context, i);
  }
  if (Bc > 0) {
    c.control = b.control.clone();
    c.control_targets = b.control_targets.clone();
    project<T>(be, c.control.matrix<T>(), p.control_w, p.control_b, p.pos_control,
               x.slice_rows(c.row0[2], c.n_rows));
  }

  const detail::AttentionSegment segments[kModalities] = {
      {&bidirectional_, c.row0[0], Bi, np},
      {&causal_, c.row0[1], c.n_seq[1], cfg_.text_context},
      {&causal_, c.row0[2], Bc, cfg_.control_steps}};
  MmStep step;
  c.layers.resize(size_t(cfg_.n_layers));
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    const detail::BlockKind kind{.attention = &causal_,
                                 .moe = cfg_.is_moe(i) ? &*moe_ : nullptr,
                                 .norm_eps = cfg_.norm_eps,
                                 .segments = segments};
    MoeForward mf = detail::block_forward<T>(kind, p.layers[i], c.x, 0, c.layers[i],
                                             detail::layer_context(ctx, i));
    if (kind.moe == nullptr) continue;
    step.aux += mf.loss_balance + mf.loss_z;
    step.routing.push_back(std::move(mf.stats));
  }
  c.h_out.resize({c.n_rows, d}, dt);
  c.rstd_out.resize({c.n_rows}, dt);
  cpu::rmsnorm<T>(c.x.matrix<T>(), p.norm_out.span<T>(), T(cfg_.norm_eps), c.h_out.matrix<T>(),
                  c.rstd_out.span<T>());
  ConstMatrixView<T> h = c.h_out.matrix<T>();

  // Images: mean over the image's rows, then the classifier.
  if (Bi > 0) {
    const int64_t K = cfg_.n_classes;
    c.pooled.resize({Bi, d}, dt);
    c.pooled.fill_zero();
    MatrixView<T> pooled = c.pooled.matrix<T>();
    for (int64_t im = 0; im < Bi; ++im)
      for (int64_t l = 0; l < np; ++l)
        for (int64_t i = 0; i < d; ++i) pooled(im, i) += h(im * np + l, i) / T(np);
    c.image_logits.resize({Bi, K}, dt);
    MatrixView<T> logits = c.image_logits.matrix<T>();
    for (int64_t im = 0; im < Bi; ++im) std::copy_n(p.head_image_b.data<T>(), K, logits.row(im));
    be.gemm<T>(false, false, T(1), c.pooled.matrix<T>(), p.head_image_w.matrix<T>(), T(1), logits);
    int64_t n = 0;
    for (int64_t im = 0; im < Bi; ++im) {
      const T* row = logits.row(im);
      const int32_t pred = int32_t(std::max_element(row, row + K) - row);
      n += c.labels[im] >= 0;
      step.image_correct += c.labels[im] >= 0 && pred == c.labels[im];
    }
    step.count[0] = n;
    const T scale = n > 0 ? T(cfg_.image_weight) / T(n) : T(0);
    const double sum = cpu::cross_entropy_rows<T>(logits, c.labels, scale,
                                                  ctx.training ? logits : MatrixView<T>{});
    step.loss[0] = n > 0 ? sum / double(n) : 0.0;
  }
  // Text: next-byte logits at every position.
  if (!c.text.empty()) {
    const int64_t n_rows = int64_t(c.text.size());
    c.text_logits.resize_for_overwrite({n_rows, MultimodalConfig::kVocab}, dt);
    MatrixView<T> logits = c.text_logits.matrix<T>();
    be.gemm<T>(false, false, T(1), h.slice_rows(c.row0[1], c.row0[2]), p.head_text.matrix<T>(),
               T(0), logits);
    int64_t n = 0;
    for (int32_t t : c.text_targets) n += t >= 0;
    step.count[1] = n;
    const T scale = n > 0 ? T(cfg_.text_weight) / T(n) : T(0);
    const double sum = cpu::cross_entropy_rows<T>(logits, c.text_targets, scale,
                                                  ctx.training ? logits : MatrixView<T>{});
    step.loss[1] = n > 0 ? sum / double(n) : 0.0;
  }
  // Control: the action at every step, squared error against the demonstrator's.
  if (Bc > 0) {
    const int64_t A = cfg_.control_actions, n_rows = Bc * cfg_.control_steps;
    c.control_out.resize_for_overwrite({n_rows, A}, dt);
    MatrixView<T> out = c.control_out.matrix<T>();
    for (int64_t r = 0; r < n_rows; ++r) std::copy_n(p.head_control_b.data<T>(), A, out.row(r));
    be.gemm<T>(false, false, T(1), h.slice_rows(c.row0[2], c.n_rows), p.head_control_w.matrix<T>(),
               T(1), out);
    ConstMatrixView<T> target = c.control_targets.matrix<T>();
    double sum = 0;
    const T scale = T(2 * cfg_.control_weight) / T(n_rows * A);
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t a = 0; a < A; ++a) {
        const T e = out(r, a) - target(r, a);
        sum += double(e) * double(e);
        out(r, a) = scale * e;  // in place: d loss / d action
      }
    step.count[2] = n_rows;
    step.loss[2] = sum / double(n_rows * A);
  }
  step.total = cfg_.image_weight * step.loss[0] + cfg_.text_weight * step.loss[1] +
               cfg_.control_weight * step.loss[2];
  return step;
}

void MultimodalModel::backward(const MmParams& p, MmCache& cache, MmParams& g,
                               const ExecContext& ctx) const {
  SY_CHECK(ctx.training, "backward after a forward with ctx.training = false (no gradient kept)");
  check_params(g);
  ThreadScope threads(ctx.n_threads);
  if (p.patch_w.dtype() == DType::kF64)
    backward_impl<double>(p, cache, g, ctx);
  else
    backward_impl<float>(p, cache, g, ctx);
}

template <class T>
void MultimodalModel::backward_impl(const MmParams& p, MmCache& c, MmParams& g,
                                    const ExecContext& ctx) const {
  const int64_t d = cfg_.d_model, np = cfg_.n_patches();
  const int64_t Bi = c.n_seq[0], Bc = c.n_seq[2];
  const DType dt = dtype_of<T>();
  const Backend& be = backend_of(ctx);
  c.dh.resize({c.n_rows, d}, dt);
  MatrixView<T> dh = c.dh.matrix<T>();
  ConstMatrixView<T> h = c.h_out.matrix<T>();
  if (Bi > 0) {
    const int64_t K = cfg_.n_classes;
    ConstMatrixView<T> dlogits = c.image_logits.matrix<T>();
    be.gemm<T>(true, false, T(1), c.pooled.matrix<T>(), dlogits, T(1), g.head_image_w.matrix<T>());
    for (int64_t im = 0; im < Bi; ++im)
      for (int64_t k = 0; k < K; ++k) g.head_image_b.data<T>()[k] += dlogits(im, k);
    c.dtmp.resize_for_overwrite({Bi, d}, dt);
    be.gemm<T>(false, true, T(1), dlogits, p.head_image_w.matrix<T>(), T(0), c.dtmp.matrix<T>());
    ConstMatrixView<T> dpooled = c.dtmp.matrix<T>();
    for (int64_t im = 0; im < Bi; ++im)
      for (int64_t l = 0; l < np; ++l)
        for (int64_t i = 0; i < d; ++i) dh(im * np + l, i) = dpooled(im, i) / T(np);
  }
  if (!c.text.empty()) {
    ConstMatrixView<T> dlogits = c.text_logits.matrix<T>();
    be.gemm<T>(true, false, T(1), h.slice_rows(c.row0[1], c.row0[2]), dlogits, T(1),
               g.head_text.matrix<T>());
    be.gemm<T>(false, true, T(1), dlogits, p.head_text.matrix<T>(), T(0),
               dh.slice_rows(c.row0[1], c.row0[2]));
  }
  if (Bc > 0) {
    const int64_t A = cfg_.control_actions;
    ConstMatrixView<T> dout = c.control_out.matrix<T>();
    be.gemm<T>(true, false, T(1), h.slice_rows(c.row0[2], c.n_rows), dout, T(1),
               g.head_control_w.matrix<T>());
    for (int64_t r = 0; r < dout.rows; ++r)
      for (int64_t a = 0; a < A; ++a) g.head_control_b.data<T>()[a] += dout(r, a);
    be.gemm<T>(false, true, T(1), dout, p.head_control_w.matrix<T>(), T(0),
               dh.slice_rows(c.row0[2], c.n_rows));
  }
  c.dx.resize({c.n_rows, d}, dt);
  cpu::rmsnorm_backward<T>(c.x.matrix<T>(), p.norm_out.span<T>(), c.rstd_out.span<T>(),
                           c.dh.matrix<T>(), c.dx.matrix<T>(), g.norm_out.span<T>());
  const detail::AttentionSegment segments[kModalities] = {
      {&bidirectional_, c.row0[0], Bi, np},
      {&causal_, c.row0[1], c.n_seq[1], cfg_.text_context},
      {&causal_, c.row0[2], Bc, cfg_.control_steps}};
  for (int64_t i = cfg_.n_layers - 1; i >= 0; --i) {
    const detail::BlockKind kind{.attention = &causal_,
                                 .moe = cfg_.is_moe(i) ? &*moe_ : nullptr,
                                 .norm_eps = cfg_.norm_eps,
                                 .segments = segments};
    detail::block_backward<T>(kind, p.layers[i], c.layers[i], g.layers[i], c.dx, c.dh, c.dsub,
                              detail::layer_context(ctx, i));
  }
  ConstMatrixView<T> dx = c.dx.matrix<T>();
  if (Bi > 0)
    project_backward<T>(be, c.patches.matrix<T>(), dx.slice_rows(c.row0[0], c.row0[1]), g.patch_w,
                        g.patch_b, g.pos_image);
  if (!c.text.empty()) {
    ConstMatrixView<T> dxt = dx.slice_rows(c.row0[1], c.row0[2]);
    cpu::scatter_add_rows<T>(dxt, c.text, {}, g.embed.matrix<T>());
    MatrixView<T> gp = g.pos_text.matrix<T>();
    for (int64_t r = 0; r < dxt.rows; ++r)
      for (int64_t i = 0; i < d; ++i) gp(r % cfg_.text_context, i) += dxt(r, i);
  }
  if (Bc > 0)
    project_backward<T>(be, c.control.matrix<T>(), dx.slice_rows(c.row0[2], c.n_rows), g.control_w,
                        g.control_b, g.pos_control);
}

}  // namespace sy
