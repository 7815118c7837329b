// The kernel backend seam. What the CPU offers is read once from CPUID (and capped by the
// SY_MAX_ISA environment variable, so the fallbacks can be tested on any machine); a Backend is
// one set of GEMM kernels for an (ISA, library, precision), picked once at set-up. Model code
// keeps a `const Backend&` (through ExecContext) and calls its members; it never looks at the ISA.
//
//   const Backend& be = pick_backend(cpu_features(), Precision::kAuto);
//   fmt::print("kernels: {}\n", be.name);                 // "cpu-avx512-onednn-f32"
//   be.gemm(false, false, 1.0f, a, b, 0.0f, c);           // a: [M, K], b: [K, N] -> c: [M, N]
//
// Precision kBf16 is mixed precision: GEMM inputs are rounded to bf16, products accumulate in
// f32 and outputs are f32. Products with too few multiply-adds per rounded element for the
// rounding to pay (under 64: decode rows against a weight matrix) are computed in f32 instead;
// everything else (weights kept by the optimizer, norms, softmax, losses) stays f32. double GEMMs
// (gradient checks) always take the f64 OpenBLAS path.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "switchyard/core/dtype.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/core/view.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

// Instruction-set levels, each including the ones before it.
//   kBaseline: x86-64 SSE4.1; kAvx2: AVX2 + FMA; kAvx512: AVX-512 F/BW/VL/DQ;
//   kAvx512Bf16: + AVX512-BF16 (vdpbf16ps); kAmx: + AMX-BF16 tiles, with the kernel's permission.
enum class Isa { kBaseline, kAvx2, kAvx512, kAvx512Bf16, kAmx };
std::string_view isa_name(Isa isa);
// "baseline", "avx2", "avx512", "avx512_bf16", "amx"; throws ConfigError naming `what` otherwise.
Isa parse_isa(std::string_view s, std::string_view what);

enum class Precision { kF32, kBf16, kAuto };
std::string_view precision_name(Precision p);
// "f32", "bf16", "auto"; throws ConfigError naming `what` otherwise.
Precision parse_precision(std::string_view s, std::string_view what);

struct CpuFeatures {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD"
  std::string brand;   // CPUID's brand string, e.g. "AMD EPYC 9R14 96-Core Processor"
  int family = 0, model = 0;
  Isa detected = Isa::kBaseline;  // the highest level whose features CPUID and the OS report
  Isa isa = Isa::kBaseline;       // detected, lowered to SY_MAX_ISA when that is set
  std::string cap;                // SY_MAX_ISA as given, empty when unset
  int64_t l2_bytes = 0;           // per core
  int64_t llc_bytes = 0;          // the last-level cache a core sees (one CCX on AMD)
  // "Intel(R) Xeon(R) Processor (family 6 model 207), isa avx512_bf16, L3 260 MiB"
  std::string describe() const;
};

// Read from CPUID once per process (thread-safe); SY_MAX_ISA applied.
const CpuFeatures& cpu_features();
// The same detection with an explicit cap ("" for none), for tests.
CpuFeatures detect_cpu_features(std::string_view cap);

// One set of kernels. The members take f32 or f64 operands; f64 always goes to the reference-grade
// OpenBLAS path whatever the backend, f32 to the backend's kernels. Semantics are those of
// kernels/cpu.h (same names, same shapes, same +=/= rules); results never depend on the thread
// count. Skinny groups (decode: a few rows per expert) use the memory-bound streaming kernel in
// every backend.
struct Backend {
  std::string name;  // "cpu-<isa>-<library>-<precision>": printed at start, recorded
  Isa isa = Isa::kBaseline;
  std::string library;                    // "onednn" or "openblas"
  Precision precision = Precision::kF32;  // kF32 or kBf16, never kAuto
  // The f32 twin (this backend when it is f32): for products kept in full precision whatever
  // model.precision says, such as the router's logits.
  const Backend* f32 = nullptr;

  void (*gemm_f32)(bool trans_a, bool trans_b, float alpha, ConstMatrixView<float> a,
                   ConstMatrixView<float> b, float beta, MatrixView<float> c) = nullptr;
  void (*grouped_gemm_f32)(ConstMatrixView<float> xs, StackedView<const float> w,
                           std::span<const int32_t> offsets, MatrixView<float> ys) = nullptr;
  void (*grouped_gemm_bf16w)(ConstMatrixView<float> xs, StackedView<const bf16> w,
                             std::span<const int32_t> offsets, MatrixView<float> ys) = nullptr;
  void (*grouped_gemm_bt_f32)(ConstMatrixView<float> dys, StackedView<const float> w,
                              std::span<const int32_t> offsets, float beta,
                              MatrixView<float> dxs) = nullptr;
  void (*grouped_gemm_at_f32)(ConstMatrixView<float> xs, ConstMatrixView<float> dys,
                              std::span<const int32_t> offsets, StackedView<float> dw) = nullptr;

  // c = alpha op(a) op(b) + beta c.  op(a): [M, K], op(b): [K, N], c: [M, N]
  template <class T>
  void gemm(bool trans_a, bool trans_b, T alpha, ConstMatrixView<T> a, ConstMatrixView<T> b, T beta,
            MatrixView<T> c) const {
    if constexpr (std::is_same_v<T, float>)
      gemm_f32(trans_a, trans_b, alpha, a, b, beta, c);
    else
      cpu::gemm<T>(trans_a, trans_b, alpha, a, b, beta, c);
  }
  // ys_g = xs_g w_g.  xs: [n, K], w: [G, K, N], offsets: [G+1] -> ys: [n, N]
  template <class T>
  void grouped_gemm(ConstMatrixView<T> xs, StackedView<const T> w, std::span<const int32_t> offsets,
                    MatrixView<T> ys) const {
    if constexpr (std::is_same_v<T, float>)
      grouped_gemm_f32(xs, w, offsets, ys);
    else
      cpu::grouped_gemm<T>(xs, w, offsets, ys);
  }
  // bf16 weights (inference).  xs: [n, K] f32, w: [G, K, N] bf16 -> ys: [n, N] f32
  void grouped_gemm(ConstMatrixView<float> xs, StackedView<const bf16> w,
                    std::span<const int32_t> offsets, MatrixView<float> ys) const {
    grouped_gemm_bf16w(xs, w, offsets, ys);
  }
  // dxs_g = dys_g w_g^T + beta dxs_g.  dys: [n, N], w: [G, K, N] -> dxs: [n, K]
  template <class T>
  void grouped_gemm_bt(ConstMatrixView<T> dys, StackedView<const T> w,
                       std::span<const int32_t> offsets, T beta, MatrixView<T> dxs) const {
    if constexpr (std::is_same_v<T, float>)
      grouped_gemm_bt_f32(dys, w, offsets, beta, dxs);
    else
      cpu::grouped_gemm_bt<T>(dys, w, offsets, beta, dxs);
  }
  // dw_g += xs_g^T dys_g.  xs: [n, K], dys: [n, N] -> dw: [G, K, N]
  template <class T>
  void grouped_gemm_at(ConstMatrixView<T> xs, ConstMatrixView<T> dys,
                       std::span<const int32_t> offsets, StackedView<T> dw) const {
    if constexpr (std::is_same_v<T, float>)
      grouped_gemm_at_f32(xs, dys, offsets, dw);
    else
      cpu::grouped_gemm_at<T>(xs, dys, offsets, dw);
  }
};

// Every backend this CPU can run (fastest library first, then the OpenBLAS one), for tests and
// benchmarks that compare them. Here and in pick_backend, cpu must be cpu_features(): the
// backends are built once per process for its ISA level (another level is an invariant failure;
// set SY_MAX_ISA before start to get another).
std::span<const Backend* const> available_backends(const CpuFeatures& cpu);

// The backend for a precision on this CPU. kAuto resolves to resolve_precision(cpu). kBf16 on a
// CPU (or cap) without AVX512-BF16 throws ConfigError naming what the CPU has. SY_GEMM_LIBRARY=
// openblas picks the OpenBLAS f32 backend instead (for comparisons).
const Backend& pick_backend(const CpuFeatures& cpu, Precision precision);

struct PrecisionChoice {
  Precision precision = Precision::kF32;  // kF32 or kBf16
  std::string reason;  // "bf16 measured 2.03x f32 on this CPU", "no AVX512-BF16", ...
};
// What kAuto means on this CPU: bf16 with AMX; f32 without AVX512-BF16; otherwise whichever of
// the two measures faster on a 256 x 1024 x 1024 single-thread GEMM at start-up, bf16 only
// when at least 1.25x faster (so that noise cannot flip the choice between runs). Measured once
// per process.
const PrecisionChoice& resolve_precision(const CpuFeatures& cpu);

// The backend a context runs on: ctx.backend, or pick_backend(cpu_features(), kF32) when unset.
const Backend& backend_of(const ExecContext& ctx);

// One line for logs: "kernels cpu-avx512-onednn-f32 (auto: bf16 GEMM measured 0.54x f32 on
// this CPU) on Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207), isa ..."
std::string describe_kernels(Precision precision);

}  // namespace sy
