// Published decoder architectures, inference only. Activations are f32; projections run on the
// context's backend with the weights in the dtype they were loaded in. The numerics follow
// transformers' float32 eager path step by step (RMS norm, RoPE tables in float32, scores
// scaled after the dot product, softmax, router in float32), so logits agree to float32
// rounding.
#include "switchyard/nn/decoder.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "switchyard/kernels/backend.h"
#include "kernels/cpu/vec_math.h"
#include "switchyard/moe/experts.h"

namespace sy {

namespace {

ConfigError bad(const std::string& field, const std::string& value, const std::string& expected) {
  return ConfigError(fmt::format("{} = {}: expected {}", field, value, expected));
}

// y = x w (+ b).  x: [n, in] f32, w: [in, out] f32 or bf16 -> y: [n, out]
void linear(const Backend& be, ConstMatrixView<float> x, const Tensor& w, const Tensor& b,
            Tensor& y) {
  const int64_t n = x.rows, out = w.dim(1);
  y.resize_for_overwrite({n, out}, DType::kF32);
  if (w.dtype() == DType::kF32) {
    be.gemm<float>(false, false, 1.0f, x, w.matrix<float>(), 0.0f, y.matrix<float>());
  } else {
    const int32_t offsets[2] = {0, int32_t(n)};
    be.grouped_gemm(x, StackedView<const bf16>{w.data<bf16>(), 1, w.dim(0), out}, offsets,
                    y.matrix<float>());
  }
  if (!b.empty()) {
    const float* bp = b.data<float>();
    float* yp = y.data<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out; ++j) yp[i * out + j] += bp[j];
  }
}

// Each row's groups of `width` values: v * rsqrt(mean(v^2) + eps) * w.  x, y: [rows, width]
// as in transformers' RMSNorm (float32 variance, then the weight).
void rms_norm(const float* x, float* y, int64_t rows, int64_t width, const float* w, double eps) {
#pragma omp parallel for schedule(static) if (rows * width > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* yr = y + r * width;
    double ss = 0;
    for (int64_t i = 0; i < width; ++i) ss += double(xr[i]) * xr[i];
    const float inv = float(1.0 / std::sqrt(float(ss / double(width)) + eps));
    for (int64_t i = 0; i < width; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void experts(const Backend& be, const Tensor& w1, const Tensor& w3, const Tensor& w2,
             ConstMatrixView<float> xs, std::span<const int32_t> offsets, MatrixView<float> ys,
             ExpertsCache& cache) {
  if (w1.dtype() == DType::kF32)
    experts_forward<float>(be, w1.stacked<float>(), w3.stacked<float>(), w2.stacked<float>(), xs,
                           offsets, ys, cache);
  else
    experts_forward(be, w1.stacked<bf16>(), w3.stacked<bf16>(), w2.stacked<bf16>(), xs, offsets, ys,
                    cache);
}

double yarn_mscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

void RopeConfig::validate() const {
  if (type != "default" && type != "linear" && type != "llama3" && type != "yarn")
    throw bad("rope.rope_type", "\"" + type + "\"", "default, linear, llama3 or yarn");
  if (!(theta > 0)) throw bad("rope.rope_theta", fmt::format("{}", theta), "> 0");
  if (dim <= 0 || dim % 2) throw bad("rope.dim", std::to_string(dim), "a positive even number");
  if (type != "default" && !(factor > 0))
    throw bad("rope.factor", fmt::format("{}", factor), "> 0");
  if ((type == "llama3" || type == "yarn") && original_max_position <= 0)
    throw bad("rope.original_max_position_embeddings", std::to_string(original_max_position),
              "> 0 for rope_type " + type);
  if (type == "llama3" && !(high_freq_factor > low_freq_factor))
    throw bad("rope.high_freq_factor", fmt::format("{}", high_freq_factor),
              fmt::format("above low_freq_factor ({})", low_freq_factor));
}

std::vector<float> RopeConfig::inv_freq() const {
  const int64_t half = dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv[i] = float(1.0 / double(float(std::pow(theta, double(2 * i) / double(dim)))));
  if (type == "linear") {
    for (float& f : inv) f = f / float(factor);
  } else if (type == "llama3") {
    const double old = double(original_max_position);
    const double low_wl = old / low_freq_factor, high_wl = old / high_freq_factor;
    for (float& f : inv) {
      const double wl = 2 * std::numbers::pi / f;
      const float scaled = wl > low_wl ? float(f / factor) : f;
      if (wl < high_wl || wl > low_wl) {
        f = scaled;
      } else {
        const double smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
        f = float((1 - smooth) * scaled / factor + smooth * scaled);
      }
    }
  } else if (type == "yarn") {
    auto correction_dim = [&](double rotations) {
      return double(dim) *
             std::log(double(original_max_position) / (rotations * 2 * std::numbers::pi)) /
             (2 * std::log(theta));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0);
    high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float pos_freq = float(std::pow(theta, double(2 * i) / double(dim)));
      const float extrapolation = 1.0f / pos_freq,
                  interpolation = 1.0f / (float(factor) * pos_freq);
      const float ramp = float(std::clamp((double(i) - low) / (high - low), 0.0, 1.0));
      const float extra_factor = 1.0f - ramp;
      inv[i] = interpolation * (1 - extra_factor) + extrapolation * extra_factor;
    }
  }
  return inv;
}

double RopeConfig::cos_sin_scale() const {
  if (type != "yarn") return 1.0;
  if (attention_factor > 0) return attention_factor;
  if (mscale > 0 && mscale_all_dim > 0)
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim);
  return yarn_mscale(factor, 1.0);
}

void DecoderConfig::validate() const {
  auto pos = [](const char* f, int64_t v) {
    if (v <= 0) throw bad(f, std::to_string(v), "> 0");
  };
  pos("vocab_size", vocab);
  pos("hidden_size", d_model);
  pos("num_hidden_layers", n_layers);
  pos("num_attention_heads", n_heads);
  pos("num_key_value_heads", n_kv_heads);
  pos("head_dim", head_dim);
  pos("v_head_dim", v_head_dim);
  pos("max_position_embeddings", max_context);
  if (n_heads % n_kv_heads)
    throw bad("num_key_value_heads", std::to_string(n_kv_heads),
              fmt::format("a divisor of num_attention_heads ({})", n_heads));
  if (int64_t(window.size()) != n_layers || int64_t(moe_layer.size()) != n_layers)
    throw bad("layers", std::to_string(window.size()),
              fmt::format("one window and one feed-forward kind per layer ({})", n_layers));
  for (int64_t w : window)
    if (w < 0) throw bad("sliding_window", std::to_string(w), ">= 0");
  rope.validate();
  if (rope.dim > (mla() ? qk_rope_dim : head_dim))
    throw bad("rope.dim", std::to_string(rope.dim),
              fmt::format("at most the rotated head width {}", mla() ? qk_rope_dim : head_dim));
  if (mla()) {
    pos("qk_nope_head_dim", qk_nope_dim);
    pos("qk_rope_head_dim", qk_rope_dim);
    if (head_dim != qk_nope_dim + qk_rope_dim)
      throw bad("qk_head_dim", std::to_string(head_dim),
                fmt::format("qk_nope_head_dim + qk_rope_head_dim = {}", qk_nope_dim + qk_rope_dim));
    if (n_kv_heads != n_heads)
      throw bad("num_key_value_heads", std::to_string(n_kv_heads),
                "num_attention_heads with latent attention (every head has its keys)");
    if (q_lora_rank < 0) throw bad("q_lora_rank", std::to_string(q_lora_rank), ">= 0");
  }
  if (n_moe_layers() < n_layers) pos("intermediate_size", d_ff);
  if (n_moe_layers() > 0) {
    MoeConfig m = moe;
    m.validate();
    if (m.d_model != d_model)
      throw bad("moe.d_model", std::to_string(m.d_model), std::to_string(d_model));
    if (m.n_shared_experts != 0)
      throw bad("moe.n_shared_experts", std::to_string(m.n_shared_experts),
                "0 (a decoder's shared expert is shared_ff)");
  }
  if (shared_ff < 0)
    throw bad("shared_expert_intermediate_size", std::to_string(shared_ff), ">= 0");
  if (shared_gate && shared_ff == 0)
    throw bad("shared_expert_gate", "true", "a shared expert (shared_ff > 0)");
}

int64_t DecoderConfig::n_moe_layers() const {
  return std::count(moe_layer.begin(), moe_layer.end(), char(1));
}

namespace {
int64_t attention_params(const DecoderConfig& c) {
  const int64_t d = c.d_model, H = c.n_heads;
  if (c.mla()) {
    const int64_t q =
        c.q_lora_rank > 0 ? d * c.q_lora_rank + c.q_lora_rank * H * c.head_dim : d * H * c.head_dim;
    return q + d * (c.kv_lora_rank + c.qk_rope_dim) +
           c.kv_lora_rank * H * (c.qk_nope_dim + c.v_head_dim) + H * c.v_head_dim * d;
  }
  return d * H * c.head_dim + d * c.n_kv_heads * c.head_dim + d * c.n_kv_heads * c.v_head_dim +
         H * c.v_head_dim * d;
}
}  // namespace

namespace {
// Weights of the model when each MoE layer uses `experts` of its experts per token; the
// embedding counts when `embedding` (it is a lookup, not a product).
int64_t count_params(const DecoderConfig& c, int64_t experts, bool embedding) {
  const int64_t d = c.d_model;
  int64_t n = d * c.vocab * (embedding && !c.tie_embeddings ? 2 : 1);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    n += attention_params(c);
    if (c.moe_layer[l])
      n += d * c.moe.n_experts + experts * 3 * d * c.moe.d_ff + 3 * d * c.shared_ff;
    else
      n += 3 * d * c.d_ff;
  }
  return n;
}
}  // namespace

int64_t DecoderConfig::active_params() const { return count_params(*this, moe.top_k, false); }
int64_t DecoderConfig::total_params() const { return count_params(*this, moe.n_experts, true); }

int64_t DecoderParams::bytes() const {
  int64_t n = int64_t(embed.nbytes() + norm_out.nbytes() + lm_head.nbytes());
  for (const DecoderLayerParams& l : layers) {
    for (const Tensor* t : {&l.norm_attn, &l.norm_ffn,
                            &l.wq,        &l.wk,
                            &l.wv,        &l.wo,
                            &l.bq,        &l.bk,
                            &l.bv,        &l.bo,
                            &l.q_norm,    &l.k_norm,
                            &l.wq_a,      &l.q_a_norm,
                            &l.wq_b,      &l.wkv_a,
                            &l.kv_a_norm, &l.wkv_b,
                            &l.w1,        &l.w3,
                            &l.w2,        &l.moe.w_gate,
                            &l.moe.w1,    &l.moe.w3,
                            &l.moe.w2,    &l.moe.expert_bias,
                            &l.shared_w1, &l.shared_w3,
                            &l.shared_w2, &l.shared_gate})
      n += int64_t(t->nbytes());
  }
  return n;
}

DecoderModel::DecoderModel(const DecoderConfig& cfg) : cfg_(cfg) {
  if (cfg_.rope.dim == 0) cfg_.rope.dim = cfg_.mla() ? cfg_.qk_rope_dim : cfg_.head_dim;
  cfg_.validate();
  inv_freq_ = cfg_.rope.inv_freq();
  rope_scale_ = float(cfg_.rope.cos_sin_scale());
  if (cfg_.attn_scale == 0) cfg_.attn_scale = 1.0 / std::sqrt(double(cfg_.head_dim));
  if (cfg_.n_moe_layers() > 0) moe_.emplace(cfg_.moe);
  routing_.clear();
}

DecoderState DecoderModel::start() const {
  DecoderState s;
  s.layers.resize(size_t(cfg_.n_layers));
  return s;
}

void DecoderModel::check_params(const DecoderParams& p) const {
  const DecoderConfig& c = cfg_;
  const int64_t d = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
  auto mat = [](const Tensor& t, std::initializer_list<int64_t> shape, const std::string& what) {
    expect_shape(t, shape, what);
    if (t.dtype() != DType::kF32 && t.dtype() != DType::kBF16)
      throw ShapeError(
          fmt::format("{}: dtype {}, expected f32 or bf16", what, dtype_name(t.dtype())));
  };
  auto f32 = [](const Tensor& t, std::initializer_list<int64_t> shape, const std::string& what) {
    expect_shape(t, shape, what);
    expect_dtype(t, DType::kF32, what);
  };
  mat(p.embed, {c.vocab, d}, "embed");
  f32(p.norm_out, {d}, "norm_out");
  mat(p.lm_head, {d, c.vocab}, "lm_head");
  if (int64_t(p.layers.size()) != c.n_layers)
    throw ShapeError(fmt::format("{} layers of weights, expected {}", p.layers.size(), c.n_layers));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const DecoderLayerParams& lp = p.layers[l];
    const std::string at = fmt::format("layers.{}.", l);
    f32(lp.norm_attn, {d}, at + "norm_attn");
    f32(lp.norm_ffn, {d}, at + "norm_ffn");
    mat(lp.wo, {H * c.v_head_dim, d}, at + "wo");
    if (c.o_bias) f32(lp.bo, {d}, at + "bo");
    if (c.mla()) {
      if (c.q_lora_rank > 0) {
        mat(lp.wq_a, {d, c.q_lora_rank}, at + "wq_a");
        f32(lp.q_a_norm, {c.q_lora_rank}, at + "q_a_norm");
        mat(lp.wq_b, {c.q_lora_rank, H * c.head_dim}, at + "wq_b");
      } else {
        mat(lp.wq, {d, H * c.head_dim}, at + "wq");
      }
      mat(lp.wkv_a, {d, c.kv_lora_rank + c.qk_rope_dim}, at + "wkv_a");
      f32(lp.kv_a_norm, {c.kv_lora_rank}, at + "kv_a_norm");
      mat(lp.wkv_b, {c.kv_lora_rank, H * (c.qk_nope_dim + c.v_head_dim)}, at + "wkv_b");
    } else {
      mat(lp.wq, {d, H * c.head_dim}, at + "wq");
      mat(lp.wk, {d, Hkv * c.head_dim}, at + "wk");
      mat(lp.wv, {d, Hkv * c.v_head_dim}, at + "wv");
      if (c.qkv_bias) {
        f32(lp.bq, {H * c.head_dim}, at + "bq");
        f32(lp.bk, {Hkv * c.head_dim}, at + "bk");
        f32(lp.bv, {Hkv * c.v_head_dim}, at + "bv");
      }
      if (c.qk_norm == QkNorm::kPerHead) {
        f32(lp.q_norm, {c.head_dim}, at + "q_norm");
        f32(lp.k_norm, {c.head_dim}, at + "k_norm");
      } else if (c.qk_norm == QkNorm::kFull) {
        f32(lp.q_norm, {H * c.head_dim}, at + "q_norm");
        f32(lp.k_norm, {Hkv * c.head_dim}, at + "k_norm");
      }
    }
    if (c.moe_layer[l]) {
      const int64_t E = c.moe.n_experts, f = c.moe.d_ff;
      f32(lp.moe.w_gate, {d, E}, at + "moe.w_gate");
      mat(lp.moe.w1, {E, d, f}, at + "moe.w1");
      mat(lp.moe.w3, {E, d, f}, at + "moe.w3");
      mat(lp.moe.w2, {E, f, d}, at + "moe.w2");
      if (lp.moe.w1.dtype() != lp.moe.w3.dtype() || lp.moe.w1.dtype() != lp.moe.w2.dtype())
        throw ShapeError(at + "moe.w1/w3/w2: expected one dtype for all three");
      if (!lp.moe.expert_bias.empty()) f32(lp.moe.expert_bias, {E}, at + "moe.expert_bias");
      if (c.shared_ff > 0) {
        mat(lp.shared_w1, {1, d, c.shared_ff}, at + "shared_w1");
        mat(lp.shared_w3, {1, d, c.shared_ff}, at + "shared_w3");
        mat(lp.shared_w2, {1, c.shared_ff, d}, at + "shared_w2");
        if (c.shared_gate) f32(lp.shared_gate, {d, 1}, at + "shared_gate");
      }
    } else {
      mat(lp.w1, {1, d, c.d_ff}, at + "w1");
      mat(lp.w3, {1, d, c.d_ff}, at + "w3");
      mat(lp.w2, {1, c.d_ff, d}, at + "w2");
    }
  }
}

namespace {

// Rotates the `dim` dims starting at `at` of each of `heads` rows of width `stride` (one
// position): pairs (i, i + dim/2), or de-interleaved from (2i, 2i + 1) as transformers' DeepSeek
// does (the output is in rotate-half order; queries and keys get the same permutation).
void rope_rows(float* x, int64_t heads, int64_t stride, int64_t at, int64_t dim, bool interleaved,
               const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  float tmp[1024];
  SY_CHECK(dim <= 1024, "rope dim {}", dim);
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * stride + at;
    if (interleaved) {
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        tmp[i] = a * cos[i] - b * sin[i];
        tmp[half + i] = b * cos[i] + a * sin[i];
      }
      std::copy_n(tmp, dim, v);
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
      }
    }
  }
}

}  // namespace

namespace {

// x[0, n) <- softmax(x[0, n)), in float32 with the maximum subtracted first.
void softmax_in_place(float* x, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = mx > x[j] ? mx : x[j];
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = cpu::detail::exp_fast(x[j] - mx);
    sum += x[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

// One query row against keys [j0, j1) of one kv head: p = softmax(scale q.k), o = p V.
// Key rows are dk * kv_heads floats apart, value rows dv * kv_heads; p: scratch of j1 - j0.
void attend_row(const float* q, const float* k, const float* v, int64_t kv_heads, int64_t j0,
                int64_t j1, int64_t dk, int64_t dv, float scale, float* p, float* o) {
  const int64_t m = j1 - j0;
  for (int64_t j = 0; j < m; ++j) {
    const float* kj = k + (j0 + j) * kv_heads * dk;
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t t = 0; t < dk; ++t) dot += q[t] * kj[t];
    p[j] = dot * scale;
  }
  softmax_in_place(p, m);
  std::fill_n(o, dv, 0.0f);
  for (int64_t j = 0; j < m; ++j) {
    const float w = p[j];
    const float* vj = v + (j0 + j) * kv_heads * dv;
#pragma omp simd
    for (int64_t t = 0; t < dv; ++t) o[t] += w * vj[t];
  }
}

// Positions per GEMM block, and the fewest query rows (positions x heads per kv head) worth
// the copies into contiguous operands.
constexpr int64_t kAttnBlock = 64;
constexpr int64_t kAttnGemmRows = 32;

}  // namespace

void cached_attention(const AttentionShape& s, const float* q, int64_t n, int64_t first,
                      const float* k, const float* v, float* o, const Backend& be) {
  const int64_t H = s.n_heads, Hkv = s.n_kv_heads, dk = s.dk, dv = s.dv, group = H / Hkv;
  const int64_t m = first + n;
  SY_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && n > 0 && first >= 0, "attention shape");
  auto lo = [&](int64_t pos) {
    return s.window > 0 ? std::max<int64_t>(0, pos - s.window + 1) : int64_t(0);
  };
  if (n * group < kAttnGemmRows) {
#pragma omp parallel
    {
      std::vector<float> p(static_cast<size_t>(m));
#pragma omp for collapse(2) schedule(dynamic, 4)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t pos = first + i, g = h / group;
          attend_row(q + (i * H + h) * dk, k + g * dk, v + g * dv, Hkv, lo(pos), pos + 1, dk,
                     dv, s.scale, p.data(), o + (i * H + h) * dv);
        }
    }
    return;
  }
  // Each kv head's keys and values made contiguous, [Hkv][m][dk] and [Hkv][m][dv], then per
  // (kv head, block of positions): S = scale Q K^T over the keys the block sees, the masked
  // softmax per row, O = P V. The rows of a block are its positions x the group's heads.
  std::vector<float> kh(static_cast<size_t>(Hkv * m * dk)), vh(static_cast<size_t>(Hkv * m * dv));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t g = 0; g < Hkv; ++g)
    for (int64_t j = 0; j < m; ++j) {
      std::copy_n(k + (j * Hkv + g) * dk, dk, kh.data() + (g * m + j) * dk);
      std::copy_n(v + (j * Hkv + g) * dv, dv, vh.data() + (g * m + j) * dv);
    }
  // The scores and probabilities stay f32 whatever the context's precision: rounding them to
  // bf16 for the GEMMs costs more passes over them than bf16 compute saves (measured on the
  // Qwen3-30B-A3B shapes, bench/README.md).
  const Backend& f32 = be.f32 != nullptr ? *be.f32 : be;
  const int64_t n_blocks = (n + kAttnBlock - 1) / kAttnBlock;
#pragma omp parallel
  {
    std::vector<float> qb, sb, ob;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t i0 = b * kAttnBlock, i1 = std::min(n, i0 + kAttnBlock);
        const int64_t rows = (i1 - i0) * group;
        const int64_t j0 = lo(first + i0), j1 = first + i1, span = j1 - j0;
        qb.resize(size_t(rows * dk));
        sb.resize(size_t(rows * span));
        ob.resize(size_t(rows * dv));
        for (int64_t i = i0; i < i1; ++i)
          std::copy_n(q + (i * H + g * group) * dk, group * dk, qb.data() + (i - i0) * group * dk);
        f32.gemm<float>(false, true, s.scale, {qb.data(), rows, dk},
                       {kh.data() + (g * m + j0) * dk, span, dk}, 0.0f, {sb.data(), rows, span});
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pos = first + i0 + r / group;
          const int64_t a = lo(pos) - j0, e = pos + 1 - j0;  // the row's keys: [a, e)
          float* sr = sb.data() + r * span;
          softmax_in_place(sr + a, e - a);
          std::fill(sr, sr + a, 0.0f);
          std::fill(sr + e, sr + span, 0.0f);
        }
        f32.gemm<float>(false, false, 1.0f, {sb.data(), rows, span},
                       {vh.data() + (g * m + j0) * dv, span, dv}, 0.0f, {ob.data(), rows, dv});
        for (int64_t i = i0; i < i1; ++i)
          std::copy_n(ob.data() + (i - i0) * group * dv, group * dv,
                      o + (i * H + g * group) * dv);
      }
  }
}

void DecoderModel::attention(const DecoderLayerParams& lp, int64_t layer, const Rows& rows,
                             DecoderScratch& sc, const ExecContext& ctx) const {
  const DecoderConfig& c = cfg_;
  const Backend& be = backend_of(ctx);
  double t0 = ctx.profile ? wall_seconds() : 0;
  const int64_t H = c.n_heads, Hkv = c.mla() ? c.n_heads : c.n_kv_heads;
  const int64_t dk = c.head_dim, dv = c.v_head_dim, n = rows.n();
  ConstMatrixView<float> h = sc.h.matrix<float>();

  // RoPE tables for the new positions: [n, dim/2], float32 angles as transformers forms them.
  const int64_t half = c.rope.dim / 2;
  std::vector<float> cos(static_cast<size_t>(n * half)), sin(static_cast<size_t>(n * half));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < half; ++j) {
      const float angle = float(rows.pos[i]) * inv_freq_[j];
      cos[i * half + j] = float(std::cos(angle)) * rope_scale_;
      sin[i * half + j] = float(std::sin(angle)) * rope_scale_;
    }

  // Each sequence's cache grows by its new rows; row i's key and value go to its position.
  for (size_t q = 0; q < rows.states.size(); ++q) {
    DecoderState::Layer& kv = rows.states[q]->layers[layer];
    const int64_t m = rows.states[q]->n_pos + rows.start[q + 1] - rows.start[q];
    kv.k.resize(size_t(m * Hkv * dk));
    kv.v.resize(size_t(m * Hkv * dv));
  }
  auto knew = [&](int64_t i) {
    return rows.states[rows.seq[i]]->layers[layer].k.data() + rows.pos[i] * Hkv * dk;
  };
  auto vnew = [&](int64_t i) {
    return rows.states[rows.seq[i]]->layers[layer].v.data() + rows.pos[i] * Hkv * dv;
  };

  if (c.mla()) {
    const int64_t dn = c.qk_nope_dim, dr = c.qk_rope_dim, r = c.kv_lora_rank;
    if (c.q_lora_rank > 0) {
      linear(be, h, lp.wq_a, {}, sc.a);
      // transformers' DeepseekV3RMSNorm on the low-rank parts keeps its default eps of 1e-6.
      rms_norm(sc.a.data<float>(), sc.a.data<float>(), n, c.q_lora_rank, lp.q_a_norm.data<float>(),
               1e-6);
      linear(be, sc.a.matrix<float>(), lp.wq_b, {}, sc.q);
    } else {
      linear(be, h, lp.wq, {}, sc.q);
    }
    linear(be, h, lp.wkv_a, {}, sc.b);  // [n, r + dr]: latent | shared rotary key
    sc.latent.resize_for_overwrite({n, r}, DType::kF32);
    float* lat = sc.latent.data<float>();
    const float* ckv = sc.b.data<float>();
    for (int64_t i = 0; i < n; ++i) std::copy_n(ckv + i * (r + dr), r, lat + i * r);
    rms_norm(lat, lat, n, r, lp.kv_a_norm.data<float>(), 1e-6);
    linear(be, sc.latent.matrix<float>(), lp.wkv_b, {}, sc.kv);  // [n, H (dn + dv)]
    float* q = sc.q.data<float>();
    const float* kvp = sc.kv.data<float>();
    std::vector<float> krot(static_cast<size_t>(dr));
    for (int64_t i = 0; i < n; ++i) {
      rope_rows(q + i * H * dk, H, dk, dn, dr, c.rope.interleaved, &cos[i * half], &sin[i * half]);
      std::copy_n(ckv + i * (r + dr) + r, dr, krot.data());
      rope_rows(krot.data(), 1, dr, 0, dr, c.rope.interleaved, &cos[i * half], &sin[i * half]);
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* src = kvp + (i * H + hh) * (dn + dv);
        float* kd = knew(i) + hh * dk;
        std::copy_n(src, dn, kd);
        std::copy_n(krot.data(), dr, kd + dn);
        std::copy_n(src + dn, dv, vnew(i) + hh * dv);
      }
    }
  } else {
    linear(be, h, lp.wq, lp.bq, sc.q);
    linear(be, h, lp.wk, lp.bk, sc.k);
    linear(be, h, lp.wv, lp.bv, sc.v);
    float *q = sc.q.data<float>(), *k = sc.k.data<float>(), *v = sc.v.data<float>();
    if (c.qk_norm == QkNorm::kFull) {
      rms_norm(q, q, n, H * dk, lp.q_norm.data<float>(), c.norm_eps);
      rms_norm(k, k, n, Hkv * dk, lp.k_norm.data<float>(), c.norm_eps);
    } else if (c.qk_norm == QkNorm::kPerHead) {
      rms_norm(q, q, n * H, dk, lp.q_norm.data<float>(), c.norm_eps);
      rms_norm(k, k, n * Hkv, dk, lp.k_norm.data<float>(), c.norm_eps);
    }
    if (c.clip_qkv > 0) {
      const float lim = float(c.clip_qkv);
      for (Tensor* t : {&sc.q, &sc.k, &sc.v})
        for (float& x : t->span<float>()) x = std::clamp(x, -lim, lim);
    }
    for (int64_t i = 0; i < n; ++i) {
      rope_rows(q + i * H * dk, H, dk, 0, c.rope.dim, c.rope.interleaved, &cos[i * half],
                &sin[i * half]);
      rope_rows(k + i * Hkv * dk, Hkv, dk, 0, c.rope.dim, c.rope.interleaved, &cos[i * half],
                &sin[i * half]);
    }
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(k + i * Hkv * dk, Hkv * dk, knew(i));
      std::copy_n(v + i * Hkv * dv, Hkv * dv, vnew(i));
    }
  }

  if (ctx.profile) times_.qkv += wall_seconds() - t0, t0 = wall_seconds();
  // Causal (and windowed) softmax attention of each sequence's new queries over its cache.
  sc.o.resize_for_overwrite({n, H * dv}, DType::kF32);
  const AttentionShape shape{.n_heads = H,
                             .n_kv_heads = Hkv,
                             .dk = dk,
                             .dv = dv,
                             .window = c.window[layer],
                             .scale = float(c.attn_scale)};
  for (size_t qs = 0; qs < rows.states.size(); ++qs) {
    const int64_t r0 = rows.start[qs], r1 = rows.start[qs + 1];
    const DecoderState::Layer& kv = rows.states[qs]->layers[layer];
    cached_attention(shape, sc.q.data<float>() + r0 * H * dk, r1 - r0, rows.pos[size_t(r0)],
                     kv.k.data(), kv.v.data(), sc.o.data<float>() + r0 * H * dv, be);
  }
  if (ctx.profile) times_.attend += wall_seconds() - t0, t0 = wall_seconds();
  linear(be, sc.o.matrix<float>(), lp.wo, lp.bo, sc.y);
  if (ctx.profile) times_.out_proj += wall_seconds() - t0;
}

void DecoderModel::feed_forward(const DecoderLayerParams& lp, int64_t layer, int64_t n,
                                DecoderScratch& sc, const ExecContext& ctx) const {
  const DecoderConfig& c = cfg_;
  const Backend& be = backend_of(ctx);
  const int64_t d = c.d_model;
  sc.y.resize_for_overwrite({n, d}, DType::kF32);
  double t0 = ctx.profile ? wall_seconds() : 0;
  if (!c.moe_layer[layer]) {
    const int32_t offsets[2] = {0, int32_t(n)};
    experts(be, lp.w1, lp.w3, lp.w2, sc.h.matrix<float>(), offsets, sc.y.matrix<float>(),
            sc.experts);
    if (ctx.profile) times_.dense_ffn += wall_seconds() - t0;
    return;
  }
  ExecContext eval = ctx;
  eval.training = false;
  MoeForward f = moe_->forward(lp.moe, sc.h, sc.y, sc.moe, eval);
  if (ctx.profile) {
    times_.moe_total += wall_seconds() - t0;
    const MoeTimes& m = sc.moe.times;
    times_.moe.router += m.router, times_.moe.plan += m.plan, times_.moe.gather += m.gather;
    times_.moe.experts += m.experts, times_.moe.combine += m.combine;
    t0 = wall_seconds();
  }
  routing_.push_back(std::move(f.stats));
  const int64_t k = moe_->config().slots_per_token();
  experts_.emplace_back(sc.moe.router.expert.begin(), sc.moe.router.expert.begin() + n * k);
  float* y = sc.y.data<float>();
  if (c.routed_scaling != 1.0) {
    const float s = float(c.routed_scaling);
    for (int64_t i = 0; i < n * d; ++i) y[i] *= s;
  }
  if (c.shared_ff > 0) {
    const int32_t offsets[2] = {0, int32_t(n)};
    sc.c.resize_for_overwrite({n, d}, DType::kF32);
    experts(be, lp.shared_w1, lp.shared_w3, lp.shared_w2, sc.h.matrix<float>(), offsets,
            sc.c.matrix<float>(), sc.experts);
    const float* ys = sc.c.data<float>();
    const float* h = sc.h.data<float>();
    for (int64_t i = 0; i < n; ++i) {
      float gate = 1;
      if (c.shared_gate) {
        float z = 0;
        const float* g = lp.shared_gate.data<float>();
        for (int64_t j = 0; j < d; ++j) z += h[i * d + j] * g[j];
        gate = 1.0f / (1.0f + std::exp(-z));
      }
      for (int64_t j = 0; j < d; ++j) y[i * d + j] += gate * ys[i * d + j];
    }
    if (ctx.profile) times_.shared += wall_seconds() - t0;
  }
}

std::vector<std::vector<int32_t>> DecoderModel::last_top1() const {
  const int64_t k = moe_ ? moe_->config().slots_per_token() : 1;
  std::vector<std::vector<int32_t>> top1;
  for (const std::vector<int32_t>& layer : experts_) {
    std::vector<int32_t>& t = top1.emplace_back();
    for (size_t i = 0; i < layer.size(); i += size_t(k)) t.push_back(layer[i]);
  }
  return top1;
}

void DecoderModel::forward(const DecoderParams& p, std::span<const int32_t> tokens, DecoderState& s,
                           Tensor& logits, const ExecContext& ctx, bool all_positions) const {
  const std::span<const int32_t> one[1] = {tokens};
  DecoderState* const state[1] = {&s};
  const int64_t n = int64_t(tokens.size());
  forward_rows(p, one, state, ctx);
  const ConstMatrixView<float> h = scratch_.h.matrix<float>();
  const double t0 = ctx.profile ? wall_seconds() : 0;
  linear(backend_of(ctx), all_positions ? h : h.slice_rows(n - 1, n), p.lm_head, {}, logits);
  if (ctx.profile) times_.lm_head = wall_seconds() - t0;
}

void DecoderModel::forward_batch(const DecoderParams& p,
                                 std::span<const std::span<const int32_t>> tokens,
                                 std::span<DecoderState* const> states, Tensor& logits,
                                 const ExecContext& ctx) const {
  forward_rows(p, tokens, states, ctx);
  // Only each sequence's last position's logits: one skinny product over those rows.
  const int64_t d = cfg_.d_model, S = int64_t(tokens.size());
  DecoderScratch& sc = scratch_;
  sc.last.resize_for_overwrite({S, d}, DType::kF32);
  int64_t end = 0;
  for (int64_t q = 0; q < S; ++q) {
    end += int64_t(tokens[q].size());
    std::copy_n(sc.h.data<float>() + (end - 1) * d, d, sc.last.data<float>() + q * d);
  }
  const double t0 = ctx.profile ? wall_seconds() : 0;
  linear(backend_of(ctx), sc.last.matrix<float>(), p.lm_head, {}, logits);
  if (ctx.profile) times_.lm_head = wall_seconds() - t0;
}

void DecoderModel::forward_rows(const DecoderParams& p,
                                std::span<const std::span<const int32_t>> tokens,
                                std::span<DecoderState* const> states,
                                const ExecContext& ctx) const {
  const DecoderConfig& c = cfg_;
  if (tokens.empty() || tokens.size() != states.size())
    throw ShapeError(
        fmt::format("decoder forward: {} token lists for {} sequences: expected as "
                    "many, at least one",
                    tokens.size(), states.size()));
  Rows rows;
  rows.states = states;
  rows.start.push_back(0);
  std::vector<int32_t> all;  // every sequence's new tokens, one after another
  for (size_t q = 0; q < tokens.size(); ++q) {
    const DecoderState& s = *states[q];
    const int64_t n = int64_t(tokens[q].size());
    if (n == 0) throw ShapeError(fmt::format("decoder forward: sequence {}: no tokens", q));
    if (s.n_pos + n > c.max_context)
      throw ShapeError(
          fmt::format("{} positions after {}: past the context of {} "
                      "(max_position_embeddings)",
                      n, s.n_pos, c.max_context));
    if (int64_t(s.layers.size()) != c.n_layers)
      throw ShapeError("decoder state: not from this model's start()");
    for (int32_t t : tokens[q])
      if (t < 0 || t >= c.vocab)
        throw ShapeError(fmt::format("token {} outside the vocabulary [0, {})", t, c.vocab));
    for (int64_t i = 0; i < n; ++i) {
      rows.seq.push_back(int32_t(q));
      rows.pos.push_back(s.n_pos + i);
    }
    all.insert(all.end(), tokens[q].begin(), tokens[q].end());
    rows.start.push_back(int64_t(all.size()));
  }
  const int64_t n = rows.n(), d = c.d_model;
  const ThreadScope threads(ctx.n_threads);
  DecoderScratch& sc = scratch_;
  routing_.clear();
  experts_.clear();
  times_ = {};

  sc.x.resize_for_overwrite({n, d}, DType::kF32);
  float* x = sc.x.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (p.embed.dtype() == DType::kF32) {
      std::copy_n(p.embed.data<float>() + int64_t(all[i]) * d, d, x + i * d);
    } else {
      const bf16* e = p.embed.data<bf16>() + int64_t(all[i]) * d;
      for (int64_t j = 0; j < d; ++j) x[i * d + j] = to_float(e[j]);
    }
  }
  sc.h.resize_for_overwrite({n, d}, DType::kF32);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const DecoderLayerParams& lp = p.layers[l];
    rms_norm(x, sc.h.data<float>(), n, d, lp.norm_attn.data<float>(), c.norm_eps);
    attention(lp, l, rows, sc, ctx);
    const float* y = sc.y.data<float>();
    for (int64_t i = 0; i < n * d; ++i) x[i] += y[i];
    rms_norm(x, sc.h.data<float>(), n, d, lp.norm_ffn.data<float>(), c.norm_eps);
    feed_forward(lp, l, n, sc, ctx);
    y = sc.y.data<float>();
    for (int64_t i = 0; i < n * d; ++i) x[i] += y[i];
  }
  for (size_t q = 0; q < states.size(); ++q) states[q]->n_pos += rows.start[q + 1] - rows.start[q];
  rms_norm(x, sc.h.data<float>(), n, d, p.norm_out.data<float>(), c.norm_eps);
}

}  // namespace sy
