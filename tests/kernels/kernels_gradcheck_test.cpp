// Float64 finite-difference checks of every kernel backward: softmax, SwiGLU, RMSNorm, and
// scatter-add as the adjoint of gather.
#include <gtest/gtest.h>

#include <vector>

#include "switchyard/kernels/cpu.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::dot;
using testing::expect_grad_close;
using testing::random_tensor;

TEST(KernelGradcheck, Softmax) {
  const int64_t T = 5, E = 7;
  Tensor logits = random_tensor({T, E}, DType::kF64, 1, -3, 3),
         r = random_tensor({T, E}, DType::kF64, 2);
  Tensor p({T, E}, DType::kF64), lse({T}, DType::kF64), dl({T, E}, DType::kF64);
  auto loss = [&] {
    cpu::softmax_rows<double>(logits.matrix<double>(), p.matrix<double>(), lse.span<double>());
    return dot(p.span<double>(), r.span<double>());
  };
  loss();
  cpu::softmax_rows_backward<double>(p.matrix<double>(), r.matrix<double>(), dl.matrix<double>());
  expect_grad_close(loss, logits.span<double>(), dl.span<double>(), "dlogits");
}

TEST(KernelGradcheck, CausalSoftmaxThroughSoftmaxBackward) {
  const int64_t n = 4, m = 7, offset = 2;
  Tensor s = random_tensor({n, m}, DType::kF64, 21, -3, 3), r = random_tensor({n, m}, DType::kF64, 22);
  Tensor p({n, m}, DType::kF64), ds({n, m}, DType::kF64);
  auto loss = [&] {
    cpu::softmax_causal_rows<double>(s.matrix<double>(), offset, p.matrix<double>());
    return dot(p.span<double>(), r.span<double>());
  };
  loss();
  cpu::softmax_rows_backward<double>(p.matrix<double>(), r.matrix<double>(), ds.matrix<double>());
  expect_grad_close(loss, s.span<double>(), ds.span<double>(), "dscores");
}

TEST(KernelGradcheck, CrossEntropy) {
  const int64_t T = 5, V = 9;
  Tensor l = random_tensor({T, V}, DType::kF64, 23, -3, 3), dl({T, V}, DType::kF64);
  const std::vector<int32_t> y = {3, 0, -1, 8, 4};
  auto loss = [&] { return cpu::cross_entropy_rows<double>(l.matrix<double>(), y, 0.25, {}) * 0.25; };
  cpu::cross_entropy_rows<double>(l.matrix<double>(), y, 0.25, dl.matrix<double>());
  expect_grad_close(loss, l.span<double>(), dl.span<double>(), "dlogits");
}

TEST(KernelGradcheck, Swiglu) {
  const int64_t n = 6, f = 9;
  Tensor h1 = random_tensor({n, f}, DType::kF64, 3, -3, 3),
         h3 = random_tensor({n, f}, DType::kF64, 4);
  Tensor r = random_tensor({n, f}, DType::kF64, 5), a({n, f}, DType::kF64);
  Tensor d1({n, f}, DType::kF64), d3({n, f}, DType::kF64);
  auto loss = [&] {
    cpu::swiglu<double>(h1.matrix<double>(), h3.matrix<double>(), a.matrix<double>());
    return dot(a.span<double>(), r.span<double>());
  };
  cpu::swiglu_backward<double>(h1.matrix<double>(), h3.matrix<double>(), r.matrix<double>(),
                               d1.matrix<double>(), d3.matrix<double>());
  expect_grad_close(loss, h1.span<double>(), d1.span<double>(), "dh1");
  expect_grad_close(loss, h3.span<double>(), d3.span<double>(), "dh3");
}

TEST(KernelGradcheck, RmsNorm) {
  const int64_t T = 4, d = 11;
  Tensor x = random_tensor({T, d}, DType::kF64, 6),
         g = random_tensor({d}, DType::kF64, 7, 0.5, 1.5);
  Tensor r = random_tensor({T, d}, DType::kF64, 8), y({T, d}, DType::kF64), rstd({T}, DType::kF64);
  Tensor dx({T, d}, DType::kF64), dg({d}, DType::kF64);
  auto loss = [&] {
    cpu::rmsnorm<double>(x.matrix<double>(), g.span<double>(), 1e-5, y.matrix<double>(),
                         rstd.span<double>());
    return dot(y.span<double>(), r.span<double>());
  };
  loss();
  cpu::rmsnorm_backward<double>(x.matrix<double>(), g.span<double>(), rstd.span<double>(),
                                r.matrix<double>(), dx.matrix<double>(), dg.span<double>());
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  expect_grad_close(loss, g.span<double>(), dg.span<double>(), "dgain");
}

TEST(KernelGradcheck, ScatterAddIsTheAdjointOfWeightedGather) {
  // loss = sum_i w_i <xs_i, r_i> with xs = gather(x): dx = scatter_add(r, w).
  const int64_t T = 5, d = 3;
  std::vector<int32_t> token = {4, 0, 0, 2, 4, 1};
  const int64_t n = int64_t(token.size());
  Tensor x = random_tensor({T, d}, DType::kF64, 9), r = random_tensor({n, d}, DType::kF64, 10);
  Tensor w = random_tensor({n}, DType::kF64, 11), xs({n, d}, DType::kF64), dx({T, d}, DType::kF64);
  auto loss = [&] {
    cpu::gather_rows<double>(x.matrix<double>(), token, xs.matrix<double>());
    double s = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c)
        s += w.data<double>()[i] * xs.matrix<double>()(i, c) * r.matrix<double>()(i, c);
    return s;
  };
  cpu::scatter_add_rows<double>(r.matrix<double>(), token, w.span<double>(), dx.matrix<double>());
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
}

}  // namespace
}  // namespace sy
