// What the CPU GEMM kernels (gemm.cpp, onednn_gemm.cpp) share: the skinny-group limit and the
// shape invariants they check on entry. Internal to kernels/.
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/error.h"
#include "switchyard/core/view.h"

namespace sy::cpu::detail {

// Groups of at most this many rows (decode: a few tokens per expert) are memory-bound: the
// streaming kernel reads each weight once instead of handing them to a packing GEMM.
constexpr int64_t kSkinnyRows = 16;

// op(a): [M, K], op(b): [K, N], c: [M, N]; returns K.
template <class A, class B, class C>
int64_t check_gemm(bool trans_a, bool trans_b, ConstMatrixView<A> a, ConstMatrixView<B> b,
                   MatrixView<C> c) {
  const int64_t K = trans_a ? a.rows : a.cols;
  SY_CHECK((trans_a ? a.cols : a.rows) == c.rows && (trans_b ? b.cols : b.rows) == K &&
               (trans_b ? b.rows : b.cols) == c.cols,
           "gemm shapes a [{}, {}] b [{}, {}] c [{}, {}]", a.rows, a.cols, b.rows, b.cols, c.rows,
           c.cols);
  return K;
}

// offsets: [n_groups + 1] from 0 to n_rows.
inline void check_grouped(int64_t n_rows, int64_t n_groups, std::span<const int32_t> offsets) {
  SY_CHECK(int64_t(offsets.size()) == n_groups + 1, "offsets size {} for {} groups", offsets.size(),
           n_groups);
  SY_CHECK(offsets.front() == 0 && offsets.back() == n_rows, "offsets span [{}, {}] for {} rows",
           offsets.front(), offsets.back(), n_rows);
}

}  // namespace sy::cpu::detail
