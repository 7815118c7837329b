// Every CPU kernel against its plain reference in kernels/ref, on random inputs from a fixed
// seed, over a shared shape table with 1, odd sizes, empty groups and everything in one group.
// Tolerances: exact for permutations (gather, top-k indices), relative for math.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "switchyard/core/exec_context.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/kernels/ref.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::random_tensor;

// Float outputs agree with the reference to float rounding, scaled by the reduction length.
void expect_close(const Tensor& got, const Tensor& want, double atol, double rtol = 1e-4) {
  ASSERT_EQ(got.shape(), want.shape());
  Tensor a = convert(got, DType::kF64), b = convert(want, DType::kF64);
  EXPECT_LE(testing::max_scaled_error(a.span<double>(), b.span<double>(), atol, rtol), 1.0);
}

struct RowShape {
  int64_t rows, cols;
  friend void PrintTo(const RowShape& s, std::ostream* os) { *os << s.rows << "x" << s.cols; }
};
class RowKernels : public ::testing::TestWithParam<RowShape> {};

TEST_P(RowKernels, SoftmaxAndBackward) {
  auto [T, E] = GetParam();
  Tensor logits = random_tensor({T, E}, DType::kF32, 1, -4, 4);
  Tensor p({T, E}, DType::kF32), pr({T, E}, DType::kF32), l({T}, DType::kF32), lr({T}, DType::kF32);
  cpu::softmax_rows<float>(logits.matrix<float>(), p.matrix<float>(), l.span<float>());
  ref::softmax_rows<float>(logits.matrix<float>(), pr.matrix<float>(), lr.span<float>());
  expect_close(p, pr, 1e-7);
  expect_close(l, lr, 1e-6);
  Tensor dp = random_tensor({T, E}, DType::kF32, 2);
  Tensor dl({T, E}, DType::kF32), dlr({T, E}, DType::kF32);
  cpu::softmax_rows_backward<float>(p.matrix<float>(), dp.matrix<float>(), dl.matrix<float>());
  ref::softmax_rows_backward<float>(p.matrix<float>(), dp.matrix<float>(), dlr.matrix<float>());
  expect_close(dl, dlr, 1e-6);
}

TEST_P(RowKernels, CausalSoftmaxAtEveryOffset) {
  auto [rows, m] = GetParam();
  const int64_t n = std::min(rows, m);  // a query row per key at most
  Tensor s = random_tensor({n, m}, DType::kF32, 11, -4, 4);
  for (int64_t offset : {int64_t(0), (m - n) / 2, m - n}) {
    Tensor p({n, m}, DType::kF32), pr({n, m}, DType::kF32);
    cpu::softmax_causal_rows<float>(s.matrix<float>(), offset, p.matrix<float>());
    ref::softmax_causal_rows<float>(s.matrix<float>(), offset, pr.matrix<float>());
    expect_close(p, pr, 1e-7);
    // Exactly zero after the query's own position.
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = offset + i + 1; j < m; ++j) ASSERT_EQ(p.matrix<float>()(i, j), 0.0f);
  }
}

TEST_P(RowKernels, CrossEntropyLossAndGradient) {
  auto [T, V] = GetParam();
  if (V == 0) GTEST_SKIP();
  Tensor l = random_tensor({T, V}, DType::kF32, 12, -5, 5);
  std::vector<int32_t> y(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) y[t] = t % 5 == 3 ? -1 : int32_t((t * 7 + 3) % V);  // some padding
  Tensor dl({T, V}, DType::kF32), dlr({T, V}, DType::kF32);
  const float scale = 1.0f / float(std::max<int64_t>(T, 1));
  const double loss = cpu::cross_entropy_rows<float>(l.matrix<float>(), y, scale, dl.matrix<float>());
  const double want = ref::cross_entropy_rows<float>(l.matrix<float>(), y, scale, dlr.matrix<float>());
  EXPECT_NEAR(loss, want, 1e-5 * (1 + std::abs(want)));
  expect_close(dl, dlr, 1e-7);
  // Loss only (no gradient), and in place over the logits.
  EXPECT_EQ(cpu::cross_entropy_rows<float>(l.matrix<float>(), y, scale, {}), loss);
  Tensor inplace = l.clone();
  cpu::cross_entropy_rows<float>(inplace.matrix<float>(), y, scale, inplace.matrix<float>());
  expect_close(inplace, dl, 0, 0);
}

TEST_P(RowKernels, TopKMatchesSortWithTies) {
  auto [T, E] = GetParam();
  if (E == 0) GTEST_SKIP();
  Tensor s = random_tensor({T, E}, DType::kF32, 3);
  // Round to a coarse grid so ties occur; ties must go to the lower index.
  for (float& v : s.span<float>()) v = std::round(v * 4) / 4;
  for (int64_t k : {int64_t(1), std::min<int64_t>(2, E), E}) {
    std::vector<int32_t> id(size_t(T * k)), idr(size_t(T * k));
    Tensor v({T, k}, DType::kF32), vr({T, k}, DType::kF32);
    cpu::topk_rows<float>(s.matrix<float>(), {id.data(), T, k}, v.matrix<float>());
    ref::topk_rows<float>(s.matrix<float>(), {idr.data(), T, k}, vr.matrix<float>());
    EXPECT_EQ(id, idr) << "k=" << k;
    expect_close(v, vr, 0, 0);
  }
}

TEST_P(RowKernels, ActivationsAndSwiglu) {
  auto [T, f] = GetParam();
  Tensor h1 = random_tensor({T, f}, DType::kF32, 4, -6, 6),
         h3 = random_tensor({T, f}, DType::kF32, 5);
  Tensor a({T, f}, DType::kF32), ar({T, f}, DType::kF32);
  cpu::silu<float>(h1.span<float>(), a.span<float>());
  ref::silu<float>(h1.span<float>(), ar.span<float>());
  expect_close(a, ar, 1e-7);
  cpu::gelu<float>(h1.span<float>(), a.span<float>());
  ref::gelu<float>(h1.span<float>(), ar.span<float>());
  expect_close(a, ar, 1e-7);
  cpu::swiglu<float>(h1.matrix<float>(), h3.matrix<float>(), a.matrix<float>());
  ref::swiglu<float>(h1.matrix<float>(), h3.matrix<float>(), ar.matrix<float>());
  expect_close(a, ar, 1e-7);
  Tensor da = random_tensor({T, f}, DType::kF32, 6);
  Tensor d1({T, f}, DType::kF32), d3({T, f}, DType::kF32), d1r({T, f}, DType::kF32),
      d3r({T, f}, DType::kF32);
  cpu::swiglu_backward<float>(h1.matrix<float>(), h3.matrix<float>(), da.matrix<float>(),
                              d1.matrix<float>(), d3.matrix<float>());
  ref::swiglu_backward<float>(h1.matrix<float>(), h3.matrix<float>(), da.matrix<float>(),
                              d1r.matrix<float>(), d3r.matrix<float>());
  expect_close(d1, d1r, 1e-6);
  expect_close(d3, d3r, 1e-6);
}

TEST_P(RowKernels, GatherAndScatterAdd) {
  auto [T, d] = GetParam();
  Tensor x = random_tensor({T, d}, DType::kF32, 7);
  // Every token twice, reversed, plus token 0 again: repeats exercise the scatter's ordering.
  std::vector<int32_t> token;
  for (int64_t t = T - 1; t >= 0; --t) token.insert(token.end(), {int32_t(t), int32_t(t)});
  if (T > 0) token.push_back(0);
  const int64_t n = int64_t(token.size());
  Tensor xs({n, d}, DType::kF32), xsr({n, d}, DType::kF32);
  cpu::gather_rows<float>(x.matrix<float>(), token, xs.matrix<float>());
  ref::gather_rows<float>(x.matrix<float>(), token, xsr.matrix<float>());
  expect_close(xs, xsr, 0, 0);
  Tensor w = random_tensor({n}, DType::kF32, 8);
  Tensor dx = random_tensor({T, d}, DType::kF32, 9), dxr = dx.clone();
  cpu::scatter_add_rows<float>(xs.matrix<float>(), token, w.span<float>(), dx.matrix<float>());
  ref::scatter_add_rows<float>(xs.matrix<float>(), token, w.span<float>(), dxr.matrix<float>());
  expect_close(dx, dxr, 1e-6);
}

TEST_P(RowKernels, RmsNormAndBackward) {
  auto [T, d] = GetParam();
  if (d == 0) GTEST_SKIP();
  Tensor x = random_tensor({T, d}, DType::kF32, 10), g = random_tensor({d}, DType::kF32, 11);
  Tensor y({T, d}, DType::kF32), yr({T, d}, DType::kF32), r({T}, DType::kF32), rr({T}, DType::kF32);
  cpu::rmsnorm<float>(x.matrix<float>(), g.span<float>(), 1e-5f, y.matrix<float>(),
                      r.span<float>());
  ref::rmsnorm<float>(x.matrix<float>(), g.span<float>(), 1e-5f, yr.matrix<float>(),
                      rr.span<float>());
  expect_close(y, yr, 1e-6);
  Tensor dy = random_tensor({T, d}, DType::kF32, 12);
  Tensor dx({T, d}, DType::kF32), dxr({T, d}, DType::kF32);
  Tensor dg = random_tensor({d}, DType::kF32, 13), dgr = dg.clone();
  cpu::rmsnorm_backward<float>(x.matrix<float>(), g.span<float>(), r.span<float>(),
                               dy.matrix<float>(), dx.matrix<float>(), dg.span<float>());
  ref::rmsnorm_backward<float>(x.matrix<float>(), g.span<float>(), r.span<float>(),
                               dy.matrix<float>(), dxr.matrix<float>(), dgr.span<float>());
  expect_close(dx, dxr, 1e-5);
  expect_close(dg, dgr, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RowKernels,
                         ::testing::Values(RowShape{1, 1}, RowShape{1, 7}, RowShape{7, 13},
                                           RowShape{33, 8}, RowShape{13, 64}, RowShape{0, 8},
                                           RowShape{300, 129}));

struct GemmShape {
  int64_t M, N, K;
  friend void PrintTo(const GemmShape& s, std::ostream* os) {
    *os << "M" << s.M << "_N" << s.N << "_K" << s.K;
  }
};
class Gemm : public ::testing::TestWithParam<GemmShape> {};

TEST_P(Gemm, AllTransposesAgainstReference) {
  auto [M, N, K] = GetParam();
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      Tensor a =
          ta ? random_tensor({K, M}, DType::kF32, 20) : random_tensor({M, K}, DType::kF32, 20);
      Tensor b =
          tb ? random_tensor({N, K}, DType::kF32, 21) : random_tensor({K, N}, DType::kF32, 21);
      Tensor c = random_tensor({M, N}, DType::kF32, 22), cr = c.clone();
      cpu::gemm<float>(ta, tb, 0.5f, a.matrix<float>(), b.matrix<float>(), 2.0f, c.matrix<float>());
      ref::gemm<float>(ta, tb, 0.5f, a.matrix<float>(), b.matrix<float>(), 2.0f,
                       cr.matrix<float>());
      expect_close(c, cr, 1e-6 * double(K + 1));
    }
}

// One output tile or several: the bits never depend on the thread count.
TEST_P(Gemm, SameResultAtAnyThreadCount) {
  auto [M, N, K] = GetParam();
  Tensor a = random_tensor({M, K}, DType::kF32, 23), b = random_tensor({K, N}, DType::kF32, 24);
  auto run = [&](int threads) {
    ThreadScope scope(threads);
    Tensor c({M, N}, DType::kF32);
    cpu::gemm<float>(false, false, 1.0f, a.matrix<float>(), b.matrix<float>(), 0.0f,
                     c.matrix<float>());
    return std::vector<float>(c.span<float>().begin(), c.span<float>().end());
  };
  EXPECT_EQ(run(1), run(2));
  EXPECT_EQ(run(1), run(3));
}

INSTANTIATE_TEST_SUITE_P(Shapes, Gemm,
                         ::testing::Values(GemmShape{1, 1, 1}, GemmShape{7, 13, 33},
                                           GemmShape{33, 7, 1}, GemmShape{64, 65, 63},
                                           GemmShape{0, 5, 3}, GemmShape{4, 3, 0},
                                           GemmShape{160, 96, 512}, GemmShape{500, 400, 300}));

// Group sizes over the rows: empty groups, all rows in one group, skinny (<= 16 rows) and BLAS
// groups, and widths that are not a multiple of the vector width.
struct GroupedShape {
  std::vector<int32_t> group_rows;
  int64_t K, N;
  friend void PrintTo(const GroupedShape& s, std::ostream* os) {
    *os << "groups" << s.group_rows.size() << "_rows"
        << std::accumulate(s.group_rows.begin(), s.group_rows.end(), 0) << "_K" << s.K << "_N"
        << s.N;
  }
};
class GroupedGemm : public ::testing::TestWithParam<GroupedShape> {};

std::vector<int32_t> offsets_of(const std::vector<int32_t>& rows) {
  std::vector<int32_t> off(rows.size() + 1, 0);
  std::partial_sum(rows.begin(), rows.end(), off.begin() + 1);
  return off;
}

TEST_P(GroupedGemm, ForwardAndBothBackwardsAgainstReference) {
  const GroupedShape& s = GetParam();
  const auto off = offsets_of(s.group_rows);
  const int64_t G = int64_t(s.group_rows.size()), n = off.back(), K = s.K, N = s.N;
  Tensor xs = random_tensor({n, K}, DType::kF32, 30), w = random_tensor({G, K, N}, DType::kF32, 31);
  Tensor ys({n, N}, DType::kF32), ysr({n, N}, DType::kF32);
  cpu::grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ys.matrix<float>());
  ref::grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ysr.matrix<float>());
  expect_close(ys, ysr, 1e-6 * double(K));

  Tensor wb = convert(w, DType::kBF16);
  cpu::grouped_gemm(xs.matrix<float>(), wb.stacked<bf16>(), off, ys.matrix<float>());
  ref::grouped_gemm(xs.matrix<float>(), wb.stacked<bf16>(), off, ysr.matrix<float>());
  expect_close(ys, ysr, 1e-6 * double(K));

  Tensor dys = random_tensor({n, N}, DType::kF32, 32);
  Tensor dxs = random_tensor({n, K}, DType::kF32, 33), dxsr = dxs.clone();
  cpu::grouped_gemm_bt<float>(dys.matrix<float>(), w.stacked<float>(), off, 1.0f,
                              dxs.matrix<float>());
  ref::grouped_gemm_bt<float>(dys.matrix<float>(), w.stacked<float>(), off, 1.0f,
                              dxsr.matrix<float>());
  expect_close(dxs, dxsr, 1e-6 * double(N));

  Tensor dw = random_tensor({G, K, N}, DType::kF32, 34), dwr = dw.clone();
  cpu::grouped_gemm_at<float>(xs.matrix<float>(), dys.matrix<float>(), off, dw.stacked<float>());
  ref::grouped_gemm_at<float>(xs.matrix<float>(), dys.matrix<float>(), off, dwr.stacked<float>());
  expect_close(dw, dwr, 1e-6 * double(n + 1));
}

TEST_P(GroupedGemm, SameResultAtAnyThreadCount) {
  const GroupedShape& s = GetParam();
  const auto off = offsets_of(s.group_rows);
  const int64_t G = int64_t(s.group_rows.size()), n = off.back();
  Tensor xs = random_tensor({n, s.K}, DType::kF32, 40),
         w = random_tensor({G, s.K, s.N}, DType::kF32, 41);
  auto run = [&](int threads) {
    ThreadScope scope(threads);
    Tensor ys({n, s.N}, DType::kF32);
    cpu::grouped_gemm<float>(xs.matrix<float>(), w.stacked<float>(), off, ys.matrix<float>());
    return std::vector<float>(ys.span<float>().begin(), ys.span<float>().end());
  };
  EXPECT_EQ(run(1), run(2));
  EXPECT_EQ(run(1), run(3));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GroupedGemm,
                         ::testing::Values(GroupedShape{{1}, 1, 1},
                                           GroupedShape{{3, 0, 5, 1}, 13, 33},
                                           GroupedShape{{0, 0, 40, 0}, 33, 70},
                                           GroupedShape{{16, 17, 2}, 64, 129},
                                           GroupedShape{{7, 1, 0, 13, 9, 2, 5}, 37, 301},
                                           GroupedShape{{0, 0, 0}, 8, 8}));

}  // namespace
}  // namespace sy
