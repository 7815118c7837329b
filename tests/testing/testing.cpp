// Test helpers: random tensors and the finite-difference gradient check.
#include "testing/testing.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <fmt/format.h>

namespace sy::testing {

Tensor random_tensor(std::initializer_list<int64_t> shape, DType dtype, uint64_t seed, double lo,
                     double hi) {
  Tensor t(shape, DType::kF64);
  fill_uniform(t.span<double>(), Philox(seed, 0x7e57), lo, hi);
  return dtype == DType::kF64 ? std::move(t) : convert(t, dtype);
}

double max_scaled_error(std::span<const double> a, std::span<const double> b, double atol,
                        double rtol) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, std::abs(a[i] - b[i]) / (atol + rtol * std::abs(b[i])));
  return worst;
}

void expect_grad_close(const std::function<double()>& loss, std::span<double> param,
                       std::span<const double> grad, std::string_view name, double eps, double atol,
                       double rtol, int max_checks) {
  ASSERT_EQ(param.size(), grad.size()) << name;
  const size_t n = param.size();
  const size_t stride = std::max<size_t>(1, n / size_t(max_checks));
  int failures = 0;
  // A prime offset so the sampled entries do not all fall in the same column.
  for (size_t i = n > 7 ? 7 % stride : 0; i < n; i += stride) {
    const double saved = param[i];
    param[i] = saved + eps;
    const double up = loss();
    param[i] = saved - eps;
    const double down = loss();
    param[i] = saved;
    const double numeric = (up - down) / (2 * eps);
    if (std::abs(numeric - grad[i]) > atol + rtol * std::abs(numeric) && ++failures <= 5)
      ADD_FAILURE() << name << "[" << i << "]: analytic " << grad[i] << ", numeric " << numeric;
  }
  EXPECT_EQ(failures, 0) << name << ": entries whose gradient disagrees";
}

void expect_named_grads_close(const std::function<double()>& loss,
                              const std::vector<std::pair<std::string, Tensor*>>& params,
                              const std::vector<std::pair<std::string, Tensor*>>& grads,
                              int max_checks) {
  ASSERT_EQ(grads.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_EQ(params[i].first, grads[i].first);
    expect_grad_close(loss, params[i].second->span<double>(), grads[i].second->span<double>(),
                      params[i].first, 1e-6, 1e-7, 1e-5, max_checks);
  }
}

double dot(std::span<const double> y, std::span<const double> r) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
  return s;
}

void perturb(const std::vector<std::pair<std::string, Tensor*>>& params, uint64_t seed) {
  for (const auto& [name, t] : params) {
    const Tensor r = random_tensor({t->numel()}, DType::kF64, seed++, -0.3, 0.3);
    for (int64_t i = 0; i < t->numel(); ++i) t->data<double>()[i] += r.data<double>()[i];
  }
}

std::string fashion_slice_dir(const std::string& dir, const std::string& source_dir) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const fs::path data = fs::path(source_dir) / "data";
  for (const char* split : {"train", "t10k"})
    for (const auto& [kind, idx] : {std::pair{"images", "idx3"}, std::pair{"labels", "idx1"}}) {
      const fs::path to = fs::path(dir) / fmt::format("{}-{}-{}-ubyte.gz", split, kind, idx);
      if (!fs::exists(to))
        fs::copy_file(data / fmt::format("fashion-mnist-t10k-1000-{}-{}-ubyte.gz", kind, idx), to);
    }
  return dir;
}

}  // namespace sy::testing
