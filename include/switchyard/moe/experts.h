// The experts: E SwiGLU MLPs with stacked weights, run as grouped GEMMs over the rows of a
// dispatch plan (expert e owns rows offsets[e]..offsets[e+1] of xs).
//   h1 = xs w1_e, h3 = xs w3_e, act = silu(h1) * h3, ys = act w2_e
// w1, w3: [E, d, f], w2: [E, f, d]. Derivation of backward: docs/moe_backward.md.
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/tensor.h"
#include "switchyard/kernels/backend.h"

namespace sy {

struct ExpertsCache {
  Tensor h1, h3, act;     // [n, f]: what backward needs
  Tensor dact, dh1, dh3;  // [n, f]: backward's scratch
};

// be: the GEMM kernels (kernels/backend.h). xs: [n, d] -> ys: [n, d] (=)
template <class T>
void experts_forward(const Backend& be, StackedView<const T> w1, StackedView<const T> w3,
                     StackedView<const T> w2, ConstMatrixView<T> xs,
                     std::span<const int32_t> offsets, MatrixView<T> ys, ExpertsCache& cache);

// The same with bf16 weights and f32 activations, for inference (backward needs f32 or f64).
void experts_forward(const Backend& be, StackedView<const bf16> w1, StackedView<const bf16> w3,
                     StackedView<const bf16> w2, ConstMatrixView<float> xs,
                     std::span<const int32_t> offsets, MatrixView<float> ys, ExpertsCache& cache);

// dys: [n, d] -> dw1, dw3, dw2 (+=), dxs: [n, d] (=)
template <class T>
void experts_backward(const Backend& be, StackedView<const T> w1, StackedView<const T> w3,
                      StackedView<const T> w2, ConstMatrixView<T> xs,
                      std::span<const int32_t> offsets, ConstMatrixView<T> dys,
                      ExpertsCache& cache, StackedView<T> dw1, StackedView<T> dw3,
                      StackedView<T> dw2, MatrixView<T> dxs);

}  // namespace sy
