// SwiGLU experts over grouped GEMMs. Forward keeps h1, h3 and act so backward recomputes
// nothing; that is 3 n f values, the largest part of the layer's activation memory.
#include "switchyard/moe/experts.h"

#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {
template <class T, class W>
void forward_impl(const Backend& be, StackedView<const W> w1, StackedView<const W> w3,
                  StackedView<const W> w2, ConstMatrixView<T> xs, std::span<const int32_t> offsets,
                  MatrixView<T> ys, ExpertsCache& c) {
  const int64_t n = xs.rows, f = w1.cols;
  const DType dt = dtype_of<T>();
  c.h1.resize_for_overwrite({n, f}, dt);
  c.h3.resize_for_overwrite({n, f}, dt);
  c.act.resize_for_overwrite({n, f}, dt);
  if (n == 0) return;
  be.grouped_gemm(xs, w1, offsets, c.h1.matrix<T>());
  be.grouped_gemm(xs, w3, offsets, c.h3.matrix<T>());
  cpu::swiglu<T>(c.h1.matrix<T>(), c.h3.matrix<T>(), c.act.matrix<T>());
  be.grouped_gemm(ConstMatrixView<T>(c.act.matrix<T>()), w2, offsets, ys);
}
}  // namespace

template <class T>
void experts_forward(const Backend& be, StackedView<const T> w1, StackedView<const T> w3,
                     StackedView<const T> w2, ConstMatrixView<T> xs,
                     std::span<const int32_t> offsets, MatrixView<T> ys, ExpertsCache& cache) {
  forward_impl<T, T>(be, w1, w3, w2, xs, offsets, ys, cache);
}

void experts_forward(const Backend& be, StackedView<const bf16> w1, StackedView<const bf16> w3,
                     StackedView<const bf16> w2, ConstMatrixView<float> xs,
                     std::span<const int32_t> offsets, MatrixView<float> ys, ExpertsCache& cache) {
  forward_impl<float, bf16>(be, w1, w3, w2, xs, offsets, ys, cache);
}

template <class T>
void experts_backward(const Backend& be, StackedView<const T> w1, StackedView<const T> w3,
                      StackedView<const T> w2, ConstMatrixView<T> xs,
                      std::span<const int32_t> offsets, ConstMatrixView<T> dys, ExpertsCache& c,
                      StackedView<T> dw1, StackedView<T> dw3, StackedView<T> dw2,
                      MatrixView<T> dxs) {
  const int64_t n = xs.rows, f = w1.cols;
  if (n == 0) return;
  const DType dt = dtype_of<T>();
  c.dact.resize_for_overwrite({n, f}, dt);
  c.dh1.resize_for_overwrite({n, f}, dt);
  c.dh3.resize_for_overwrite({n, f}, dt);
  // ys = act w2:  dw2 += act^T dys,  dact = dys w2^T.
  be.grouped_gemm_at<T>(c.act.matrix<T>(), dys, offsets, dw2);
  be.grouped_gemm_bt<T>(dys, w2, offsets, T(0), c.dact.matrix<T>());
  cpu::swiglu_backward<T>(c.h1.matrix<T>(), c.h3.matrix<T>(), c.dact.matrix<T>(), c.dh1.matrix<T>(),
                          c.dh3.matrix<T>());
  // h1 = xs w1, h3 = xs w3:  dw += xs^T dh,  dxs = dh1 w1^T + dh3 w3^T.
  be.grouped_gemm_at<T>(xs, c.dh1.matrix<T>(), offsets, dw1);
  be.grouped_gemm_at<T>(xs, c.dh3.matrix<T>(), offsets, dw3);
  be.grouped_gemm_bt<T>(c.dh1.matrix<T>(), w1, offsets, T(0), dxs);
  be.grouped_gemm_bt<T>(c.dh3.matrix<T>(), w3, offsets, T(1), dxs);
}

#define SY_INSTANTIATE(T)                                                                     \
  template void experts_forward(const Backend&, StackedView<const T>, StackedView<const T>,   \
                                StackedView<const T>, ConstMatrixView<T>,                     \
                                std::span<const int32_t>, MatrixView<T>, ExpertsCache&);      \
  template void experts_backward(const Backend&, StackedView<const T>, StackedView<const T>,  \
                                 StackedView<const T>, ConstMatrixView<T>,                    \
                                 std::span<const int32_t>, ConstMatrixView<T>, ExpertsCache&, \
                                 StackedView<T>, StackedView<T>, StackedView<T>, MatrixView<T>);
SY_INSTANTIATE(float)
SY_INSTANTIATE(double)
#undef SY_INSTANTIATE

}  // namespace sy
