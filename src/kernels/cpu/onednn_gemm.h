// GEMM and grouped GEMM on oneDNN's matmul, in f32 or bf16 compute (bf16 inputs, f32
// accumulation and output). Internal to kernels/: the backends of kernels/backend.h call these.
// Reference: ref::gemm / ref::grouped_gemm (same semantics as kernels/cpu.h).
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/dtype.h"
#include "switchyard/core/view.h"

namespace sy::cpu::onednn {

enum class Compute { kF32, kBf16 };

// Caps oneDNN's JIT to an ISA level (0 baseline .. 4 AMX, as sy::Isa). Must run before the
// first oneDNN call; a later call with another level is an invariant failure.
void set_max_isa(int isa_level);

// c = alpha op(a) op(b) + beta c.  op(a): [M, K], op(b): [K, N], c: [M, N]
void gemm(Compute compute, bool trans_a, bool trans_b, float alpha, ConstMatrixView<float> a,
          ConstMatrixView<float> b, float beta, MatrixView<float> c);
// ys_g = xs_g w_g.  xs: [n, K], w: [G, K, N], offsets: [G+1] -> ys: [n, N]
void grouped_gemm(Compute compute, ConstMatrixView<float> xs, StackedView<const float> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys);
// bf16 weights: kBf16 rounds xs to bf16; kF32 widens the weights and keeps xs exact.
void grouped_gemm(Compute compute, ConstMatrixView<float> xs, StackedView<const bf16> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys);
// dxs_g = dys_g w_g^T + beta dxs_g.  dys: [n, N], w: [G, K, N] -> dxs: [n, K]
void grouped_gemm_bt(Compute compute, ConstMatrixView<float> dys, StackedView<const float> w,
                     std::span<const int32_t> offsets, float beta, MatrixView<float> dxs);
// dw_g += xs_g^T dys_g.  xs: [n, K], dys: [n, N] -> dw: [G, K, N]
void grouped_gemm_at(Compute compute, ConstMatrixView<float> xs, ConstMatrixView<float> dys,
                     std::span<const int32_t> offsets, StackedView<float> dw);

// c = a b as one multi-threaded oneDNN call (no fixed tiling, so its last bits may change with
// the thread count): the dense ceiling benchmarks measure against. bf16 inputs for kBf16.
// a: [M, K], b: [K, N] -> c: [M, N]
void dense_gemm(Compute compute, ConstMatrixView<float> a, ConstMatrixView<float> b,
                MatrixView<float> c);
// The same on inputs already in bf16 (the ceiling without conversion). a: [M, K], b: [K, N]
void dense_gemm_bf16(ConstMatrixView<bf16> a, ConstMatrixView<bf16> b, MatrixView<float> c);

// Which oneDNN implementation runs f32 / bf16 matmuls ("gemm:jit", "brg:avx512_core_amx", ...).
const char* impl_name(Compute compute);

}  // namespace sy::cpu::onednn
