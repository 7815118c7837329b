// Every backend this CPU can run (kernels/backend.h) against the plain references, on random
// inputs with odd sizes, tile edges, empty groups and skinny (decode) groups; the same bits at
// any thread count; CPU detection and the SY_MAX_ISA cap (ctest also runs this program with
// SY_MAX_ISA=avx2, so the fallback backends are tested on any machine).
//
// Tolerances. f32 compute: float rounding, 1e-6 (K + 1) absolute. bf16 compute rounds both
// operands to bf16 (8 significant bits, unit roundoff u = 2^-8) and accumulates in f32, so each
// element obeys |c - c_ref| <= |alpha| ((2u + u^2) sum_k |a_ik| |b_kj|) + f32 accumulation
// (K 2^-24 of the same sum): the bound is computed per element from |a| |b|.
#include "switchyard/kernels/backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/kernels/ref.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::random_tensor;

Tensor abs_of(const Tensor& t) {
  Tensor a = convert(t, DType::kF64);
  for (double& v : a.span<double>()) v = std::abs(v);
  return a;
}

// |got - want| <= slack * bound + atol elementwise, with bound = sum |a||b| (f64).
void expect_within(const Tensor& got, const Tensor& want, const Tensor& bound, double slack,
                   double atol, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  Tensor g = convert(got, DType::kF64), w = convert(want, DType::kF64);
  std::span<const double> gs = g.span<double>(), ws = w.span<double>(), bs = bound.span<double>();
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < gs.size(); ++i)
    if (!(std::abs(gs[i] - ws[i]) <= slack * bs[i] + atol)) {
      if (first < 0) first = int64_t(i);
      ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": first at " << first << " got "
                    << gs[size_t(std::max<int64_t>(first, 0))] << " want "
                    << ws[size_t(std::max<int64_t>(first, 0))];
}

// The slack on sum |a||b| a backend's precision allows for a reduction of length K.
double slack_for(const Backend& be, int64_t K) {
  const double f32 = double(K + 2) * std::ldexp(1.0, -24);
  if (be.precision == Precision::kF32) return f32 + 1e-7;
  const double u = std::ldexp(1.0, -8);
  return 2 * u + u * u + f32;
}

std::vector<const Backend*> backends() {
  auto all = available_backends(cpu_features());
  return {all.begin(), all.end()};
}
std::string backend_label(const ::testing::TestParamInfo<const Backend*>& info) {
  std::string s = info.param->name;
  for (char& ch : s)
    if (ch == '-') ch = '_';
  return s;
}

struct GemmCase {
  int64_t M, N, K;
};
// 1, odd sizes, empty dimensions, and sizes that cross the 256-row and 1024-column tiles.
const GemmCase kGemmCases[] = {{1, 1, 1}, {7, 13, 33},   {33, 7, 13},     {0, 5, 3},    {5, 0, 3},
                               {4, 6, 0}, {257, 5, 513}, {300, 1100, 70}, {17, 2049, 9}};

class BackendKernels : public ::testing::TestWithParam<const Backend*> {};

TEST_P(BackendKernels, GemmAllTransposesAndBetasAgainstReference) {
  const Backend& be = *GetParam();
  for (const GemmCase& gc : kGemmCases)
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (float beta : {0.0f, 1.0f, 0.5f}) {
          const int64_t M = gc.M, N = gc.N, K = gc.K;
          Tensor a =
              ta ? random_tensor({K, M}, DType::kF32, 20) : random_tensor({M, K}, DType::kF32, 20);
          Tensor b =
              tb ? random_tensor({N, K}, DType::kF32, 21) : random_tensor({K, N}, DType::kF32, 21);
          Tensor c = random_tensor({M, N}, DType::kF32, 22), cr = c.clone();
          const float alpha = 0.75f;
          be.gemm<float>(ta, tb, alpha, a.matrix<float>(), b.matrix<float>(), beta,
                         c.matrix<float>());
          ref::gemm<float>(ta, tb, alpha, a.matrix<float>(), b.matrix<float>(), beta,
                           cr.matrix<float>());
          Tensor bound({M, N}, DType::kF64);
          Tensor aa = abs_of(a), ab = abs_of(b);
          ref::gemm<double>(ta, tb, alpha, aa.matrix<double>(), ab.matrix<double>(), 0.0,
                            bound.matrix<double>());
          expect_within(
              c, cr, bound, slack_for(be, K), 1e-6,
              fmt::format("{} M{} N{} K{} ta{} tb{} beta{}", be.name, M, N, K, ta, tb, beta));
        }
}

// Row counts per group: empty groups, one row, the skinny limit (16) and just past it, a group
// past one 256-row tile, and everything in one group.
const std::vector<std::vector<int32_t>> kGroupRows = {
    {3, 0, 16, 17, 1, 300, 0, 40}, {0, 0, 0, 1}, {0, 333, 0}, {5}};

std::vector<int32_t> offsets_of(const std::vector<int32_t>& rows) {
  std::vector<int32_t> off{0};
  for (int32_t r : rows) off.push_back(off.back() + r);
  return off;
}

TEST_P(BackendKernels, GroupedGemmsAgainstReference) {
  const Backend& be = *GetParam();
  for (const auto& rows : kGroupRows)
    for (auto [K, N] : {std::pair<int64_t, int64_t>{33, 70}, {7, 1030}}) {
      const std::vector<int32_t> off = offsets_of(rows);
      const int64_t G = int64_t(rows.size()), n = off.back();
      const std::string what = fmt::format("{} G{} n{} K{} N{}", be.name, G, n, K, N);
      Tensor xs = random_tensor({n, K}, DType::kF32, 30),
             w = random_tensor({G, K, N}, DType::kF32, 31);
      Tensor axs = abs_of(xs), aw = abs_of(w);
      // ys = xs w
      Tensor ys({n, N}, DType::kF32), ysr({n, N}, DType::kF32), bound({n, N}, DType::kF64);
      be.grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ys.matrix<float>());
      ref::grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ysr.matrix<float>());
      ref::grouped_gemm<double>(axs.matrix<double>(), aw.stacked<double>(), off,
                                bound.matrix<double>());
      expect_within(ys, ysr, bound, slack_for(be, K), 1e-6, what + " forward");
      // dxs = dys w^T + beta dxs, beta 0 and 1
      Tensor dys = random_tensor({n, N}, DType::kF32, 32), ady = abs_of(dys);
      for (float beta : {0.0f, 1.0f}) {
        Tensor dxs = random_tensor({n, K}, DType::kF32, 33), dxsr = dxs.clone();
        Tensor bnd({n, K}, DType::kF64);
        be.grouped_gemm_bt<float>(dys.matrix<float>(), w.stacked<float>(), off, beta,
                                  dxs.matrix<float>());
        ref::grouped_gemm_bt<float>(dys.matrix<float>(), w.stacked<float>(), off, beta,
                                    dxsr.matrix<float>());
        ref::grouped_gemm_bt<double>(ady.matrix<double>(), aw.stacked<double>(), off, 0.0,
                                     bnd.matrix<double>());
        expect_within(dxs, dxsr, bnd, slack_for(be, N), 1e-6, what + " bt");
      }
      // dw += xs^T dys
      Tensor dw = random_tensor({G, K, N}, DType::kF32, 34), dwr = dw.clone();
      Tensor bnd({G, K, N}, DType::kF64);
      std::fill_n(bnd.data<double>(), bnd.numel(), 0.0);
      be.grouped_gemm_at<float>(xs.matrix<float>(), dys.matrix<float>(), off, dw.stacked<float>());
      ref::grouped_gemm_at<float>(xs.matrix<float>(), dys.matrix<float>(), off,
                                  dwr.stacked<float>());
      ref::grouped_gemm_at<double>(axs.matrix<double>(), ady.matrix<double>(), off,
                                   bnd.stacked<double>());
      int64_t max_rows = 0;
      for (int32_t r : rows) max_rows = std::max<int64_t>(max_rows, r);
      expect_within(dw, dwr, bnd, slack_for(be, max_rows), 1e-6, what + " at");
    }
}

// bf16 weights with f32 activations (inference), groups of the given row counts: the weights
// are exact bf16 values, so only the activations' rounding remains (bf16 compute: u = 2^-8
// relative; f32 compute: none) besides f32 accumulation.
void check_bf16_weights(const Backend& be, const std::vector<int32_t>& rows, int64_t K, int64_t N,
                        uint64_t seed) {
  const std::vector<int32_t> off = offsets_of(rows);
  const int64_t G = int64_t(rows.size()), n = off.back();
  Tensor xs = random_tensor({n, K}, DType::kF32, seed);
  Tensor w = convert(random_tensor({G, K, N}, DType::kF32, seed + 1), DType::kBF16);
  Tensor wf = convert(w, DType::kF32);
  Tensor ys({n, N}, DType::kF32), ysr({n, N}, DType::kF32), bound({n, N}, DType::kF64);
  be.grouped_gemm(xs.matrix<float>(), w.stacked<bf16>(), off, ys.matrix<float>());
  ref::grouped_gemm<float>(xs.matrix<float>(), wf.stacked<float>(), off, ysr.matrix<float>());
  Tensor axs = abs_of(xs), aw = abs_of(wf);
  ref::grouped_gemm<double>(axs.matrix<double>(), aw.stacked<double>(), off,
                            bound.matrix<double>());
  const double u = be.precision == Precision::kBf16 ? std::ldexp(1.0, -8) : 0.0;
  expect_within(ys, ysr, bound, u + double(K + 2) * std::ldexp(1.0, -24), 1e-6,
                fmt::format("{} n{} K{} N{}", be.name, n, K, N));
}

// Skinny (decode) and large groups together, an empty group, odd K and N.
TEST_P(BackendKernels, GroupedGemmWithBf16Weights) {
  check_bf16_weights(*GetParam(), {3, 0, 16, 17, 300}, 65, 129, 40);
}

// Decode: every row count the streaming kernel takes (1..16), odd and even K, column counts
// that leave partial vectors and blocks of odd and even vector counts.
TEST_P(BackendKernels, SkinnyGroupsWithBf16WeightsEveryRowCount) {
  for (int64_t K : {33, 64})
    for (int64_t N : {300, 304})  // blocks of odd and even vector counts, partial vectors
      for (int32_t M = 1; M <= 16; ++M)
        check_bf16_weights(*GetParam(), {M}, K, N, 60 + uint64_t(M));
}

// bf16 compute rounds operands only where the product has enough multiply-adds per rounded
// element (64): decode-sized products ([32, 256] x [256, 768], a few rows per expert) are
// exactly the f32 twin's, while a prefill-sized one ([512, 256] x [256, 768]) is rounded.
void check_bf16_rounds_only_where_it_pays(const Backend& be) {
  for (const int64_t M : {32, 512}) {
    Tensor a = random_tensor({M, 256}, DType::kF32, 70),
           b = random_tensor({256, 768}, DType::kF32, 71);
    Tensor c({M, 768}, DType::kF32), c32({M, 768}, DType::kF32);
    be.gemm<float>(false, false, 1.0f, a.matrix<float>(), b.matrix<float>(), 0.0f,
                   c.matrix<float>());
    be.f32->gemm<float>(false, false, 1.0f, a.matrix<float>(), b.matrix<float>(), 0.0f,
                        c32.matrix<float>());
    const bool same = std::equal(c.data<float>(), c.data<float>() + c.numel(), c32.data<float>());
    EXPECT_EQ(same, M == 32) << be.name << " M " << M;
  }
  // Grouped: groups of 40 rows stay f32, a group of 400 rows is rounded.
  const std::vector<int32_t> off = offsets_of({40, 400, 40});
  Tensor xs = random_tensor({480, 256}, DType::kF32, 72),
         w = random_tensor({3, 256, 512}, DType::kF32, 73);
  Tensor ys({480, 512}, DType::kF32), ys32({480, 512}, DType::kF32);
  be.grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ys.matrix<float>());
  be.f32->grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ys32.matrix<float>());
  for (int g = 0; g < 3; ++g) {
    const float *p = ys.data<float>() + off[g] * 512, *q = ys32.data<float>() + off[g] * 512;
    const int64_t len = int64_t(off[g + 1] - off[g]) * 512;
    EXPECT_EQ(std::equal(p, p + len, q), g != 1) << be.name << " group " << g;
  }
}
TEST(Backends, Bf16RoundsOnlyWhereItPays) {
  int n = 0;
  for (const Backend* be : backends())
    if (be->precision == Precision::kBf16) {
      check_bf16_rounds_only_where_it_pays(*be);
      ++n;
    }
  if (n == 0) GTEST_SKIP() << "no bf16 backend on this CPU";
}

// Each output element is reduced by one thread in a fixed order: 1 and 2 threads agree bit
// for bit, for plain and grouped products.
TEST_P(BackendKernels, SameBitsAtAnyThreadCount) {
  const Backend& be = *GetParam();
  Tensor a = random_tensor({600, 300}, DType::kF32, 50),
         b = random_tensor({300, 1100}, DType::kF32, 51);
  const std::vector<int32_t> off = offsets_of({250, 0, 333, 17});
  Tensor w = random_tensor({4, 300, 1100}, DType::kF32, 52);
  auto run = [&](int threads) {
    ThreadScope scope(threads);
    Tensor c({600, 1100}, DType::kF32), ys({600, 1100}, DType::kF32);
    Tensor dw = random_tensor({4, 300, 1100}, DType::kF32, 53);
    be.gemm<float>(false, false, 1.0f, a.matrix<float>(), b.matrix<float>(), 0.0f,
                   c.matrix<float>());
    be.grouped_gemm<float>(a.matrix<float>(), w.stacked<float>(), off, ys.matrix<float>());
    be.grouped_gemm_at<float>(a.matrix<float>(), ys.matrix<float>(), off, dw.stacked<float>());
    std::vector<float> out(c.span<float>().begin(), c.span<float>().end());
    out.insert(out.end(), ys.span<float>().begin(), ys.span<float>().end());
    out.insert(out.end(), dw.span<float>().begin(), dw.span<float>().end());
    return out;
  };
  EXPECT_EQ(run(1), run(2));
}

// The vdpbf16ps skinny kernel, whichever kernel this CPU's bf16 backend picked: against the
// f64 sum of the bf16-rounded rows times the weights, at every row count, K odd (a half pair)
// and even, columns that leave a partial chunk and span several thread blocks; and the same
// bits at one and two threads.
TEST(SkinnyDotBf16, AgainstReferenceEveryRowCount) {
  if (!__builtin_cpu_supports("avx512bf16")) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  for (int64_t K : {1, 33, 64, 257})
    for (int64_t N : {1, 31, 32, 300, 2100})
      for (int64_t M = 1; M <= 16; M += (N > 300 ? 5 : 1)) {
        const uint64_t seed = uint64_t(K * 1000 + N * 20 + M);
        Tensor x = random_tensor({M, K}, DType::kF32, seed);
        Tensor w = convert(random_tensor({K, N}, DType::kF32, seed + 1), DType::kBF16);
        Tensor want({M, N}, DType::kF64), bound({M, N}, DType::kF64);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double s = 0, b = 0;
            for (int64_t k = 0; k < K; ++k) {
              const double p = double(to_float(to_bf16(x.data<float>()[m * K + k]))) *
                               double(to_float(w.data<bf16>()[k * N + n]));
              s += p;
              b += std::abs(p);
            }
            want.data<double>()[m * N + n] = s;
            bound.data<double>()[m * N + n] = b;
          }
        auto run = [&](int threads) {
          ThreadScope scope(threads);
          Tensor y({M, N}, DType::kF32);
          cpu::skinny_gemm_dot_bf16(x.matrix<float>(), w.matrix<bf16>(), y.matrix<float>());
          return y;
        };
        const Tensor y1 = run(1), y2 = run(2);
        const std::string what = fmt::format("M {} K {} N {}", M, K, N);
        expect_within(y1, want, bound, double(K + 2) * std::ldexp(1.0, -24), 1e-30, what);
        EXPECT_TRUE(std::equal(y1.data<float>(), y1.data<float>() + M * N, y2.data<float>()))
            << what;
      }
  const cpu::SkinnyBf16Choice& choice = cpu::skinny_dot_bf16_choice();
  if (std::getenv("SY_SKINNY_BF16") == nullptr) EXPECT_GT(choice.ratio, 0.0);  // measured
}

INSTANTIATE_TEST_SUITE_P(Available, BackendKernels, ::testing::ValuesIn(backends()), backend_label);

TEST(CpuFeatures, LevelsAndCap) {
  const CpuFeatures& f = cpu_features();
  EXPECT_FALSE(f.vendor.empty());
  EXPECT_LE(int(f.isa), int(f.detected));
  EXPECT_GT(f.llc_bytes, 0) << f.describe();
  const CpuFeatures capped = detect_cpu_features("avx2");
  EXPECT_EQ(capped.detected, f.detected);
  EXPECT_LE(int(capped.isa), int(Isa::kAvx2));
  EXPECT_EQ(detect_cpu_features("baseline").isa, Isa::kBaseline);
  EXPECT_THROW(detect_cpu_features("avx9"), ConfigError);
  EXPECT_THROW(parse_precision("fp16", "model.precision"), ConfigError);
  EXPECT_EQ(parse_precision("bf16", "model.precision"), Precision::kBf16);
}

// Runs under the real cap too (ctest: backend_test.avx2 sets SY_MAX_ISA=avx2).
TEST(CpuFeatures, BackendsFollowTheIsa) {
  const CpuFeatures& f = cpu_features();
  const char* cap = std::getenv("SY_MAX_ISA");
  if (cap != nullptr) {
    EXPECT_EQ(f.cap, cap);
    EXPECT_LE(int(f.isa), int(parse_isa(cap, "SY_MAX_ISA")));
  }
  const Backend& f32 = pick_backend(f, Precision::kF32);
  EXPECT_EQ(f32.precision, Precision::kF32);
  EXPECT_EQ(f32.isa, f.isa);
  EXPECT_NE(f32.name.find(isa_name(f.isa)), std::string::npos) << f32.name;
  const Backend& automatic = pick_backend(f, Precision::kAuto);
  EXPECT_NE(automatic.precision, Precision::kAuto);
  EXPECT_FALSE(resolve_precision(f).reason.empty());
  if (f.isa >= Isa::kAvx512Bf16) {
    const Backend& bf = pick_backend(f, Precision::kBf16);
    EXPECT_EQ(bf.precision, Precision::kBf16);
    EXPECT_EQ(bf.f32, &f32);
  } else {
    EXPECT_THROW(pick_backend(f, Precision::kBf16), ConfigError);
    EXPECT_EQ(automatic.precision, Precision::kF32);
  }
}

}  // namespace
}  // namespace sy
