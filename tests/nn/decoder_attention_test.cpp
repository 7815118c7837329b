// cached_attention (the published decoders' attention over a KV cache) against a plain float64
// reference on random inputs: grouped-query and plain heads, dk != dv (latent attention's
// shapes), windows, a first position past 0 (a prompt after a cached prefix), one row
// (decoding) and blocks that end mid-way, on every backend here.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "switchyard/kernels/backend.h"
#include "switchyard/nn/decoder.h"
#include "testing/testing.h"

namespace sy {
namespace {

std::vector<double> reference(const AttentionShape& s, const std::vector<float>& q, int64_t n,
                              int64_t first, const std::vector<float>& k,
                              const std::vector<float>& v) {
  const int64_t H = s.n_heads, Hkv = s.n_kv_heads, dk = s.dk, dv = s.dv;
  std::vector<double> o(static_cast<size_t>(n * H * dv), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t pos = first + i, g = h / (H / Hkv);
      const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, pos - s.window + 1) : 0;
      std::vector<double> p;
      double mx = -INFINITY;
      for (int64_t j = j0; j <= pos; ++j) {
        double dot = 0;
        for (int64_t t = 0; t < dk; ++t)
          dot += double(q[size_t((i * H + h) * dk + t)]) * k[size_t((j * Hkv + g) * dk + t)];
        p.push_back(dot * s.scale);
        mx = std::max(mx, p.back());
      }
      double sum = 0;
      for (double& x : p) sum += (x = std::exp(x - mx));
      for (int64_t j = j0; j <= pos; ++j)
        for (int64_t t = 0; t < dv; ++t)
          o[size_t((i * H + h) * dv + t)] +=
              p[size_t(j - j0)] / sum * v[size_t((j * Hkv + g) * dv + t)];
    }
  return o;
}

std::vector<float> uniform(int64_t n, uint64_t seed, float scale) {
  const Tensor t = testing::random_tensor({n}, DType::kF32, seed, -scale, scale);
  return {t.data<float>(), t.data<float>() + n};
}

struct Case {
  AttentionShape shape;
  int64_t n, first;
};

TEST(CachedAttention, MatchesFloat64ReferenceOnEveryBackend) {
  const Case cases[] = {
      {{.n_heads = 4, .n_kv_heads = 2, .dk = 7, .dv = 5, .window = 0, .scale = 0.4f}, 1, 12},
      {{.n_heads = 8, .n_kv_heads = 1, .dk = 16, .dv = 16, .window = 0, .scale = 0.25f}, 70, 0},
      {{.n_heads = 6, .n_kv_heads = 3, .dk = 12, .dv = 9, .window = 50, .scale = 0.3f}, 131, 37},
      {{.n_heads = 3, .n_kv_heads = 3, .dk = 10, .dv = 6, .window = 0, .scale = 0.35f}, 40, 5},
      {{.n_heads = 4, .n_kv_heads = 4, .dk = 8, .dv = 8, .window = 3, .scale = 0.5f}, 5, 9},
      {{.n_heads = 2, .n_kv_heads = 1, .dk = 33, .dv = 17, .window = 17, .scale = 0.2f}, 65, 0},
  };
  for (const Backend* be : available_backends(cpu_features())) {
    uint64_t seed = 11;
    for (const Case& c : cases) {
      const AttentionShape& s = c.shape;
      const int64_t m = c.first + c.n;
      const std::vector<float> q = uniform(c.n * s.n_heads * s.dk, seed++, 2.0f);
      const std::vector<float> k = uniform(m * s.n_kv_heads * s.dk, seed++, 2.0f);
      const std::vector<float> v = uniform(m * s.n_kv_heads * s.dv, seed++, 1.0f);
      std::vector<float> o(static_cast<size_t>(c.n * s.n_heads * s.dv), NAN);
      cached_attention(s, q.data(), c.n, c.first, k.data(), v.data(), o.data(), *be);
      const std::vector<double> want = reference(s, q, c.n, c.first, k, v);
      // f32 GEMMs: a few float roundings of values below 1; bf16 compute rounds q, k and the
      // probabilities to 8 bits of mantissa.
      const double tol = be->precision == Precision::kBf16 ? 3e-2 : 2e-5;
      double worst = 0;
      for (size_t i = 0; i < o.size(); ++i) worst = std::max(worst, std::abs(o[i] - want[i]));
      EXPECT_LT(worst, tol) << be->name << ": H " << s.n_heads << " Hkv " << s.n_kv_heads
                            << " dk " << s.dk << " dv " << s.dv << " window " << s.window
                            << " n " << c.n << " first " << c.first;
    }
  }
}

}  // namespace
}  // namespace sy
