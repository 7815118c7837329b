// The decoder language model: embedding, pre-norm blocks of attention and MoE (or dense)
// SwiGLU, final norm, LM head, cross-entropy. Derivation of the backward:
// docs/transformer_backward.md.
#include "switchyard/nn/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "nn/block.h"
#include "switchyard/core/parallel.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

using detail::add_into;
using detail::layer_context;
using detail::one;

}  // namespace

std::vector<std::pair<std::string, Tensor*>> LmParams::named() {
  std::vector<std::pair<std::string, Tensor*>> out;
  auto add = [&](std::string name, Tensor& t) {
    if (!t.empty()) out.emplace_back(std::move(name), &t);
  };
  add("embed", embed);
  for (size_t i = 0; i < layers.size(); ++i)
    detail::append_named(layers[i], fmt::format("layers.{}.", i), out);
  add("norm_out", norm_out);
  add("lm_head", lm_head);
  return out;
}

std::vector<std::pair<std::string, const Tensor*>> LmParams::named() const {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (auto& [name, t] : const_cast<LmParams*>(this)->named()) out.emplace_back(name, t);
  return out;
}

LmParams init_lm_params(const LmConfig& cfg, DType dtype, uint64_t seed) {
  cfg.validate();
  const int64_t d = cfg.d_model, V = cfg.vocab;
  // Residual-branch outputs are scaled down by 1/sqrt(2 n_layers) (GPT-2) so the residual
  // stream's variance does not grow with depth at initialisation.
  const double out_scale = 1.0 / std::sqrt(2.0 * double(cfg.n_layers));
  LmParams p;
  p.embed = detail::normal_tensor({V, d}, 1.0, seed, 0, dtype);
  p.norm_out = detail::ones_tensor(d, dtype);
  p.lm_head = detail::normal_tensor({d, V}, 1.0 / std::sqrt(double(d)), seed, 1, dtype);
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    // Each layer draws from its own block of streams, so adding a layer leaves the others alone.
    const uint64_t layer_seed = seed + 1000003ull * uint64_t(i + 1);
    const MoeConfig moe = cfg.moe_config();
    p.layers.push_back(detail::init_layer_params(cfg.attention(), cfg.is_moe(i) ? &moe : nullptr,
                                                 cfg.d_ff, out_scale, dtype, layer_seed));
  }
  return p;
}

namespace {
// A new LmParams of the same structure: each tensor of p through f(tensor, routed_expert),
// routed_expert being true for the MoE layers' moe.w1/w3/w2.
template <class F>
LmParams map_params(const LmParams& p, F f) {
  LmParams out;
  out.embed = f(p.embed, false);
  out.norm_out = f(p.norm_out, false);
  out.lm_head = f(p.lm_head, false);
  for (const LayerParams& l : p.layers) out.layers.push_back(detail::map_layer(l, f));
  return out;
}
}  // namespace

LmParams zeros_like(const LmParams& p) {
  return map_params(
      p, [](const Tensor& t, bool) { return t.empty() ? Tensor() : Tensor(t.shape(), t.dtype()); });
}

bool decodes_with_bf16_experts(const Backend* backend) {
  return backend != nullptr && backend->precision == Precision::kBf16;
}

LmParams bf16_expert_params(const LmParams& p) {
  return map_params(p, [](const Tensor& t, bool routed_expert) {
    if (t.empty()) return Tensor();
    return routed_expert ? convert(t, DType::kBF16) : t.clone();
  });
}

LanguageModel::LanguageModel(const LmConfig& cfg)
    : cfg_((cfg.validate(), cfg)), attention_(cfg.attention()) {
  if (cfg_.n_moe_layers() > 0) moe_.emplace(cfg_.moe_config());
}

void LanguageModel::check_params(const LmParams& p, int64_t ep_size, bool for_decode) const {
  const int64_t d = cfg_.d_model, V = cfg_.vocab;
  const DType dt = p.embed.dtype();
  expect_shape(p.embed, {V, d}, "embed");
  expect_shape(p.norm_out, {d}, "norm_out");
  expect_shape(p.lm_head, {d, V}, "lm_head");
  if (int64_t(p.layers.size()) != cfg_.n_layers)
    throw ShapeError(fmt::format("parameters hold {} layers: expected {} (model.n_layers)",
                                 p.layers.size(), cfg_.n_layers));
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    const LayerParams& l = p.layers[i];
    const std::string at = fmt::format("layers.{}.", i);
    expect_shape(l.norm_attn, {d}, at + "norm_attn");
    expect_shape(l.norm_ffn, {d}, at + "norm_ffn");
    attention_.check_params(l.attn);
    if (cfg_.is_moe(i)) {
      moe_->check_params(l.moe, ep_size);
      if (!l.w1.empty()) throw ShapeError(at + "ffn.w1 is set in an MoE layer");
    } else {
      const int64_t f = cfg_.d_ff;
      expect_shape(l.w1, {d, f}, at + "ffn.w1");
      expect_shape(l.w3, {d, f}, at + "ffn.w3");
      expect_shape(l.w2, {f, d}, at + "ffn.w2");
      if (!l.moe.w_gate.empty()) throw ShapeError(at + "moe.w_gate is set in a dense layer");
    }
  }
  // Every tensor in embed's dtype; for decoding, a layer's routed experts may be bf16 instead
  // (the three weights alike).
  std::vector<const Tensor*> bf16_experts;
  for (int64_t i = 0; for_decode && i < cfg_.n_layers; ++i) {
    const MoeParams& m = p.layers[i].moe;
    if (!cfg_.is_moe(i) || m.w1.dtype() != DType::kBF16) continue;
    expect_dtype(m.w3, DType::kBF16, fmt::format("layers.{}.moe.w3", i), "moe.w1's dtype");
    expect_dtype(m.w2, DType::kBF16, fmt::format("layers.{}.moe.w2", i), "moe.w1's dtype");
    bf16_experts.insert(bf16_experts.end(), {&m.w1, &m.w3, &m.w2});
  }
  for (const auto& [name, t] : p.named())
    if (std::find(bf16_experts.begin(), bf16_experts.end(), t) == bf16_experts.end())
      expect_dtype(*t, dt, name, "embed's dtype");
}

LmStep LanguageModel::forward(const LmParams& p, std::span<const int32_t> tokens,
                              std::span<const int32_t> targets, int64_t n_seq, LmCache& cache,
                              const ExecContext& ctx) const {
  check_params(p, ctx.parallel != nullptr ? ctx.parallel->ep_size() : 1);
  if (tokens.size() != targets.size())
    throw ShapeError(fmt::format("{} tokens but {} targets: expected equal counts", tokens.size(),
                                 targets.size()));
  const int64_t n = int64_t(tokens.size());
  if (n_seq < 1 || n % n_seq != 0 || n / n_seq > cfg_.context)
    throw ShapeError(
        fmt::format("{} tokens as {} sequences: expected equal sequences of at most "
                    "{} tokens (model.context)",
                    n, n_seq, cfg_.context));
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab)
      throw ShapeError(fmt::format("token {} at position {}: expected 0..{} (model.vocab)",
                                   tokens[i], i, cfg_.vocab - 1));
    if (targets[i] >= cfg_.vocab)
      throw ShapeError(fmt::format("target {} at position {}: expected < {} (model.vocab)",
                                   targets[i], i, cfg_.vocab));
  }
  cache.tokens.assign(tokens.begin(), tokens.end());
  cache.targets.assign(targets.begin(), targets.end());
  ThreadScope threads(ctx.n_threads);
  if (p.embed.dtype() == DType::kF64) return forward_impl<double>(p, n_seq, cache, ctx);
  return forward_impl<float>(p, n_seq, cache, ctx);
}

template <class T>
LmStep LanguageModel::forward_impl(const LmParams& p, int64_t n_seq, LmCache& c,
                                   const ExecContext& ctx) const {
  const int64_t n = int64_t(c.tokens.size()), d = cfg_.d_model, V = cfg_.vocab;
  const DType dt = dtype_of<T>();
  const T eps = T(cfg_.norm_eps);
  const Backend& be = backend_of(ctx);
  c.layers.resize(size_t(cfg_.n_layers));
  Tensor& x = c.x_out;  // the residual stream, updated in place layer by layer
  x.resize({n, d}, dt);
  cpu::gather_rows<T>(p.embed.matrix<T>(), c.tokens, x.matrix<T>());

  LmStep step;
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    const detail::BlockKind kind{&attention_, cfg_.is_moe(i) ? &*moe_ : nullptr, cfg_.norm_eps};
    MoeForward mf = detail::block_forward<T>(kind, p.layers[i], x, n_seq, c.layers[i],
                                             layer_context(ctx, i), c.tokens);
    if (kind.moe == nullptr) continue;
    step.aux += mf.loss_balance + mf.loss_z;
    step.routing.push_back(std::move(mf.stats));
  }

  c.h_out.resize({n, d}, dt);
  c.rstd_out.resize({n}, dt);
  cpu::rmsnorm<T>(x.matrix<T>(), p.norm_out.span<T>(), eps, c.h_out.matrix<T>(),
                  c.rstd_out.span<T>());
  c.logits.resize({n, V}, dt);
  be.gemm<T>(false, false, T(1), c.h_out.matrix<T>(), p.lm_head.matrix<T>(), T(0),
             c.logits.matrix<T>());
  c.n_targets = 0;
  for (int32_t y : c.targets) c.n_targets += y >= 0;
  const T scale = c.n_targets > 0 ? T(1) / T(c.n_targets) : T(0);
  // In place: the logits become d(mean loss)/dlogits, which is all backward needs of them.
  const double total =
      cpu::cross_entropy_rows<T>(c.logits.matrix<T>(), c.targets, scale,
                                 ctx.training ? c.logits.matrix<T>() : MatrixView<T>{});
  step.n_targets = c.n_targets;
  step.loss = c.n_targets > 0 ? total / double(c.n_targets) : 0.0;
  return step;
}

void LanguageModel::backward(const LmParams& p, LmCache& cache, LmParams& g,
                             const ExecContext& ctx) const {
  SY_CHECK(ctx.training, "backward after a forward with ctx.training = false (no gradient kept)");
  ThreadScope threads(ctx.n_threads);
  if (p.embed.dtype() == DType::kF64)
    backward_impl<double>(p, cache, g, ctx);
  else
    backward_impl<float>(p, cache, g, ctx);
}

template <class T>
void LanguageModel::backward_impl(const LmParams& p, LmCache& c, LmParams& g,
                                  const ExecContext& ctx) const {
  const int64_t n = int64_t(c.tokens.size()), d = cfg_.d_model;
  const DType dt = dtype_of<T>();
  const Backend& be = backend_of(ctx);
  Tensor& dx = c.dx;  // d loss / d residual stream, carried down the layers
  Tensor& dh = c.dh;
  dx.resize({n, d}, dt);
  dh.resize({n, d}, dt);
  // logits = h_out lm_head (c.logits holds dlogits).
  be.gemm<T>(true, false, T(1), c.h_out.matrix<T>(), c.logits.matrix<T>(), T(1),
             g.lm_head.matrix<T>());
  be.gemm<T>(false, true, T(1), c.logits.matrix<T>(), p.lm_head.matrix<T>(), T(0), dh.matrix<T>());
  cpu::rmsnorm_backward<T>(c.x_out.matrix<T>(), p.norm_out.span<T>(), c.rstd_out.span<T>(),
                           dh.matrix<T>(), dx.matrix<T>(), g.norm_out.span<T>());

  for (int64_t i = cfg_.n_layers - 1; i >= 0; --i) {
    const detail::BlockKind kind{&attention_, cfg_.is_moe(i) ? &*moe_ : nullptr, cfg_.norm_eps};
    detail::block_backward<T>(kind, p.layers[i], c.layers[i], g.layers[i], dx, dh, c.dsub,
                              layer_context(ctx, i));
  }
  cpu::scatter_add_rows<T>(dx.matrix<T>(), c.tokens, {}, g.embed.matrix<T>());
}

DecodeState LanguageModel::start(DType dtype) const {
  DecodeState s;
  for (int64_t i = 0; i < cfg_.n_layers; ++i) s.kv.push_back(attention_.start(dtype));
  return s;
}

void LanguageModel::decode(const LmParams& p, std::span<const int32_t> tokens, DecodeState& state,
                           std::vector<float>& logits, const ExecContext& ctx) const {
  const std::span<const int32_t> one_seq[1] = {tokens};
  DecodeState* const one_state[1] = {&state};
  Tensor lg;
  decode_batch(p, one_seq, one_state, lg, ctx);
  logits.assign(lg.data<float>(), lg.data<float>() + lg.numel());
}

void LanguageModel::decode_batch(const LmParams& p,
                                 std::span<const std::span<const int32_t>> tokens,
                                 std::span<DecodeState* const> states, Tensor& logits,
                                 const ExecContext& ctx, DecodeRouting* routing) const {
  check_params(p, 1, /*for_decode=*/true);
  if (p.embed.dtype() != DType::kF32)
    throw ShapeError(
        fmt::format("decode: parameters are {}: expected f32", dtype_name(p.embed.dtype())));
  if (tokens.size() != states.size() || tokens.empty())
    throw ShapeError(
        fmt::format("decode: {} token lists for {} sequences: expected as many, "
                    "at least one",
                    tokens.size(), states.size()));
  const int64_t n_seq = int64_t(tokens.size()), d = cfg_.d_model, V = cfg_.vocab;
  std::vector<int32_t> all;  // every sequence's new tokens, one after another
  std::vector<int64_t> at(size_t(n_seq) + 1, 0);
  for (int64_t s = 0; s < n_seq; ++s) {
    if (tokens[s].empty()) throw ShapeError(fmt::format("decode: sequence {}: no tokens", s));
    for (int32_t t : tokens[s])
      if (t < 0 || t >= V)
        throw ShapeError(fmt::format("token {}: expected 0..{} (model.vocab)", t, V - 1));
    DecodeState& st = *states[s];
    if (int64_t(st.kv.size()) != cfg_.n_layers) st = start(DType::kF32);
    if (st.n_pos() + int64_t(tokens[s].size()) > cfg_.context)
      throw ShapeError(
          fmt::format("decode: sequence {}: {} positions filled + {} new exceed the "
                      "context of {}",
                      s, st.n_pos(), tokens[s].size(), cfg_.context));
    all.insert(all.end(), tokens[s].begin(), tokens[s].end());
    at[s + 1] = int64_t(all.size());
  }
  const int64_t n = int64_t(all.size());
  ThreadScope threads(ctx.n_threads);
  ExecContext eval = ctx;
  eval.training = false;
  const float eps = float(cfg_.norm_eps);
  Tensor x({n, d}, DType::kF32), h({n, d}, DType::kF32), out, rstd({n}, DType::kF32);
  std::vector<KvCache*> kvs(static_cast<size_t>(n_seq));  // each sequence's cache of a layer
  cpu::gather_rows<float>(p.embed.matrix<float>(), all, x.matrix<float>());
  MoeCache moe_cache;
  ExpertsCache ffn_cache;
  if (routing != nullptr) *routing = {};
  for (int64_t i = 0; i < cfg_.n_layers; ++i) {
    const LayerParams& l = p.layers[i];
    cpu::rmsnorm<float>(x.matrix<float>(), l.norm_attn.span<float>(), eps, h.matrix<float>(),
                        rstd.span<float>());
    for (int64_t s = 0; s < n_seq; ++s) kvs[s] = &states[s]->kv[i];
    attention_.decode_batch(l.attn, h, at, kvs, out, eval);
    add_into<float>(x, out);
    cpu::rmsnorm<float>(x.matrix<float>(), l.norm_ffn.span<float>(), eps, h.matrix<float>(),
                        rstd.span<float>());
    if (cfg_.is_moe(i)) {
      const MoeForward mf = moe_->forward(l.moe, h, out, moe_cache, layer_context(eval, i), all);
      if (routing != nullptr) {
        routing->layers.push_back(mf.stats);
        const int64_t k = moe_->config().slots_per_token();
        std::vector<int32_t>& top1 = routing->top1.emplace_back(size_t(n));
        for (int64_t t = 0; t < n; ++t) top1[t] = moe_cache.router.expert[size_t(t * k)];
      }
    } else {
      out.resize({n, d}, DType::kF32);
      const std::vector<int32_t> rows = {0, int32_t(n)};
      experts_forward<float>(backend_of(eval), one<float>(l.w1), one<float>(l.w3), one<float>(l.w2),
                             h.matrix<float>(), rows, out.matrix<float>(), ffn_cache);
    }
    add_into<float>(x, out);
  }
  // Only each sequence's last position's logits are needed.
  Tensor last({n_seq, d}, DType::kF32), hl({n_seq, d}, DType::kF32), rl({n_seq}, DType::kF32);
  for (int64_t s = 0; s < n_seq; ++s)
    std::memcpy(last.data<float>() + s * d, x.data<float>() + (at[s + 1] - 1) * d,
                size_t(d) * sizeof(float));
  cpu::rmsnorm<float>(last.matrix<float>(), p.norm_out.span<float>(), eps, hl.matrix<float>(),
                      rl.span<float>());
  logits.resize({n_seq, V}, DType::kF32);
  backend_of(eval).gemm<float>(false, false, 1.0f, hl.matrix<float>(), p.lm_head.matrix<float>(),
                               0.0f, logits.matrix<float>());
}

}  // namespace sy
