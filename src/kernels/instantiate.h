// Explicit instantiations of the templated kernels of kernel_decls.inc for one element type.
// Each kernel source invokes the groups it defines, inside its own namespace:
//   SY_INSTANTIATE_GEMM_KERNELS(float)  SY_INSTANTIATE_ROW_KERNELS(double)
#pragma once

#define SY_INSTANTIATE_GEMM_KERNELS(T)                                                            \
  template void gemm(bool, bool, T, ConstMatrixView<T>, ConstMatrixView<T>, T, MatrixView<T>);    \
  template void grouped_gemm(ConstMatrixView<T>, StackedView<const T>, std::span<const int32_t>,  \
                             MatrixView<T>);                                                      \
  template void grouped_gemm_bt(ConstMatrixView<T>, StackedView<const T>,                         \
                                std::span<const int32_t>, T, MatrixView<T>);                      \
  template void grouped_gemm_at(ConstMatrixView<T>, ConstMatrixView<T>, std::span<const int32_t>, \
                                StackedView<T>);

#define SY_INSTANTIATE_ROW_KERNELS(T)                                                              \
  template void softmax_rows(ConstMatrixView<T>, MatrixView<T>, std::span<T>);                     \
  template void softmax_rows_backward(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>);      \
  template void softmax_causal_rows(ConstMatrixView<T>, int64_t, MatrixView<T>);                   \
  template double cross_entropy_rows(ConstMatrixView<T>, std::span<const int32_t>, T,              \
                                     MatrixView<T>);                                               \
  template void topk_rows(ConstMatrixView<T>, MatrixView<int32_t>, MatrixView<T>);                 \
  template void silu(std::span<const T>, std::span<T>);                                            \
  template void gelu(std::span<const T>, std::span<T>);                                            \
  template void swiglu(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>);                     \
  template void swiglu_backward(ConstMatrixView<T>, ConstMatrixView<T>, ConstMatrixView<T>,        \
                                MatrixView<T>, MatrixView<T>);                                     \
  template void gather_rows(ConstMatrixView<T>, std::span<const int32_t>, MatrixView<T>);          \
  template void scatter_add_rows(ConstMatrixView<T>, std::span<const int32_t>, std::span<const T>, \
                                 MatrixView<T>);                                                   \
  template void rmsnorm(ConstMatrixView<T>, std::span<const T>, T, MatrixView<T>, std::span<T>);   \
  template void rmsnorm_backward(ConstMatrixView<T>, std::span<const T>, std::span<const T>,       \
                                 ConstMatrixView<T>, MatrixView<T>, std::span<T>);
