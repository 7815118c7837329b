// GEMMs on oneDNN's matmul primitive, the fastest f32 and bf16 GEMM measured on the machines
// here (bench/README.md). One primitive per (compute, transposes, accumulate) with every
// dimension and stride given at run time, so experts of any row count share it and nothing is
// created in the steady state. As in gemm.cpp, the output is cut into tiles fixed by the shapes
// (tile_shape), each one single-threaded oneDNN call inside our parallel region (oneDNN runs one
// thread when called from inside one): each output element is reduced in one fixed order, so
// results do not depend on the thread count. bf16 compute rounds each operand to bf16 once per
// call, before tiling, where that pays (bf16_pays); smaller products stay f32. Products and
// groups of at most kSkinnyRows rows (decode) take the memory-bound kernel of gemm.cpp. Reference:
// ref::gemm / ref::grouped_gemm.
#include "kernels/cpu/onednn_gemm.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <dnnl.hpp>
#include <mutex>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kernels/cpu/gemm_checks.h"
#include "switchyard/core/error.h"
#include "switchyard/kernels/cpu.h"

namespace sy::cpu::onednn {

namespace {

using dnnl::memory;
using Dt = memory::data_type;

using detail::check_gemm;
using detail::check_grouped;
using detail::kSkinnyRows;

constexpr int64_t kTileM = 256;   // output rows of one single-threaded call
constexpr int64_t kTileN = 1024;  // output columns of one single-threaded call

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// The primitives, created on first use and kept for the process.
struct PrimitiveKey {
  Compute compute;
  bool ta, tb, accumulate;
  int index() const { return int(compute) * 8 + int(ta) * 4 + int(tb) * 2 + int(accumulate); }
};

const dnnl::matmul& primitive(PrimitiveKey key) {
  static std::mutex mu;
  static std::array<std::unique_ptr<dnnl::matmul>, 16> cache;
  std::lock_guard lock(mu);
  auto& slot = cache[size_t(key.index())];
  if (slot) return *slot;
  const Dt in = key.compute == Compute::kBf16 ? Dt::bf16 : Dt::f32;
  constexpr auto R = DNNL_RUNTIME_DIM_VAL;
  // The layouts (plain or transposed) are fixed per primitive: with both strides at run time
  // oneDNN 2.6 falls back to its reference matmul.
  const memory::desc a({R, R}, in, key.ta ? memory::dims{1, R} : memory::dims{R, 1});
  const memory::desc b({R, R}, in, key.tb ? memory::dims{1, R} : memory::dims{R, 1});
  const memory::desc c({R, R}, Dt::f32, {R, 1});
  dnnl::primitive_attr attr;
  attr.set_output_scales(0, {DNNL_RUNTIME_F32_VAL});
  if (key.accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  // Planned for one thread: every call runs inside our own parallel region.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  try {
    slot = std::make_unique<dnnl::matmul>(
        dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, engine()));
  } catch (const dnnl::error& e) {
    omp_set_num_threads(threads);
    throw Error(fmt::format("oneDNN matmul ({} compute) cannot be created here: {}",
                            key.compute == Compute::kBf16 ? "bf16" : "f32", e.what()));
  }
  omp_set_num_threads(threads);
  const char* info = nullptr;
  dnnl_primitive_desc_query(slot->get_primitive_desc(), dnnl_query_impl_info_str, 0, &info);
  SY_CHECK(info != nullptr && std::string_view(info).substr(0, 3) != "ref",
           "oneDNN picked its reference matmul ({}) for a GEMM layout", info ? info : "?");
  return *slot;
}

// One tile: c[m, n] = alpha op(a)[m, k] op(b)[k, n] (+ c), pointers at the tile's corner.
struct Tile {
  const void* a;
  const void* b;
  float* c;
  int64_t m, n, k, lda, ldb, ldc;
};

memory::desc operand_desc(int64_t rows, int64_t cols, Dt dt, bool trans, int64_t ld) {
  return trans ? memory::desc({rows, cols}, dt, {1, ld}) : memory::desc({rows, cols}, dt, {ld, 1});
}

void run_tile(const dnnl::matmul& mm, PrimitiveKey key, const Tile& t, float alpha) {
  thread_local dnnl::stream stream(engine());
  const Dt in = key.compute == Compute::kBf16 ? Dt::bf16 : Dt::f32;
  memory a(operand_desc(t.m, t.k, in, key.ta, t.lda), engine(), const_cast<void*>(t.a));
  memory b(operand_desc(t.k, t.n, in, key.tb, t.ldb), engine(), const_cast<void*>(t.b));
  memory c(memory::desc({t.m, t.n}, Dt::f32, {t.ldc, 1}), engine(), t.c);
  memory scale(memory::desc({1}, Dt::f32, {1}), engine(), &alpha);
  mm.execute(stream, {{DNNL_ARG_SRC, a},
                      {DNNL_ARG_WEIGHTS, b},
                      {DNNL_ARG_DST, c},
                      {DNNL_ARG_ATTR_OUTPUT_SCALES, scale}});
  stream.wait();
}

struct TileShape {
  int64_t m = kTileM, n = kTileN;
};

// The tile for n_products outputs of [M, N] each with reductions of length K: 256 x 1024,
// made smaller (down to 64 x 64) while the call would have fewer than kMinTiles tiles and a tile
// would still hold at least kMinTileMacs multiply-adds, so that a product with a small output
// and a long reduction (a weight gradient x^T dy over thousands of tokens) spreads over the
// threads, while small products (attention heads) stay whole. Shapes alone decide it, never
// the thread count.
constexpr int64_t kMinTiles = 8;
constexpr int64_t kMinTileMacs = int64_t(1) << 24;
TileShape tile_shape(int64_t M, int64_t N, int64_t K, int64_t n_products) {
  TileShape t;
  auto count = [&] { return n_products * ((M + t.m - 1) / t.m) * ((N + t.n - 1) / t.n); };
  auto macs = [&] { return std::min(t.m, M) * std::min(t.n, N) * K; };
  while (count() < kMinTiles && macs() >= 2 * kMinTileMacs) {
    if (t.n > 256 && t.n / 2 >= std::min<int64_t>(N, 256))
      t.n /= 2;
    else if (t.m > 64 && t.m / 2 < M)
      t.m /= 2;
    else if (t.n > 64 && t.n / 2 < N)
      t.n /= 2;
    else
      break;
  }
  return t;
}

// Appends the tiles of one product c = alpha op(a) op(b) (+ c) over elements of `es` bytes.
// op(a): [M, K], op(b): [K, N]; lda and ldb are the row strides of a and b as stored.
void add_tiles(bool ta, bool tb, size_t es, const char* a, int64_t lda, const char* b, int64_t ldb,
               float* c, int64_t ldc, int64_t M, int64_t N, int64_t K, std::vector<Tile>& tiles,
               TileShape shape = {}) {
  for (int64_t i0 = 0; i0 < M; i0 += shape.m)
    for (int64_t j0 = 0; j0 < N; j0 += shape.n) {
      // Element (i, k) of op(a) sits at a[i lda + k] or, transposed, a[k lda + i].
      const char* at = a + size_t(ta ? i0 : i0 * lda) * es;
      const char* bt = b + size_t(tb ? j0 * ldb : j0) * es;
      tiles.push_back({at, bt, c + i0 * ldc + j0, std::min(shape.m, M - i0),
                       std::min(shape.n, N - j0), K, lda, ldb, ldc});
    }
}

// Always inside a parallel region, even for one tile (see the file comment).
void run_tiles(PrimitiveKey key, const std::vector<Tile>& tiles, float alpha) {
  if (tiles.empty()) return;
  const dnnl::matmul& mm = primitive(key);
  const int64_t n = int64_t(tiles.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) run_tile(mm, key, tiles[i], alpha);
}

// src rounded to bf16 into a buffer that lives until the next call on this thread.
// src: [n] -> [n] bf16
const bf16* to_bf16_buffer(const float* src, int64_t n, std::vector<bf16>& buffer) {
  buffer.resize(size_t(n));
  bf16* dst = buffer.data();
#pragma omp parallel for schedule(static) if (n > (1 << 16) && !omp_in_parallel())
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
  return dst;
}

struct Bf16Buffers {
  std::vector<bf16> a, b;
  std::vector<float> wide;  // bf16 weights widened for f32 compute
};
Bf16Buffers& buffers() {
  thread_local Bf16Buffers b;
  return b;
}

// The operands as the compute type wants them: the f32 data itself, or a bf16 copy.
struct Operands {
  const char* a;
  const char* b;
  size_t es;
};
Operands prepare(Compute compute, const float* a, int64_t na, const float* b, int64_t nb) {
  if (compute == Compute::kF32)
    return {reinterpret_cast<const char*>(a), reinterpret_cast<const char*>(b), sizeof(float)};
  Bf16Buffers& buf = buffers();
  return {reinterpret_cast<const char*>(to_bf16_buffer(a, na, buf.a)),
          reinterpret_cast<const char*>(to_bf16_buffer(b, nb, buf.b)), sizeof(bf16)};
}

// beta other than 0 or 1 is applied to c first, then the product accumulates onto it.
bool scale_for_beta(float beta, MatrixView<float> c) {
  if (beta == 0.0f) return false;
  if (beta != 1.0f)
    for (int64_t i = 0; i < c.size(); ++i) c.data[i] *= beta;
  return true;
}

// bf16 compute rounds both operands first, which pays only when each rounded element feeds
// enough multiply-adds: an [M, K] x [K, N] product below kBf16MinMacs per rounded element runs
// in f32 (decode rows against a whole weight matrix, small attention heads). Shapes alone decide.
constexpr double kBf16MinMacs = 64;
bool bf16_pays(int64_t M, int64_t N, int64_t K) {
  return double(M) * double(N) * double(K) >= kBf16MinMacs * double(M * K + K * N);
}

// The skinny groups of a grouped product, one at a time on gemm.cpp's streaming kernel.
template <class W>
void skinny_group(ConstMatrixView<float> xs, MatrixView<const W> wg, int64_t r0, int64_t r1,
                  MatrixView<float> ys) {
  const int32_t offsets[2] = {0, int32_t(r1 - r0)};
  cpu::grouped_gemm(xs.slice_rows(r0, r1), StackedView<const W>{wg.data, 1, wg.rows, wg.cols},
                    std::span<const int32_t>(offsets, 2), ys.slice_rows(r0, r1));
}

}  // namespace

void set_max_isa(int isa_level) {
  static const dnnl::cpu_isa levels[] = {
      dnnl::cpu_isa::sse41, dnnl::cpu_isa::avx2, dnnl::cpu_isa::avx512_core,
      dnnl::cpu_isa::avx512_core_bf16, dnnl::cpu_isa::avx512_core_amx};
  SY_CHECK(isa_level >= 0 && isa_level < 5, "isa level {}", isa_level);
  try {
    dnnl::set_max_cpu_isa(levels[isa_level]);
  } catch (const dnnl::error& e) {
    SY_CHECK(false, "oneDNN ISA cap set after first use: {}", e.what());
  }
}

void gemm(Compute compute, bool trans_a, bool trans_b, float alpha, ConstMatrixView<float> a,
          ConstMatrixView<float> b, float beta, MatrixView<float> c) {
  const int64_t K = check_gemm(trans_a, trans_b, a, b, c);
  if (c.rows == 0 || c.cols == 0) return;
  const bool accumulate = scale_for_beta(beta, c);
  if (K == 0) {
    if (!accumulate) std::fill_n(c.data, c.size(), 0.0f);
    return;
  }
  // A few rows times a weight matrix (decode) stream the weight once, as skinny groups do.
  if (!trans_a && !trans_b && alpha == 1.0f && !accumulate && c.rows <= kSkinnyRows) {
    const int32_t offsets[2] = {0, int32_t(c.rows)};
    cpu::grouped_gemm(a, StackedView<const float>{b.data, 1, b.rows, b.cols},
                      std::span<const int32_t>(offsets, 2), c);
    return;
  }
  if (!bf16_pays(c.rows, c.cols, K)) compute = Compute::kF32;
  const Operands op = prepare(compute, a.data, a.size(), b.data, b.size());
  std::vector<Tile> tiles;
  add_tiles(trans_a, trans_b, op.es, op.a, a.cols, op.b, b.cols, c.data, c.cols, c.rows, c.cols, K,
            tiles, tile_shape(c.rows, c.cols, K, 1));
  run_tiles({compute, trans_a, trans_b, accumulate}, tiles, alpha);
}

namespace {
// ys_g = xs_g w_g over prepared operands (op: xs and the weights in the compute type): groups
// past the skinny limit as oneDNN tiles, the others on the streaming kernel over the weights as
// stored (W: f32 or bf16), which reads them once.
template <class W>
void grouped_forward(Compute compute, const Operands& op, ConstMatrixView<float> xs,
                     StackedView<const W> w, std::span<const int32_t> offsets,
                     MatrixView<float> ys) {
  const int64_t K = w.rows, N = w.cols;
  std::vector<Tile> tiles;
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    if (r1 - r0 <= kSkinnyRows) {
      // Decode. bf16 weights under bf16 compute take the vdpbf16ps kernel where it measured
      // faster on this CPU (AMD Zen 4: about 2x); elsewhere the streaming kernel widens them in
      // registers (Intel Xeon 6/207: as fast at one row per expert, 1.4x faster at five).
      if constexpr (std::is_same_v<W, bf16>) {
        if (compute == Compute::kBf16 && cpu::skinny_dot_bf16_choice().use_dot) {
          cpu::skinny_gemm_dot_bf16(xs.slice_rows(r0, r1), w[g], ys.slice_rows(r0, r1));
          continue;
        }
      }
      skinny_group<W>(xs, w[g], r0, r1, ys);
      continue;
    }
    add_tiles(false, false, op.es, op.a + size_t(r0 * K) * op.es, K,
              op.b + size_t(g * K * N) * op.es, N, ys.data + r0 * N, N, r1 - r0, N, K, tiles);
  }
  run_tiles({compute, false, false, false}, tiles, 1.0f);
}

}  // namespace

void grouped_gemm(Compute compute, ConstMatrixView<float> xs, StackedView<const float> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  check_grouped(xs.rows, w.n, offsets);
  if (xs.rows == 0) return;
  // Per group: the streaming kernel (skinny: decode), oneDNN in f32, or oneDNN in bf16 where
  // rounding pays; only the bf16 groups' weights are rounded, so a step with a few large
  // groups does not round every expert.
  const int64_t K = w.rows, N = w.cols, per = K * N;
  std::vector<Tile> f32_tiles, bf16_tiles;
  const bf16* xb = nullptr;
  std::vector<bf16>& wb = buffers().b;
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1], rows = r1 - r0;
    if (rows == 0) continue;
    if (rows <= kSkinnyRows) {
      skinny_group<float>(xs, w[g], r0, r1, ys);
      continue;
    }
    if (compute == Compute::kF32 || !bf16_pays(rows, N, K)) {
      add_tiles(false, false, sizeof(float), reinterpret_cast<const char*>(xs.data + r0 * K), K,
                reinterpret_cast<const char*>(w.data + g * per), N, ys.data + r0 * N, N, rows, N, K,
                f32_tiles);
      continue;
    }
    if (xb == nullptr) xb = to_bf16_buffer(xs.data, xs.size(), buffers().a);
    if (wb.size() < size_t(w.n * per)) wb.resize(size_t(w.n * per));  // grows only
    const float* src = w.data + g * per;
    bf16* dst = wb.data() + g * per;
#pragma omp parallel for schedule(static) if (per > (1 << 16) && !omp_in_parallel())
    for (int64_t i = 0; i < per; ++i) dst[i] = to_bf16(src[i]);
    add_tiles(false, false, sizeof(bf16), reinterpret_cast<const char*>(xb + r0 * K), K,
              reinterpret_cast<const char*>(dst), N, ys.data + r0 * N, N, rows, N, K, bf16_tiles);
  }
  run_tiles({Compute::kF32, false, false, false}, f32_tiles, 1.0f);
  run_tiles({Compute::kBf16, false, false, false}, bf16_tiles, 1.0f);
}

void grouped_gemm(Compute compute, ConstMatrixView<float> xs, StackedView<const bf16> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  check_grouped(xs.rows, w.n, offsets);
  if (xs.rows == 0) return;
  const int64_t per = w.rows * w.cols;
  if (compute == Compute::kBf16) {
    const bf16* a = to_bf16_buffer(xs.data, xs.size(), buffers().a);
    const Operands op{reinterpret_cast<const char*>(a), reinterpret_cast<const char*>(w.data),
                      sizeof(bf16)};
    grouped_forward<bf16>(compute, op, xs, w, offsets, ys);
    return;
  }
  // f32 compute on the widened weights of the groups oneDNN takes. The buffer only grows (a
  // resize down and up again would zero the regrown part on every call), and is not touched
  // when every group is skinny (decode), so a step reads each weight byte once.
  bool any_wide = false;
  for (int64_t g = 0; g < w.n; ++g)
    any_wide = any_wide || offsets[g + 1] - offsets[g] > kSkinnyRows;
  std::vector<float>& wide = buffers().wide;
  if (any_wide && wide.size() < size_t(w.n * per)) wide.resize(size_t(w.n * per));
  for (int64_t g = 0; g < w.n; ++g) {
    if (offsets[g + 1] - offsets[g] <= kSkinnyRows) continue;
    const bf16* src = w.data + g * per;
    float* dst = wide.data() + g * per;
#pragma omp parallel for schedule(static) if (per > (1 << 16) && !omp_in_parallel())
    for (int64_t i = 0; i < per; ++i) dst[i] = to_float(src[i]);
  }
  const Operands op{reinterpret_cast<const char*>(xs.data),
                    reinterpret_cast<const char*>(wide.data()), sizeof(float)};
  grouped_forward<bf16>(compute, op, xs, w, offsets, ys);
}

void grouped_gemm_bt(Compute compute, ConstMatrixView<float> dys, StackedView<const float> w,
                     std::span<const int32_t> offsets, float beta, MatrixView<float> dxs) {
  check_grouped(dys.rows, w.n, offsets);
  const int64_t K = w.rows, N = w.cols;
  if (dys.rows == 0) return;
  const bool accumulate = scale_for_beta(beta, dxs);
  const Operands op = prepare(compute, dys.data, dys.size(), w.data, w.n * K * N);
  std::vector<Tile> tiles;
  for (int64_t g = 0; g < w.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    // dxs_g [rows, K] = dys_g [rows, N] w_g^T [N, K]: w_g stored [K, N], row stride N.
    add_tiles(false, true, op.es, op.a + size_t(r0 * N) * op.es, N,
              op.b + size_t(g * K * N) * op.es, N, dxs.data + r0 * K, K, r1 - r0, K, N, tiles);
  }
  run_tiles({compute, false, true, accumulate}, tiles, 1.0f);
}

void grouped_gemm_at(Compute compute, ConstMatrixView<float> xs, ConstMatrixView<float> dys,
                     std::span<const int32_t> offsets, StackedView<float> dw) {
  check_grouped(xs.rows, dw.n, offsets);
  const int64_t K = dw.rows, N = dw.cols;
  SY_CHECK(xs.cols == K && dys.cols == N && dys.rows == xs.rows,
           "grouped_gemm_at xs [{}, {}] dys [{}, {}] dw [{}, {}, {}]", xs.rows, xs.cols, dys.rows,
           dys.cols, dw.n, K, N);
  if (xs.rows == 0) return;
  const Operands op = prepare(compute, xs.data, xs.size(), dys.data, dys.size());
  int64_t used = 0, rows = 0;
  for (int64_t g = 0; g < dw.n; ++g) {
    used += offsets[g + 1] > offsets[g];
    rows = std::max<int64_t>(rows, offsets[g + 1] - offsets[g]);
  }
  const TileShape shape = tile_shape(K, N, rows, used);
  std::vector<Tile> tiles;
  for (int64_t g = 0; g < dw.n; ++g) {
    const int64_t r0 = offsets[g], r1 = offsets[g + 1];
    if (r1 == r0) continue;
    // dw_g [K, N] += xs_g^T [K, rows] dys_g [rows, N]: xs_g stored [rows, K], row stride K.
    add_tiles(true, false, op.es, op.a + size_t(r0 * K) * op.es, K, op.b + size_t(r0 * N) * op.es,
              N, dw.data + g * K * N, N, K, N, r1 - r0, tiles, shape);
  }
  run_tiles({compute, true, false, true}, tiles, 1.0f);
}

namespace {
void dense_call(Dt in, const void* a, const void* b, MatrixView<float> c, int64_t K) {
  const int64_t M = c.rows, N = c.cols;
  static std::mutex mu;
  static std::unique_ptr<dnnl::matmul> cache[2];
  std::unique_ptr<dnnl::matmul>* slot;
  {
    std::lock_guard lock(mu);
    slot = &cache[in == Dt::bf16 ? 1 : 0];
    if (!*slot) {
      constexpr auto R = DNNL_RUNTIME_DIM_VAL;
      const memory::desc md({R, R}, in, {R, 1});
      const memory::desc cd({R, R}, Dt::f32, {R, 1});
      *slot = std::make_unique<dnnl::matmul>(
          dnnl::matmul::primitive_desc(dnnl::matmul::desc(md, md, cd), engine()));
    }
  }
  dnnl::stream stream(engine());
  memory am(memory::desc({M, K}, in, {K, 1}), engine(), const_cast<void*>(a));
  memory bm(memory::desc({K, N}, in, {N, 1}), engine(), const_cast<void*>(b));
  memory cm(memory::desc({M, N}, Dt::f32, {N, 1}), engine(), c.data);
  (*slot)->execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  stream.wait();
}
}  // namespace

void dense_gemm(Compute compute, ConstMatrixView<float> a, ConstMatrixView<float> b,
                MatrixView<float> c) {
  SY_CHECK(a.cols == b.rows && a.rows == c.rows && b.cols == c.cols, "dense gemm shapes");
  const Operands op = prepare(compute, a.data, a.size(), b.data, b.size());
  dense_call(compute == Compute::kBf16 ? Dt::bf16 : Dt::f32, op.a, op.b, c, a.cols);
}

void dense_gemm_bf16(ConstMatrixView<bf16> a, ConstMatrixView<bf16> b, MatrixView<float> c) {
  SY_CHECK(a.cols == b.rows && a.rows == c.rows && b.cols == c.cols, "dense gemm shapes");
  dense_call(Dt::bf16, a.data, b.data, c, a.cols);
}

const char* impl_name(Compute compute) {
  const dnnl::matmul& mm = primitive({compute, false, false, false});
  const char* info = nullptr;
  dnnl_primitive_desc_query(mm.get_primitive_desc(), dnnl_query_impl_info_str, 0, &info);
  return info != nullptr ? info : "?";
}

}  // namespace sy::cpu::onednn
