// Decode with bf16 weights on AVX512-BF16: ys = xs w for a few rows, with `vdpbf16ps` dot
// products of bf16 pairs accumulated in f32, so the weights are read once and never widened.
// vdpbf16ps wants the two elements of a pair adjacent; the weights are stored [K, N] row-major,
// so two consecutive rows k, k+1 are interleaved in registers (unpacklo/hi of 16-bit lanes)
// instead of repacking the weights in memory. The interleave leaves the columns of a 32-wide
// block split over two accumulators in a fixed order ({0-3, 8-11, 16-19, 24-27} and the rest),
// put back in order once at the end. xs is rounded to bf16 (bf16 compute, as the bf16 backend
// does everywhere). Compiled for AVX512-BF16 with a target attribute and called only by the
// bf16 backend, which exists only where CPUID reports it. Reference: ref::grouped_gemm.
#include "kernels/cpu/skinny_bf16.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "switchyard/core/error.h"

namespace sy::cpu {

namespace {

#define SY_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kCols = 32;  // columns per sub-block: one register pair of accumulators

// Accumulates MR rows x NB sub-blocks of 32 columns starting at column n0, over all K.
// xp: [MR, Kp] pairs of bf16 (x[k], x[k+1]) as 32-bit words, Kp = ceil(K / 2).
// cols: valid columns of the last sub-block (32 for full ones). out: [MR, NB * 32] f32.
template <int MR, int NB>
SY_TARGET_BF16 void block(const uint32_t* xp, int64_t Kp, int64_t K, const uint16_t* w, int64_t ldw,
                          int64_t n0, int64_t cols_last, float* out, int64_t ld_out) {
  __m512 lo[MR][NB], hi[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) lo[m][b] = hi[m][b] = _mm512_setzero_ps();
  const __mmask32 last = cols_last >= 32 ? ~__mmask32(0) : ((__mmask32(1) << cols_last) - 1);
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const int64_t k = 2 * kp;
    const uint16_t* r0 = w + k * ldw + n0;
    const uint16_t* r1 = r0 + ldw;
    const bool pair = k + 1 < K;
    if (k + 8 < K) {
      for (int b = 0; b < NB; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + 8 * ldw + b * kCols), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(r1 + 8 * ldw + b * kCols), _MM_HINT_T0);
      }
    }
    __m512i wl[NB], wh[NB];
    for (int b = 0; b < NB; ++b) {
      const __mmask32 mask = b == NB - 1 ? last : ~__mmask32(0);
      const __m512i a = _mm512_maskz_loadu_epi16(mask, r0 + b * kCols);
      const __m512i c = pair ? _mm512_maskz_loadu_epi16(mask, r1 + b * kCols) : _mm512_setzero_si512();
      wl[b] = _mm512_unpacklo_epi16(a, c);
      wh[b] = _mm512_unpackhi_epi16(a, c);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xb = _mm512_set1_epi32(int(xp[m * Kp + kp]));
      for (int b = 0; b < NB; ++b) {
        lo[m][b] = _mm512_dpbf16_ps(lo[m][b], (__m512bh)xb, (__m512bh)wl[b]);
        hi[m][b] = _mm512_dpbf16_ps(hi[m][b], (__m512bh)xb, (__m512bh)wh[b]);
      }
    }
  }
  // Column c of a sub-block sits in lo (c % 8 < 4) or hi, at lane 4 (c / 8) + c % 4.
  alignas(64) int32_t idx[32];
  for (int c = 0; c < 32; ++c) idx[c] = (c % 8 < 4 ? 0 : 16) + 4 * (c / 8) + c % 4;
  const __m512i i0 = _mm512_load_si512(idx), i1 = _mm512_load_si512(idx + 16);
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) {
      float* o = out + m * ld_out + b * kCols;
      _mm512_storeu_ps(o, _mm512_permutex2var_ps(lo[m][b], i0, hi[m][b]));
      _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(lo[m][b], i1, hi[m][b]));
    }
}

// Sub-blocks per block for MR rows: 2 MR NB accumulators stay within the 32 zmm registers.
template <int MR>
constexpr int kBlocks = MR == 1 ? 8 : MR == 2 ? 4 : MR <= 4 ? 2 : 1;

template <int MR>
SY_TARGET_BF16 void rows(const uint32_t* xp, int64_t Kp, int64_t K, const uint16_t* w, int64_t N,
                         float* ys, int64_t ldy) {
  constexpr int NB = kBlocks<MR>;
  constexpr int64_t width = NB * kCols;
  const int64_t n_blocks = (N + width - 1) / width;
#pragma omp parallel for schedule(static) if (n_blocks > 1 && !omp_in_parallel())
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t n0 = blk * width, valid = std::min(width, N - n0);
    alignas(64) float out[MR * width];
    // A short last block runs with fewer sub-blocks' worth of valid columns (masked loads).
    const int64_t subs = (valid + kCols - 1) / kCols;
    const int64_t cols_last = valid - (subs - 1) * kCols;
    if (subs == NB) {
      block<MR, NB>(xp, Kp, K, w, N, n0, cols_last, out, width);
    } else {
      // Fewer than NB sub-blocks remain: one at a time.
      for (int64_t s = 0; s < subs; ++s)
        block<MR, 1>(xp, Kp, K, w, N, n0 + s * kCols, s + 1 == subs ? cols_last : kCols,
                     out + s * kCols, width);
    }
    for (int m = 0; m < MR; ++m) std::memcpy(ys + m * ldy + n0, out + m * width, size_t(valid) * 4);
  }
}

}  // namespace

void skinny_gemm_bf16_dot(ConstMatrixView<float> xs, MatrixView<const bf16> w, MatrixView<float> ys) {
  const int64_t M = xs.rows, K = w.rows, N = w.cols;
  SY_CHECK(M >= 1 && M <= kSkinnyBf16MaxRows && xs.cols == K && ys.rows == M && ys.cols == N,
           "skinny bf16 gemm xs [{}, {}] w [{}, {}] ys [{}, {}]", M, xs.cols, K, N, ys.rows,
           ys.cols);
  // xs as bf16 pairs (x[k], x[k+1]); an odd K pads with 0 (the weight row past K reads as 0).
  const int64_t Kp = (K + 1) / 2;
  thread_local std::vector<uint32_t> xp;
  xp.resize(size_t(M * Kp));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const uint32_t a = to_bf16(xs(m, 2 * kp)).bits;
      const uint32_t b = 2 * kp + 1 < K ? to_bf16(xs(m, 2 * kp + 1)).bits : 0;
      xp[size_t(m * Kp + kp)] = a | (b << 16);
    }
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.data);
  // Rows in chunks the register budget allows; each chunk reads the weights once.
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t mr = std::min<int64_t>(8, M - m0);
    const uint32_t* x = xp.data() + m0 * Kp;
    float* y = ys.data + m0 * N;
    switch (mr) {
      case 1: rows<1>(x, Kp, K, wb, N, y, N); break;
      case 2: rows<2>(x, Kp, K, wb, N, y, N); break;
      case 3: rows<3>(x, Kp, K, wb, N, y, N); break;
      case 4: rows<4>(x, Kp, K, wb, N, y, N); break;
      case 5: rows<5>(x, Kp, K, wb, N, y, N); break;
      case 6: rows<6>(x, Kp, K, wb, N, y, N); break;
      case 7: rows<7>(x, Kp, K, wb, N, y, N); break;
      default: rows<8>(x, Kp, K, wb, N, y, N); break;
    }
  }
}

}  // namespace sy::cpu
