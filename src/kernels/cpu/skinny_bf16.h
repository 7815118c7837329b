// The decode kernel for bf16 weights on AVX512-BF16 (skinny_bf16.cpp). Internal to kernels/.
#pragma once

#include <cstdint>

#include "switchyard/core/dtype.h"
#include "switchyard/core/view.h"

namespace sy::cpu {

constexpr int64_t kSkinnyBf16MaxRows = 16;

// ys = bf16(xs) w with bf16 dot products and f32 accumulation, for 1..16 rows; weights read
// once, never widened. Needs AVX512-BF16 (the caller checks). Multi-threaded over column
// blocks unless called inside a parallel region; each element is summed over k in one fixed
// order, so the thread count does not change it.
// xs: [M, K] f32, w: [K, N] bf16 -> ys: [M, N] f32 (=)
void skinny_gemm_bf16_dot(ConstMatrixView<float> xs, MatrixView<const bf16> w, MatrixView<float> ys);

}  // namespace sy::cpu
