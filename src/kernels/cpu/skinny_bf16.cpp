// The skinny GEMM on bf16 dot products (AVX512-BF16 vdpbf16ps): ys = bf16(xs) w for a few rows,
// the product bf16 compute asks for (activations rounded to bf16 once, as the oneDNN bf16 GEMMs
// round them, f32 accumulation). One vdpbf16ps does 32 multiply-adds where an f32 FMA does 16,
// but it wants the two weights of a k pair side by side: the kernel interleaves rows k and k+1
// in registers (vpunpck{l,h}wd), which leaves the columns of a 32-wide chunk in a fixed lane
// order that the last step undoes. Whether that pays depends on the core: where a zmm FMA
// issues once per cycle (AMD Zen 4) it runs the skinny products about twice as fast as the
// widening kernel of gemm.cpp; where two FMA ports each take a zmm (Intel Xeon) the widening
// kernel is as fast or faster. skinny_dot_bf16_choice() measures both once per process.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <mutex>
#include <vector>

#include "kernels/cpu/gemm_checks.h"
#include "switchyard/core/error.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/kernels/cpu.h"

namespace sy::cpu {

namespace {

using detail::kSkinnyRows;
constexpr int64_t kChunk = 32;      // columns per register step: one zmm of bf16 pairs, twice
constexpr int64_t kMaxBlock = 1024;  // columns per thread block (its accumulators stay in L1)
constexpr int64_t kTilePairs = 8;    // k pairs per tile between accumulator loads and stores
constexpr int kMaxMr = 8;            // rows per register pass: 2 x 8 accumulators

#define SY_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// acc (lane order of the unpacks) += sum over the tile's k pairs of x pair * w pair, for MR
// rows and one 32-column chunk. xp: [rows][kp] bf16 pairs as u32; w rows k, k+1 at w, w + ldw.
template <int MR>
SY_BF16_TARGET void dot_chunk(const uint32_t* xp, int64_t kp, int64_t p0, int64_t p1,
                              const bf16* w, int64_t ldw, int64_t K, float* acc,
                              int64_t ld_acc) {
  __m512 lo[MR], hi[MR];
  for (int m = 0; m < MR; ++m) {
    lo[m] = _mm512_loadu_ps(acc + m * ld_acc);
    hi[m] = _mm512_loadu_ps(acc + m * ld_acc + 16);
  }
  auto step = [&](int64_t p, __m512i r0, __m512i r1) {
    const __m512bh pl = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
    const __m512bh ph = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[m * kp + p]));
      lo[m] = _mm512_dpbf16_ps(lo[m], xb, pl);
      hi[m] = _mm512_dpbf16_ps(hi[m], xb, ph);
    }
  };
  const int64_t full = std::min(p1, K / 2);  // pairs with both rows; an odd K's last is half
  for (int64_t p = p0; p < full; ++p)
    step(p, _mm512_loadu_si512(w + 2 * p * ldw), _mm512_loadu_si512(w + (2 * p + 1) * ldw));
  if (full < p1) step(full, _mm512_loadu_si512(w + 2 * full * ldw), _mm512_setzero_si512());
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(acc + m * ld_acc, lo[m]);
    _mm512_storeu_ps(acc + m * ld_acc + 16, hi[m]);
  }
}

template <int... MR>
void dot_chunk_dispatch(std::integer_sequence<int, MR...>, int rows, const uint32_t* xp,
                        int64_t kp, int64_t p0, int64_t p1, const bf16* w, int64_t ldw, int64_t K,
                        float* acc, int64_t ld_acc) {
  ((rows == MR + 1 ? dot_chunk<MR + 1>(xp, kp, p0, p1, w, ldw, K, acc, ld_acc) : void()), ...);
}

// The unpacks leave chunk lanes as lo = columns {0-3, 8-11, 16-19, 24-27}, hi = {4-7, 12-15,
// 20-23, 28-31}; these put them back in column order.
SY_BF16_TARGET void unpermute(const float* acc, float* out) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 lo = _mm512_loadu_ps(acc), hi = _mm512_loadu_ps(acc + 16);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// x[0, K) -> bf16 in dst (as pairs), the last pair's high half zero when K is odd.
SY_BF16_TARGET void to_bf16_row(const float* x, int64_t K, uint32_t* dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + k)));
  for (; k < K; ++k) out[k] = to_bf16(x[k]).bits;
  if (K % 2 != 0) out[K] = 0;
}

double seconds_of(const auto& f) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = wall_seconds();
    f();
    if (rep > 0) best = std::min(best, wall_seconds() - t0);
  }
  return best;
}

}  // namespace

void skinny_gemm_dot_bf16(ConstMatrixView<float> xs, ConstMatrixView<bf16> w,
                          MatrixView<float> ys) {
  const int64_t M = xs.rows, K = w.rows, N = w.cols, kp = (K + 1) / 2;
  SY_CHECK(M >= 1 && M <= kSkinnyRows && xs.cols == K && ys.rows == M && ys.cols == N,
           "skinny bf16 gemm: xs [{}, {}] w [{}, {}] ys [{}, {}]", M, xs.cols, K, N, ys.rows,
           ys.cols);
  // The rows as bf16 pairs (x[k], x[k + 1]): in memory, each row rounded to bf16 in k order,
  // an odd K's row padded with a zero.
  thread_local std::vector<uint32_t> pairs;
  pairs.resize(size_t(M * kp));
  for (int64_t m = 0; m < M; ++m) to_bf16_row(xs.row(m), K, pairs.data() + m * kp);
  const uint32_t* xp = pairs.data();
  const int64_t threads = omp_get_max_threads();
  const int64_t per_thread = (N + 2 * threads - 1) / (2 * threads);
  const int64_t block =
      std::clamp<int64_t>((per_thread + kChunk - 1) / kChunk * kChunk, kChunk, kMaxBlock);
  const int64_t n_blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) if (n_blocks > 1 && M * K * N > (1 << 16))
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t n0 = b * block, nb = std::min(block, N - n0), nv = nb / kChunk * kChunk;
    constexpr int64_t ld_acc = kMaxBlock + 16;  // padded: a 4 KiB stride aliases rows in L1
    alignas(64) float acc[kSkinnyRows * ld_acc];
    for (int64_t m = 0; m < M; ++m) std::fill_n(acc + m * ld_acc, nv, 0.0f);
    // Tiles of k pairs. Before each chunk of a tile, the same columns of the next tile's rows
    // are prefetched (one cache line each): a row segment is a few KiB, too short for the
    // hardware prefetcher to ramp up on, and a whole tile ahead would not fit in L1.
    for (int64_t p0 = 0; p0 < kp; p0 += kTilePairs) {
      const int64_t p1 = std::min(kp, p0 + kTilePairs);
      const int64_t ahead0 = 2 * p1, ahead1 = std::min(K, 2 * (p1 + kTilePairs));
      for (int64_t n = 0; n < nv; n += kChunk) {
        for (int64_t k = ahead0; k < ahead1; ++k) __builtin_prefetch(w.data + k * N + n0 + n);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMr)
          dot_chunk_dispatch(std::make_integer_sequence<int, kMaxMr>(),
                             int(std::min<int64_t>(kMaxMr, M - m0)), xp + m0 * kp, kp, p0, p1,
                             w.data + n0 + n, N, K, acc + m0 * ld_acc + n, ld_acc);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float* y = ys.row(m) + n0;
      for (int64_t n = 0; n < nv; n += kChunk) unpermute(acc + m * ld_acc + n, y + n);
      // Columns past the last full chunk: the same bf16 products, summed in k order.
      for (int64_t n = nv; n < nb; ++n) {
        float s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += to_float(to_bf16(xs(m, k))) * to_float(w(k, n0 + n));
        y[n] = s;
      }
    }
  }
}

const SkinnyBf16Choice& skinny_dot_bf16_choice() {
  static std::once_flag once;
  static SkinnyBf16Choice choice;
  std::call_once(once, [] {
    const char* force = std::getenv("SY_SKINNY_BF16");  // benchmarks: "dot" or "widen"
    if (force != nullptr && *force != '\0') {
      const std::string_view f(force);
      if (f != "dot" && f != "widen")
        throw ConfigError(fmt::format("SY_SKINNY_BF16 = '{}': expected dot or widen", f));
      if (f == "dot" && !__builtin_cpu_supports("avx512bf16"))
        throw ConfigError("SY_SKINNY_BF16=dot: this CPU has no AVX512-BF16");
      choice = {f == "dot", 0.0};
      return;
    }
    if (!__builtin_cpu_supports("avx512bf16")) {
      choice = {false, 0.0};
      return;
    }
    // A cache-resident expert (256 x 1024 bf16, 512 KiB) at one, four and eight rows, one
    // thread: the compute the two kernels differ in, not the memory they share.
    constexpr int64_t K = 256, N = 1024;
    std::vector<bf16> wb(size_t(K * N));
    for (size_t i = 0; i < wb.size(); ++i) wb[i] = to_bf16(float(int(i % 13) - 6) * 0.01f);
    std::vector<float> x(size_t(8 * K)), y(size_t(8 * N));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 7) - 3) * 0.1f;
    ThreadScope one(1);
    double widen = 0, dot = 0;
    for (int64_t m : {1, 4, 8}) {
      const ConstMatrixView<float> xs{x.data(), m, K};
      const ConstMatrixView<bf16> ws{wb.data(), K, N};
      const MatrixView<float> ys{y.data(), m, N};
      const int32_t offsets[2] = {0, int32_t(m)};
      widen += seconds_of([&] {
        grouped_gemm(xs, StackedView<const bf16>{wb.data(), 1, K, N},
                     std::span<const int32_t>(offsets, 2), ys);
      });
      dot += seconds_of([&] { skinny_gemm_dot_bf16(xs, ws, ys); });
    }
    const double ratio = widen / dot;
    choice = {ratio >= 1.1, ratio};
  });
  return choice;
}

}  // namespace sy::cpu
