// CPU kernels: free functions over non-owning views. Each has a plain twin in
// kernels/ref.h that tests compare against. All are instantiated for float and double
// (double for finite-difference checks); outputs are overwritten unless the comment says +=.
// Results do not depend on the thread count: every output element is reduced by one thread in
// a fixed order.
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/dtype.h"
#include "switchyard/core/view.h"

namespace sy::cpu {

#include "switchyard/kernels/detail/kernel_decls.inc"

// c = a b as one plain multi-threaded BLAS call: the machine's dense GEMM rate, which
// benchmarks use as their ceiling. Unlike gemm, its last bits may change with the thread count.
// a: [M, K], b: [K, N] -> c: [M, N]
void blas_sgemm(ConstMatrixView<float> a, ConstMatrixView<float> b, MatrixView<float> c);
// The kernel OpenBLAS picked for this CPU at load time ("SkylakeX", "Haswell", "Prescott").
const char* blas_core_name();
// The same ceiling from oneDNN: one multi-threaded matmul, f32 inputs or bf16 inputs, f32 out.
// a: [M, K], b: [K, N] -> c: [M, N]
void dnnl_sgemm(ConstMatrixView<float> a, ConstMatrixView<float> b, MatrixView<float> c);
void dnnl_gemm_bf16(ConstMatrixView<bf16> a, ConstMatrixView<bf16> b, MatrixView<float> c);

// ys = bf16(xs) w for at most 16 rows on AVX512-BF16 dot products (vdpbf16ps): the skinny
// product of bf16 compute, each x rounded to bf16 once, f32 accumulation in k order. Needs a
// CPU with AVX512-BF16. xs: [M, K], w: [K, N] -> ys: [M, N], 1 <= M <= 16.
void skinny_gemm_dot_bf16(ConstMatrixView<float> xs, ConstMatrixView<bf16> w,
                          MatrixView<float> ys);
// Whether the bf16 backend's skinny groups take skinny_gemm_dot_bf16 instead of widening the
// weights to f32: measured once per process on a cache-resident product (no AVX512-BF16: never;
// SY_SKINNY_BF16=dot or widen forces one, for benchmarks).
struct SkinnyBf16Choice {
  bool use_dot = false;
  double ratio = 0;  // the widening kernel's time over the dot kernel's; 0: not measured (forced)
};
const SkinnyBf16Choice& skinny_dot_bf16_choice();

}  // namespace sy::cpu
