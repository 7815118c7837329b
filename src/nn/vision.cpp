// The vision transformer: patch embedding, learned positions, the shared pre-norm blocks
// (bidirectional attention; MoE routed per patch or per image), pooling, classifier head.
#include "switchyard/nn/vision.h"

#include <algorithm>
#include <cmath>

#include "nn/block.h"
#include "switchyard/core/parallel.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

// A new VitParams of the same structure, each tensor through f.
template <class F>
VitParams map_params(const VitParams& p, F f) {
  VitParams out;
  out.patch_w = f(p.patch_w);
  out.patch_b = f(p.patch_b);
  out.cls = f(p.cls);
  out.pos = f(p.pos);
  out.norm_out = f(p.norm_out);
  out.head_w = f(p.head_w);
  out.head_b = f(p.head_b);
  for (const LayerParams& l : p.layers)
    out.layers.push_back(detail::map_layer(l, [&](const Tensor& t, bool) { return f(t); }));
  return out;
}

}  // namespace

std::vector<std::pair<std::string, Tensor*>> VitParams::named() {
  std::vector<std::pair<std::string, Tensor*>> out;
  auto add = [&](std::string name, Tensor& t) {
    if (!t.empty()) out.emplace_back(std::move(name), &t);
  };
  add("patch_w", patch_w);
  add("patch_b", patch_b);
  add("cls", cls);
  add("pos", pos);
  for (size_t i = 0; i < layers.size(); ++i)
    detail::append_named(layers[i], fmt::format("layers.{}.", i), out);
  add("norm_out", norm_out);
  add("head_w", head_w);
  add("head_b", head_b);
  return out;
}

std::vector<std::pair<std::string, const Tensor*>> VitParams::named() const {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (auto& [name, t] : const_cast<VitParams*>(this)->named()) out.emplace_back(name, t);
  return out;
}

VitParams init_vit_params(const VitConfig& cfg, DType dtype, uint64_t seed) {
  cfg.validate();
  const int64_t d = cfg.d_model;
  const double out_scale = 1.0 / std::sqrt(2.0 * double(cfg.n_layers));
  auto normal = [&](std::initializer_list<int64_t> shape, double stddev, uint64_t stream) {
    return detail::normal_tensor(shape, stddev, seed, stream, dtype);
  };
  VitParams p;
  p.patch_w = normal({cfg.patch_dim(), d}, 1.0 / std::sqrt(double(cfg.patch_dim())), 0);
  p.patch_b = Tensor({d}, dtype);
  // ViT's small position and class-token initialisation: the patch content dominates at first.
  p.pos = normal({cfg.seq_len(), d}, 0.02, 1);
  if (cfg.pooling == VitPooling::kClassToken) p.cls = normal({d}, 0.02, 2);
  p.norm_out = detail::ones_tensor(d, dtype);
  p.head_w = normal({d, cfg.n_classes}, 1.0 / std::sqrt(double(d)), 3);
  p.head_b = Tensor({cfg.n_classes}, dtype);
  const MoeConfig moe = cfg.moe_config();
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    const uint64_t layer_seed = seed + 1000003ull * uint64_t(i + 1);
    p.layers.push_back(detail::init_layer_params(cfg.attention(), cfg.is_moe(i) ? &moe : nullptr,
                                                 cfg.d_ff, out_scale, dtype, layer_seed));
  }
  return p;
}

VitParams zeros_like(const VitParams& p) {
  return map_params(
      p, [](const Tensor& t) { return t.empty() ? Tensor() : Tensor(t.shape(), t.dtype()); });
}

VisionTransformer::VisionTransformer(const VitConfig& cfg)
    : cfg_((cfg.validate(), cfg)), attention_(cfg.attention()) {
  if (cfg_.n_moe_layers() > 0) {
    moe_.emplace(cfg_.moe_config());
    if (cfg_.routing == VitRouting::kPerImage && cfg_.moe.gating == Gating::kHash)
      throw ConfigError("model.routing = per_image with moe.router = hash: hash routing needs "
                        "token ids; expected a learned or random router");
  }
}

void VisionTransformer::check_params(const VitParams& p) const {
  const int64_t d = cfg_.d_model;
  expect_shape(p.patch_w, {cfg_.patch_dim(), d}, "patch_w");
  expect_shape(p.patch_b, {d}, "patch_b");
  expect_shape(p.pos, {cfg_.seq_len(), d}, "pos");
  if (cfg_.pooling == VitPooling::kClassToken)
    expect_shape(p.cls, {d}, "cls");
  else if (!p.cls.empty())
    throw ShapeError("cls is set but model.pooling is mean: expected no class token");
  expect_shape(p.norm_out, {d}, "norm_out");
  expect_shape(p.head_w, {d, cfg_.n_classes}, "head_w");
  expect_shape(p.head_b, {cfg_.n_classes}, "head_b");
  detail::check_layers(p.layers, cfg_.n_layers, d, cfg_.d_ff, attention_,
                       moe_ ? &*moe_ : nullptr, [&](int64_t i) { return cfg_.is_moe(i); });
  const DType dt = p.patch_w.dtype();
  for (const auto& [name, t] : p.named()) expect_dtype(*t, dt, name, "patch_w's dtype");
}

VitStep VisionTransformer::forward(const VitParams& p, const Tensor& images,
                                   std::span<const int32_t> labels,
                                   std::span<const int32_t> guide, VitCache& cache,
                                   const ExecContext& ctx) const {
  check_params(p);
  if (images.rank() != 2 || images.dim(1) != cfg_.image_dim() || images.dim(0) < 1)
    throw ShapeError(fmt::format("images {}: expected [B >= 1, {}] ({} x {} x {}, model.image_rows "
                                 "x image_cols x channels)",
                                 images.shape_str(), cfg_.image_dim(), cfg_.image_rows,
                                 cfg_.image_cols, cfg_.channels));
  expect_dtype(images, p.patch_w.dtype(), "images", "the parameters' dtype");
  const int64_t B = images.dim(0);
  if (int64_t(labels.size()) != B)
    throw ShapeError(fmt::format("{} labels for {} images: expected one per image", labels.size(), B));
  for (int64_t b = 0; b < B; ++b)
    if (labels[b] >= cfg_.n_classes)
      throw ShapeError(fmt::format("label {} of image {}: expected < {} (model.n_classes)",
                                   labels[b], b, cfg_.n_classes));
  if (!guide.empty() && int64_t(guide.size()) != B)
    throw ShapeError(fmt::format("{} super-class targets for {} images: expected one per image",
                                 guide.size(), B));
  cache.n_images = B;
  cache.labels.assign(labels.begin(), labels.end());
  // Per-token routing guides each row towards its image's target.
  const int64_t L = cfg_.seq_len(), rows = cfg_.routing == VitRouting::kPerImage ? 1 : L;
  cache.guide.clear();
  for (int32_t e : guide) cache.guide.insert(cache.guide.end(), size_t(rows), e);
  ThreadScope threads(ctx.n_threads);
  if (images.dtype() == DType::kF64) return forward_impl<double>(p, images, cache, ctx);
  return forward_impl<float>(p, images, cache, ctx);
}

template <class T>
VitStep VisionTransformer::forward_impl(const VitParams& p, const Tensor& images, VitCache& c,
                                        const ExecContext& ctx) const {
  const int64_t B = c.n_images, d = cfg_.d_model, L = cfg_.seq_len(), np = cfg_.n_patches();
  const int64_t n = B * L, off = L - np;  // off: 1 with a class token in front
  const DType dt = dtype_of<T>();
  const Backend& be = backend_of(ctx);
  c.patches.resize_for_overwrite({B * np, cfg_.patch_dim()}, dt);
  detail::patchify<T>(images.matrix<T>(), cfg_.image_rows, cfg_.image_cols, cfg_.channels,
                      cfg_.patch, c.patches.matrix<T>());
  Tensor tok;
  tok.resize_for_overwrite({B * np, d}, dt);
  be.gemm<T>(false, false, T(1), c.patches.matrix<T>(), p.patch_w.matrix<T>(), T(0),
             tok.matrix<T>());
  c.x.resize_for_overwrite({n, d}, dt);
  MatrixView<T> x = c.x.matrix<T>();
  ConstMatrixView<T> tv = tok.matrix<T>(), pos = p.pos.matrix<T>();
  const T* bias = p.patch_b.data<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      T* row = x.row(b * L + l);
      const T* src = l < off ? p.cls.data<T>() : tv.row(b * np + l - off);
      for (int64_t i = 0; i < d; ++i) row[i] = src[i] + (l < off ? T(0) : bias[i]) + pos(l, i);
    }

  VitStep step;
  c.layers.resize(size_t(cfg_.n_layers));
  const RouteGroups groups{.rows = cfg_.routing == VitRouting::kPerImage ? L : 1,
                           .guide = c.guide};
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    const detail::BlockKind kind{&attention_, cfg_.is_moe(i) ? &*moe_ : nullptr, cfg_.norm_eps};
    MoeForward mf = detail::block_forward<T>(kind, p.layers[i], c.x, B, c.layers[i],
                                             detail::layer_context(ctx, i), {}, groups);
    if (kind.moe == nullptr) continue;
    step.aux += mf.loss_balance + mf.loss_z + mf.loss_guide;
    step.loss_guide += mf.loss_guide;
    step.routing.push_back(std::move(mf.stats));
  }

  c.h_out.resize({n, d}, dt);
  c.rstd_out.resize({n}, dt);
  cpu::rmsnorm<T>(c.x.matrix<T>(), p.norm_out.span<T>(), T(cfg_.norm_eps), c.h_out.matrix<T>(),
                  c.rstd_out.span<T>());
  c.pooled.resize({B, d}, dt);
  c.pooled.fill_zero();
  MatrixView<T> pooled = c.pooled.matrix<T>();
  ConstMatrixView<T> h = c.h_out.matrix<T>();
  for (int64_t b = 0; b < B; ++b) {
    if (cfg_.pooling == VitPooling::kClassToken) {
      std::copy_n(h.row(b * L), d, pooled.row(b));
      continue;
    }
    for (int64_t l = 0; l < L; ++l)
      for (int64_t i = 0; i < d; ++i) pooled(b, i) += h(b * L + l, i) / T(L);
  }
  const int64_t K = cfg_.n_classes;
  c.logits.resize({B, K}, dt);
  MatrixView<T> logits = c.logits.matrix<T>();
  for (int64_t b = 0; b < B; ++b) std::copy_n(p.head_b.data<T>(), K, logits.row(b));
  be.gemm<T>(false, false, T(1), c.pooled.matrix<T>(), p.head_w.matrix<T>(), T(1), logits);
  step.predicted.resize(size_t(B));
  for (int64_t b = 0; b < B; ++b) {
    const T* row = logits.row(b);
    step.predicted[b] = int32_t(std::max_element(row, row + K) - row);
    step.n_labelled += c.labels[b] >= 0;
    step.correct += c.labels[b] >= 0 && step.predicted[b] == c.labels[b];
  }
  const T scale = step.n_labelled > 0 ? T(1) / T(step.n_labelled) : T(0);
  // In place: the logits become d(mean loss)/dlogits, which is all backward needs of them.
  const double total = cpu::cross_entropy_rows<T>(logits, c.labels, scale,
                                                  ctx.training ? logits : MatrixView<T>{});
  step.loss = step.n_labelled > 0 ? total / double(step.n_labelled) : 0.0;
  return step;
}

void VisionTransformer::backward(const VitParams& p, VitCache& cache, VitParams& g,
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
void VisionTransformer::backward_impl(const VitParams& p, VitCache& c, VitParams& g,
                                      const ExecContext& ctx) const {
  const int64_t B = c.n_images, d = cfg_.d_model, L = cfg_.seq_len(), np = cfg_.n_patches();
  const int64_t n = B * L, off = L - np, K = cfg_.n_classes;
  const DType dt = dtype_of<T>();
  const Backend& be = backend_of(ctx);
  ConstMatrixView<T> dlogits = c.logits.matrix<T>();
  // logits = pooled head_w + head_b.
  be.gemm<T>(true, false, T(1), c.pooled.matrix<T>(), dlogits, T(1), g.head_w.matrix<T>());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) g.head_b.data<T>()[k] += dlogits(b, k);
  c.dpooled.resize_for_overwrite({B, d}, dt);
  be.gemm<T>(false, true, T(1), dlogits, p.head_w.matrix<T>(), T(0), c.dpooled.matrix<T>());
  // Pooling: the class token's row, or each row's 1/L share of the mean.
  c.dh.resize({n, d}, dt);
  c.dh.fill_zero();
  MatrixView<T> dh = c.dh.matrix<T>();
  ConstMatrixView<T> dpooled = c.dpooled.matrix<T>();
  for (int64_t b = 0; b < B; ++b) {
    if (cfg_.pooling == VitPooling::kClassToken) {
      std::copy_n(dpooled.row(b), d, dh.row(b * L));
      continue;
    }
    for (int64_t l = 0; l < L; ++l)
      for (int64_t i = 0; i < d; ++i) dh(b * L + l, i) = dpooled(b, i) / T(L);
  }
  c.dx.resize({n, d}, dt);
  cpu::rmsnorm_backward<T>(c.x.matrix<T>(), p.norm_out.span<T>(), c.rstd_out.span<T>(),
                           c.dh.matrix<T>(), c.dx.matrix<T>(), g.norm_out.span<T>());
  for (int64_t i = cfg_.n_layers - 1; i >= 0; --i) {
    const detail::BlockKind kind{&attention_, cfg_.is_moe(i) ? &*moe_ : nullptr, cfg_.norm_eps};
    detail::block_backward<T>(kind, p.layers[i], c.layers[i], g.layers[i], c.dx, c.dh, c.dsub,
                              detail::layer_context(ctx, i));
  }
  // x = [cls |] patches w_patch + b_patch, + pos.
  ConstMatrixView<T> dx = c.dx.matrix<T>();
  MatrixView<T> gpos = g.pos.matrix<T>();
  c.dtok.resize_for_overwrite({B * np, d}, dt);
  MatrixView<T> dtok = c.dtok.matrix<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const T* row = dx.row(b * L + l);
      for (int64_t i = 0; i < d; ++i) gpos(l, i) += row[i];
      if (l < off) {
        for (int64_t i = 0; i < d; ++i) g.cls.data<T>()[i] += row[i];
      } else {
        std::copy_n(row, d, dtok.row(b * np + l - off));
        for (int64_t i = 0; i < d; ++i) g.patch_b.data<T>()[i] += row[i];
      }
    }
  be.gemm<T>(true, false, T(1), c.patches.matrix<T>(), c.dtok.matrix<T>(), T(1),
             g.patch_w.matrix<T>());
}

}  // namespace sy
