// Multi-head attention, causal with RoPE (or bidirectional, without: AttentionConfig). The
// projections are whole-batch GEMMs; the score and value products run one (sequence, head) pair per
// task, each a single-tile GEMM, in parallel; in decode, a sequence's few new rows are attended
// directly (attend_row) in f32 or f64, the input's type, whatever the backend's precision. Every
// output element is still computed by one thread in a fixed order, so the result does not depend on
// the thread count.
#include "switchyard/nn/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

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

// Decode chunks of at most this many rows per sequence are attended row by row (attend_row).
constexpr int64_t kDirectRows = 16;

// One query row against the first `seen` cached keys of a head:
//   out = softmax(scale q K[0:seen]^T) V[0:seen]
// q: [dh], k, v: [seen, dh] (rows dh apart), out: [dh]; scores is scratch. attend_row picks
// this plain form or, for float with dh a multiple of 16, the vector one below.
template <class T>
void attend_row_plain(const T* q, const T* k, const T* v, int64_t seen, int64_t dh, T scale,
                      std::vector<T>& scores, T* out) {
  scores.resize(size_t(seen));
  for (int64_t j = 0; j < seen; ++j) {
    T dot = 0;
    for (int64_t c = 0; c < dh; ++c) dot += q[c] * k[j * dh + c];
    scores[size_t(j)] = scale * dot;
  }
  const MatrixView<T> row{scores.data(), 1, seen};
  cpu::softmax_causal_rows<T>(row, seen - 1, row);
  std::fill_n(out, dh, T(0));
  for (int64_t j = 0; j < seen; ++j)
    for (int64_t c = 0; c < dh; ++c) out[c] += scores[size_t(j)] * v[j * dh + c];
}

// 16 floats (one zmm with AVX-512; the compiler splits it otherwise).
using Vf [[gnu::vector_size(64)]] = float;
using Vi [[gnu::vector_size(64)]] = int32_t;
constexpr int64_t kVf = 16;
inline Vf load_vf(const float* p) {
  Vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float sum_lanes(Vf v) {
  v += __builtin_shuffle(v, Vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, Vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, Vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, Vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// out[c0 : c0 + 16 NV] = sum_j p_j v_j[c0 : c0 + 16 NV], the NV accumulators in registers.
template <int NV>
void weighted_sum(const float* p, const float* v, int64_t seen, int64_t dh, int64_t c0,
                  float* out) {
  Vf acc[NV] = {};
  for (int64_t j = 0; j < seen; ++j) {
    const float* vj = v + j * dh + c0;
    for (int i = 0; i < NV; ++i) acc[i] += p[j] * load_vf(vj + i * kVf);
  }
  for (int i = 0; i < NV; ++i) std::memcpy(out + c0 + i * kVf, &acc[i], sizeof(Vf));
}

// attend_row for float with dh a multiple of 16.
void attend_row_vec(const float* q, const float* k, const float* v, int64_t seen, int64_t dh,
                    float scale, std::vector<float>& scores, float* out) {
  scores.resize(size_t(seen));
  for (int64_t j = 0; j < seen; ++j) {
    const float* kj = k + j * dh;
    Vf acc = load_vf(q) * load_vf(kj);
    for (int64_t c = kVf; c < dh; c += kVf) acc += load_vf(q + c) * load_vf(kj + c);
    scores[size_t(j)] = scale * sum_lanes(acc);
  }
  const MatrixView<float> row{scores.data(), 1, seen};
  cpu::softmax_causal_rows<float>(row, seen - 1, row);
  int64_t c0 = 0;
  for (; c0 + 4 * kVf <= dh; c0 += 4 * kVf) weighted_sum<4>(scores.data(), v, seen, dh, c0, out);
  switch ((dh - c0) / kVf) {
    case 3:
      weighted_sum<3>(scores.data(), v, seen, dh, c0, out);
      break;
    case 2:
      weighted_sum<2>(scores.data(), v, seen, dh, c0, out);
      break;
    case 1:
      weighted_sum<1>(scores.data(), v, seen, dh, c0, out);
      break;
    default:
      break;
  }
}

template <class T>
void attend_row(const T* q, const T* k, const T* v, int64_t seen, int64_t dh, T scale,
                std::vector<T>& scores, T* out) {
  if constexpr (std::is_same_v<T, float>)
    if (dh % kVf == 0) return attend_row_vec(q, k, v, seen, dh, scale, scores, out);
  attend_row_plain(q, k, v, seen, dh, scale, scores, out);
}

}  // namespace

Attention::Attention(const AttentionConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  const int64_t half = head_dim() / 2;
  cos_.resize(size_t(cfg_.max_context * half));
  sin_.resize(cos_.size());
  for (int64_t pos = 0; pos < cfg_.max_context; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      // Without RoPE every angle is 0: the rotation is the identity, exactly.
      const double angle =
          cfg_.rope ? double(pos) * std::pow(cfg_.rope_theta, -2.0 * double(i) / double(2 * half))
                    : 0.0;
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
    throw ShapeError(
        fmt::format("attention input {}: expected [T, {}]", x.shape_str(), cfg_.d_model));
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
    if (cfg_.causal) {
      cpu::softmax_causal_rows<T>(ph, 0, ph);
    } else {
      std::vector<T> lse(static_cast<size_t>(L));  // not needed, but the kernel writes it
      cpu::softmax_rows<T>(ph, ph, lse);
    }
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
  if (!cfg_.causal)
    throw ConfigError(
        "decode: the attention is bidirectional (causal = false): a KV cache needs "
        "causal attention");
  check_params(p);
  if (x.rank() != 2 || x.dim(1) != cfg_.d_model)
    throw ShapeError(
        fmt::format("attention input {}: expected [n, {}]", x.shape_str(), cfg_.d_model));
  if (starts.size() != kvs.size() + 1 || starts.front() != 0 || starts.back() != x.dim(0))
    throw ShapeError(
        fmt::format("decode: {} row starts for {} sequences and {} rows: expected "
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
  const int64_t ctx = cfg_.max_context, n_seq = int64_t(kvs.size());
  const DType dt = dtype_of<T>();
  Tensor qkv({N, 3 * d}, dt), o({N, d}, dt), q({N, H, dh}, dt);
  be.gemm<T>(false, false, T(1), x.matrix<T>(), p.w_qkv.matrix<T>(), T(0), qkv.matrix<T>());
  const T scale = T(1) / std::sqrt(T(dh));
  // Rotated queries, and the new rows' rotated keys and values into each cache.
  // q: [N, H, dh], row r of sequence s at position kv.n_pos + (r - starts[s]).
  for (int64_t seq = 0; seq < n_seq; ++seq) {
    KvCache& kv = *kvs[seq];
    T *kc = kv.k.data<T>(), *vc = kv.v.data<T>();
    for (int64_t r = starts[seq]; r < starts[seq + 1]; ++r) {
      const int64_t pos = kv.n_pos + r - starts[seq];
      const double *cs = cos_.data() + pos * half, *sn = sin_.data() + pos * half;
      for (int64_t h = 0; h < H; ++h) {
        const T* row = qkv.data<T>() + r * 3 * d + h * dh;
        rotate(row, q.data<T>() + (r * H + h) * dh, cs, sn, half, false);
        rotate(row + d, kc + (h * ctx + pos) * dh, cs, sn, half, false);
        std::memcpy(vc + (h * ctx + pos) * dh, row + 2 * d, size_t(dh) * sizeof(T));
      }
    }
  }
  // A sequence with few new rows (decode) is attended directly, one (sequence, head) pair per
  // task: a GEMM call per head would cost more in setup than its few thousand multiply-adds.
  // Longer chunks (prefill) take the backend's GEMMs, one head at a time.
  std::vector<int64_t> direct, chunked;
  for (int64_t seq = 0; seq < n_seq; ++seq) {
    const int64_t n = starts[seq + 1] - starts[seq];
    if (n > 0) (n <= kDirectRows ? direct : chunked).push_back(seq);
  }
  const int64_t n_tasks = int64_t(direct.size()) * H;
#pragma omp parallel for schedule(dynamic, 4) if (n_tasks > 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t seq = direct[task / H], h = task % H;
    const KvCache& kv = *kvs[seq];
    const int64_t r0 = starts[seq];
    thread_local std::vector<T> scores;
    for (int64_t r = r0; r < starts[seq + 1]; ++r) {
      const int64_t seen = kv.n_pos + r - r0 + 1;  // keys up to and including this position
      attend_row(q.data<T>() + (r * H + h) * dh, kv.k.data<T>() + h * ctx * dh,
                 kv.v.data<T>() + h * ctx * dh, seen, dh, scale, scores,
                 o.data<T>() + r * d + h * dh);
    }
  }
  Tensor qh, sc, oh;
  for (int64_t seq : chunked) {
    const KvCache& kv = *kvs[seq];
    const int64_t r0 = starts[seq], n = starts[seq + 1] - r0, pos0 = kv.n_pos, m = pos0 + n;
    qh.resize({n, dh}, dt);
    sc.resize({n, m}, dt);
    oh.resize({n, dh}, dt);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(qh.data<T>() + i * dh, q.data<T>() + ((r0 + i) * H + h) * dh,
                    size_t(dh) * sizeof(T));
      MatrixView<const T> kh{kv.k.data<T>() + h * ctx * dh, m, dh},
          vh{kv.v.data<T>() + h * ctx * dh, m, dh};
      be.gemm<T>(false, true, scale, qh.matrix<T>(), kh, T(0), sc.matrix<T>());
      cpu::softmax_causal_rows<T>(sc.matrix<T>(), pos0, sc.matrix<T>());
      be.gemm<T>(false, false, T(1), sc.matrix<T>(), vh, T(0), oh.matrix<T>());
      copy_head_in(oh.data<T>(), n, dh, o.data<T>() + r0 * d + h * dh, d);
    }
  }
  for (int64_t seq = 0; seq < n_seq; ++seq) kvs[seq]->n_pos += starts[seq + 1] - starts[seq];
  y.resize({N, d}, dt);
  be.gemm<T>(false, false, T(1), o.matrix<T>(), p.w_o.matrix<T>(), T(0), y.matrix<T>());
}

}  // namespace sy
