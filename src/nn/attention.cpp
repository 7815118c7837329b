// Causal multi-head attention with RoPE. The projections are whole-batch GEMMs; the score and
// value products run one (sequence, head) pair per task, each a single-tile GEMM, in parallel.
// Every output element is still computed by one thread in a fixed order, so the result does
// not depend on the thread count.
#include "switchyard/nn/attention.h"

#include <omp.h>

#include <cmath>
#include <cstring>

#include "switchyard/core/rng.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

// Rotates the pairs (i, i + half) of one head row by the angles whose cos/sin are given;
// inverse rotates back (the adjoint, for backward).
template <class T>
void rotate(const T* in, T* out, const double* c, const double* s, int64_t half, bool inverse) {
  for (int64_t i = 0; i < half; ++i) {
    const T a = in[i], b = in[i + half];
    const T ci = T(c[i]), si = inverse ? T(-s[i]) : T(s[i]);
    out[i] = a * ci - b * si;
    out[i + half] = a * si + b * ci;
  }
}

// Rows [b*L, (b+1)*L) of a [T, width] matrix, columns [col, col + dh): head slice of sequence b.
template <class T>
void copy_head_out(const T* src, int64_t ld, int64_t L, int64_t dh, T* dst) {
  for (int64_t t = 0; t < L; ++t) std::memcpy(dst + t * dh, src + t * ld, size_t(dh) * sizeof(T));
}
template <class T>
void copy_head_in(const T* src, int64_t L, int64_t dh, T* dst, int64_t ld) {
  for (int64_t t = 0; t < L; ++t) std::memcpy(dst + t * ld, src + t * dh, size_t(dh) * sizeof(T));
}

}  // namespace

Attention::Attention(const AttentionConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  const int64_t half = head_dim() / 2;
  cos_.resize(size_t(cfg_.max_context * half));
  sin_.resize(cos_.size());
  for (int64_t pos = 0; pos < cfg_.max_context; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(pos) * std::pow(cfg_.rope_theta, -2.0 * double(i) / double(2 * half));
      cos_[pos * half + i] = std::cos(angle);
      sin_[pos * half + i] = std::sin(angle);
    }
}

AttentionParams init_attention_params(const AttentionConfig& cfg, DType dtype, uint64_t seed,
                                      double out_scale) {
  cfg.validate();
  const int64_t d = cfg.d_model;
  auto init = [&](std::initializer_list<int64_t> shape, double stddev, uint64_t stream) {
    Tensor t(shape, DType::kF64);
    fill_normal(t.span<double>(), Philox(seed, stream), stddev);
    return convert(t, dtype);
  };
  const double s = 1.0 / std::sqrt(double(d));
  return {init({d, 3 * d}, s, 0), init({d, d}, s * out_scale, 1)};
}

void Attention::check_params(const AttentionParams& p) const {
  const int64_t d = cfg_.d_model;
  expect_shape(p.w_qkv, {d, 3 * d}, "attn.w_qkv");
  expect_shape(p.w_o, {d, d}, "attn.w_o");
  expect_dtype(p.w_o, p.w_qkv.dtype(), "attn.w_o", "attn.w_qkv's dtype");
}

KvCache Attention::start(DType dtype) const {
  KvCache kv;
  kv.k = Tensor({cfg_.n_heads, cfg_.max_context, head_dim()}, dtype);
  kv.v = Tensor({cfg_.n_heads, cfg_.max_context, head_dim()}, dtype);
  return kv;
}

void Attention::forward(const AttentionParams& p, const Tensor& x, int64_t n_seq, Tensor& y,
                        AttentionCache& cache, const ExecContext& ctx) const {
  check_params(p);
  ThreadScope threads(ctx.n_threads);
  if (x.rank() != 2 || x.dim(1) != cfg_.d_model)
    throw ShapeError(fmt::format("attention input {}: expected [T, {}]", x.shape_str(), cfg_.d_model));
  if (n_seq < 1 || x.dim(0) % n_seq != 0 || x.dim(0) / n_seq > cfg_.max_context)
    throw ShapeError(fmt::format(
        "attention input of {} rows as {} sequences: expected equal sequences of at most {} "
        "positions (model.context)",
        x.dim(0), n_seq, cfg_.max_context));
  expect_dtype(x, p.w_qkv.dtype(), "attention input", "attn.w_qkv's dtype");
  if (x.dtype() == DType::kF64)
    forward_impl<double>(p, x, n_seq, y, cache, backend_of(ctx));
  else
    forward_impl<float>(p, x, n_seq, y, cache, backend_of(ctx));
}

template <class T>
void Attention::forward_impl(const AttentionParams& p, const Tensor& x, int64_t n_seq, Tensor& y,
                             AttentionCache& c, const Backend& be) const {
  const int64_t n = x.dim(0), d = cfg_.d_model, H = cfg_.n_heads, dh = head_dim(), half = dh / 2;
  const int64_t L = n / n_seq;
  const DType dt = dtype_of<T>();
  c.n_seq = n_seq;
  c.x.resize({n, d}, dt);
  std::memcpy(c.x.data<T>(), x.data<T>(), x.nbytes());
  c.qkv.resize({n, 3 * d}, dt);
  c.q.resize({n_seq, H, L, dh}, dt);
  c.k.resize({n_seq, H, L, dh}, dt);
  c.v.resize({n_seq, H, L, dh}, dt);
  c.probs.resize({n_seq, H, L, L}, dt);
  c.o.resize({n, d}, dt);
  y.resize({n, d}, dt);
  be.gemm<T>(false, false, T(1), x.matrix<T>(), p.w_qkv.matrix<T>(), T(0), c.qkv.matrix<T>());

  // Split into heads, rotating q and k by position.
  const T* qkv = c.qkv.data<T>();
  T *q = c.q.data<T>(), *k = c.k.data<T>(), *v = c.v.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = r / L, t = r % L;
    const double *cs = cos_.data() + t * half, *sn = sin_.data() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t at = ((b * H + h) * L + t) * dh;
      const T* row = qkv + r * 3 * d + h * dh;
      rotate(row, q + at, cs, sn, half, false);
      rotate(row + d, k + at, cs, sn, half, false);
      std::memcpy(v + at, row + 2 * d, size_t(dh) * sizeof(T));
    }
  }

  const T scale = T(1) / std::sqrt(T(dh));
  T* o = c.o.data<T>();
  c.scratch.resize({max_threads(), L * (L + dh)}, dt);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < n_seq * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    MatrixView<const T> qh{q + bh * L * dh, L, dh}, kh{k + bh * L * dh, L, dh},
        vh{v + bh * L * dh, L, dh};
    MatrixView<T> ph{c.probs.data<T>() + bh * L * L, L, L};
    MatrixView<T> oh{c.scratch.data<T>() + omp_get_thread_num() * L * (L + dh), L, dh};
    be.gemm<T>(false, true, scale, qh, kh, T(0), ph);
    cpu::softmax_causal_rows<T>(ph, 0, ph);
    be.gemm<T>(false, false, T(1), ph, vh, T(0), oh);
    copy_head_in(oh.data, L, dh, o + b * L * d + h * dh, d);
  }
  be.gemm<T>(false, false, T(1), c.o.matrix<T>(), p.w_o.matrix<T>(), T(0), y.matrix<T>());
}

void Attention::backward(const AttentionParams& p, AttentionCache& cache, const Tensor& dy,
                         AttentionParams& g, Tensor& dx, const ExecContext& ctx) const {
  ThreadScope threads(ctx.n_threads);
  expect_shape(dy, cache.o.shape(), "attention dy");
  expect_dtype(dy, cache.o.dtype(), "attention dy");
  if (dy.dtype() == DType::kF64)
    backward_impl<double>(p, cache, dy, g, dx, backend_of(ctx));
  else
    backward_impl<float>(p, cache, dy, g, dx, backend_of(ctx));
}

template <class T>
void Attention::backward_impl(const AttentionParams& p, AttentionCache& c, const Tensor& dy,
                              AttentionParams& g, Tensor& dx, const Backend& be) const {
  const int64_t n = c.x.dim(0), d = cfg_.d_model, H = cfg_.n_heads, dh = head_dim(), half = dh / 2;
  const int64_t n_seq = c.n_seq, L = n / n_seq;
  const DType dt = dtype_of<T>();
  // y = o w_o: dw_o += o^T dy; do = dy w_o^T (into o, no longer needed).
  be.gemm<T>(true, false, T(1), c.o.matrix<T>(), dy.matrix<T>(), T(1), g.w_o.matrix<T>());
  be.gemm<T>(false, true, T(1), dy.matrix<T>(), p.w_o.matrix<T>(), T(0), c.o.matrix<T>());

  const int64_t n_threads = max_threads();
  c.dq.resize({n_seq, H, L, dh}, dt);
  c.dk.resize({n_seq, H, L, dh}, dt);
  c.dv.resize({n_seq, H, L, dh}, dt);
  c.scratch.resize({n_threads, L * (L + dh)}, dt);
  const T scale = T(1) / std::sqrt(T(dh));
  const T *q = c.q.data<T>(), *k = c.k.data<T>(), *v = c.v.data<T>(), *dout = c.o.data<T>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < n_seq * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    T* scratch = c.scratch.data<T>() + omp_get_thread_num() * L * (L + dh);
    MatrixView<T> dp{scratch, L, L}, doh{scratch + L * L, L, dh};
    copy_head_out(dout + b * L * d + h * dh, d, L, dh, doh.data);
    MatrixView<const T> qh{q + bh * L * dh, L, dh}, kh{k + bh * L * dh, L, dh},
        vh{v + bh * L * dh, L, dh};
    MatrixView<const T> ph{c.probs.data<T>() + bh * L * L, L, L};
    // o = P v: dv = P^T do, dP = do v^T; then through the softmax; s = scale q k^T.
    be.gemm<T>(true, false, T(1), ph, doh, T(0), {c.dv.data<T>() + bh * L * dh, L, dh});
    be.gemm<T>(false, true, T(1), doh, vh, T(0), dp);
    cpu::softmax_rows_backward<T>(ph, dp, dp);
    be.gemm<T>(false, false, scale, dp, kh, T(0), {c.dq.data<T>() + bh * L * dh, L, dh});
    be.gemm<T>(true, false, scale, dp, qh, T(0), {c.dk.data<T>() + bh * L * dh, L, dh});
  }

  // Merge heads back into dqkv, rotating dq and dk back (the adjoint of the rotation).
  c.dqkv.resize({n, 3 * d}, dt);
  T* dqkv = c.dqkv.data<T>();
  const T *dq = c.dq.data<T>(), *dk = c.dk.data<T>(), *dv = c.dv.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = r / L, t = r % L;
    const double *cs = cos_.data() + t * half, *sn = sin_.data() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t at = ((b * H + h) * L + t) * dh;
      T* row = dqkv + r * 3 * d + h * dh;
      rotate(dq + at, row, cs, sn, half, true);
      rotate(dk + at, row + d, cs, sn, half, true);
      std::memcpy(row + 2 * d, dv + at, size_t(dh) * sizeof(T));
    }
  }
  be.gemm<T>(true, false, T(1), c.x.matrix<T>(), c.dqkv.matrix<T>(), T(1), g.w_qkv.matrix<T>());
  dx.resize({n, d}, dt);
  be.gemm<T>(false, true, T(1), c.dqkv.matrix<T>(), p.w_qkv.matrix<T>(), T(0), dx.matrix<T>());
}

void Attention::decode(const AttentionParams& p, const Tensor& x, KvCache& kv, Tensor& y,
                       const ExecContext& ctx) const {
  const int64_t starts[2] = {0, x.rank() == 2 ? x.dim(0) : 0};
  KvCache* const kvs[1] = {&kv};
  decode_batch(p, x, starts, kvs, y, ctx);
}

void Attention::decode_batch(const AttentionParams& p, const Tensor& x,
                             std::span<const int64_t> starts, std::span<KvCache* const> kvs,
                             Tensor& y, const ExecContext& ctx) const {
  check_params(p);
  if (x.rank() != 2 || x.dim(1) != cfg_.d_model)
    throw ShapeError(fmt::format("attention input {}: expected [n, {}]", x.shape_str(), cfg_.d_model));
  if (starts.size() != kvs.size() + 1 || starts.front() != 0 || starts.back() != x.dim(0))
    throw ShapeError(fmt::format("decode: {} row starts for {} sequences and {} rows: expected "
                                 "sequences + 1 from 0 to the rows",
                                 starts.size(), kvs.size(), x.dim(0)));
  expect_dtype(x, p.w_qkv.dtype(), "attention input", "attn.w_qkv's dtype");
  for (size_t s = 0; s < kvs.size(); ++s) {
    if (starts[s + 1] < starts[s])
      throw ShapeError(fmt::format("decode: sequence {}'s rows end before they start", s));
    if (kvs[s]->n_pos + starts[s + 1] - starts[s] > cfg_.max_context)
      throw ShapeError(fmt::format("decode: {} positions cached + {} new > model.context = {}",
                                   kvs[s]->n_pos, starts[s + 1] - starts[s], cfg_.max_context));
    expect_dtype(kvs[s]->k, x.dtype(), "KV cache", "the input's dtype");
  }
  if (x.dtype() == DType::kF64)
    decode_impl<double>(p, x, starts, kvs, y, backend_of(ctx));
  else
    decode_impl<float>(p, x, starts, kvs, y, backend_of(ctx));
}

template <class T>
void Attention::decode_impl(const AttentionParams& p, const Tensor& x,
                            std::span<const int64_t> starts, std::span<KvCache* const> kvs,
                            Tensor& y, const Backend& be) const {
  const int64_t N = x.dim(0), d = cfg_.d_model, H = cfg_.n_heads, dh = head_dim(), half = dh / 2;
  const int64_t ctx = cfg_.max_context;
  const DType dt = dtype_of<T>();
  Tensor qkv({N, 3 * d}, dt), o({N, d}, dt), q, sc, oh;
  be.gemm<T>(false, false, T(1), x.matrix<T>(), p.w_qkv.matrix<T>(), T(0), qkv.matrix<T>());
  const T scale = T(1) / std::sqrt(T(dh));
  for (size_t seq = 0; seq < kvs.size(); ++seq) {
    KvCache& kv = *kvs[seq];
    const int64_t r0 = starts[seq], n = starts[seq + 1] - r0, pos0 = kv.n_pos, m = pos0 + n;
    if (n == 0) continue;
    q.resize({H, n, dh}, dt);
    sc.resize({H, n, m}, dt);
    oh.resize({H, n, dh}, dt);
    T *kc = kv.k.data<T>(), *vc = kv.v.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = pos0 + i;
      const double *cs = cos_.data() + pos * half, *sn = sin_.data() + pos * half;
      for (int64_t h = 0; h < H; ++h) {
        const T* row = qkv.data<T>() + (r0 + i) * 3 * d + h * dh;
        rotate(row, q.data<T>() + (h * n + i) * dh, cs, sn, half, false);
        rotate(row + d, kc + (h * ctx + pos) * dh, cs, sn, half, false);
        std::memcpy(vc + (h * ctx + pos) * dh, row + 2 * d, size_t(dh) * sizeof(T));
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      MatrixView<T> sh{sc.data<T>() + h * n * m, n, m};
      MatrixView<const T> qh{q.data<T>() + h * n * dh, n, dh}, kh{kc + h * ctx * dh, m, dh},
          vh{vc + h * ctx * dh, m, dh};
      MatrixView<T> out{oh.data<T>() + h * n * dh, n, dh};
      be.gemm<T>(false, true, scale, qh, kh, T(0), sh);
      cpu::softmax_causal_rows<T>(sh, pos0, sh);
      be.gemm<T>(false, false, T(1), sh, vh, T(0), out);
      copy_head_in(out.data, n, dh, o.data<T>() + r0 * d + h * dh, d);
    }
    kv.n_pos = m;
  }
  y.resize({N, d}, dt);
  be.gemm<T>(false, false, T(1), o.matrix<T>(), p.w_o.matrix<T>(), T(0), y.matrix<T>());
}

}  // namespace sy
