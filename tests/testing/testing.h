// Shared test helpers: random tensors from a fixed seed (never zeros) and the float64
// central-difference gradient check every backward goes through.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/rng.h"
#include "switchyard/core/tensor.h"

namespace sy::testing {

// A tensor of the given shape and dtype with entries uniform in [lo, hi).
Tensor random_tensor(std::initializer_list<int64_t> shape, DType dtype, uint64_t seed,
                     double lo = -1.0, double hi = 1.0);

// Largest |a - b| / (atol + rtol * |b|) over two equal-length spans; <= 1 passes.
double max_scaled_error(std::span<const double> a, std::span<const double> b, double atol,
                        double rtol);

// Checks d loss / d param against the analytic `grad` by central differences with step eps,
// on up to max_checks entries spread over param (all of them when it is small). The loss is
// re-evaluated with each entry nudged; param is restored afterwards.
// Passes when |numeric - analytic| <= atol + rtol * |numeric| for every checked entry.
void expect_grad_close(const std::function<double()>& loss, std::span<double> param,
                       std::span<const double> grad, std::string_view name, double eps = 1e-6,
                       double atol = 1e-7, double rtol = 1e-5, int max_checks = 48);

// expect_grad_close for every tensor of a model's parameter set against the same-named tensor
// of its gradients (params and grads: named() of a parameter set and of its gradients), each
// on up to max_checks entries.
void expect_named_grads_close(const std::function<double()>& loss,
                              const std::vector<std::pair<std::string, Tensor*>>& params,
                              const std::vector<std::pair<std::string, Tensor*>>& grads,
                              int max_checks = 24);

// Adds uniform [-0.3, 0.3) noise (seeds seed, seed + 1, ...) to every float64 tensor of a
// parameter set, so that no gradient is checked where it vanishes (initial biases are zero).
void perturb(const std::vector<std::pair<std::string, Tensor*>>& params, uint64_t seed = 100);

// A directory in Fashion-MNIST's layout (train-images-idx3-ubyte.gz, ...) whose training and
// test files are both the committed 1000-image slice under source_dir/data; returns dir.
std::string fashion_slice_dir(const std::string& dir, const std::string& source_dir);

// sum(y * r): a scalar loss whose gradient w.r.t. y is r.
double dot(std::span<const double> y, std::span<const double> r);

}  // namespace sy::testing
