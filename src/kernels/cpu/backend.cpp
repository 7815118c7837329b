// CPU feature detection (CPUID, the OS's saved-state mask, the kernel's AMX permission) and the
// table of CPU backends. The only place that looks at the ISA: everything else asks for a
// Backend. Levels come from feature bits, never from a list of known CPU models.
#include "switchyard/kernels/backend.h"

#include <cpuid.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "kernels/cpu/onednn_gemm.h"
#include "switchyard/core/error.h"
#include "switchyard/kernels/cpu.h"

namespace sy {

namespace {

constexpr std::string_view kIsaNames[] = {"baseline", "avx2", "avx512", "avx512_bf16", "amx"};

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
Regs cpuid(unsigned leaf, unsigned sub = 0) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}
bool bit(unsigned v, int i) { return (v >> i) & 1u; }

uint64_t xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux keeps AMX tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Cache sizes from CPUID's deterministic cache parameters (leaf 4 on Intel, 0x8000001D on
// AMD): ways x partitions x line size x sets.
void read_caches(bool amd, CpuFeatures& f) {
  const unsigned leaf = amd ? 0x8000001Du : 4u;
  if (amd && cpuid(0x80000000u).a < leaf) return;
  for (unsigned i = 0; i < 16; ++i) {
    const Regs r = cpuid(leaf, i);
    const unsigned type = r.a & 0x1f;
    if (type == 0) break;
    if (type == 2) continue;  // instruction cache
    const int level = int((r.a >> 5) & 7);
    const int64_t bytes = int64_t((r.b >> 22) + 1) * (((r.b >> 12) & 0x3ff) + 1) *
                          ((r.b & 0xfff) + 1) * (int64_t(r.c) + 1);
    if (level == 2) f.l2_bytes = bytes;
    if (level >= 2) f.llc_bytes = std::max(f.llc_bytes, bytes);
  }
  // sysconf as a second opinion where CPUID leaves are hidden (some hypervisors).
  if (f.llc_bytes == 0) {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    f.l2_bytes = std::max<int64_t>(f.l2_bytes, l2 > 0 ? l2 : 0);
    f.llc_bytes = std::max<int64_t>({f.llc_bytes, l3 > 0 ? l3 : 0, f.l2_bytes});
  }
}

Isa detect_isa() {
  const unsigned max_leaf = cpuid(0).a;
  const Regs l1 = cpuid(1);
  const bool osxsave = bit(l1.c, 27);
  if (!osxsave || max_leaf < 7) return Isa::kBaseline;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = ymm_os && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_os = (xcr0 & 0x60000) == 0x60000;     // XTILECFG, XTILEDATA
  const Regs l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
  const bool avx2 = ymm_os && bit(l1.c, 12) /*FMA*/ && bit(l7.b, 5) /*AVX2*/;
  const bool avx512 = zmm_os && bit(l7.b, 16) /*F*/ && bit(l7.b, 17) /*DQ*/ &&
                      bit(l7.b, 30) /*BW*/ && bit(l7.b, 31) /*VL*/;
  const bool avx512_bf16 = avx512 && bit(l7s1.a, 5);
  const bool amx = avx512_bf16 && tile_os && bit(l7.d, 22) /*AMX-BF16*/ &&
                   bit(l7.d, 24) /*AMX-TILE*/ && request_amx_permission();
  if (amx) return Isa::kAmx;
  if (avx512_bf16) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return Isa::kBaseline;
}

// ---- The backends ----

namespace onednn = cpu::onednn;
using onednn::Compute;

template <Compute C>
void dnnl_gemm(bool ta, bool tb, float alpha, ConstMatrixView<float> a, ConstMatrixView<float> b,
               float beta, MatrixView<float> c) {
  onednn::gemm(C, ta, tb, alpha, a, b, beta, c);
}
template <Compute C>
void dnnl_grouped(ConstMatrixView<float> xs, StackedView<const float> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  onednn::grouped_gemm(C, xs, w, offsets, ys);
}
template <Compute C>
void dnnl_grouped_bf16w(ConstMatrixView<float> xs, StackedView<const bf16> w,
                        std::span<const int32_t> offsets, MatrixView<float> ys) {
  onednn::grouped_gemm(C, xs, w, offsets, ys);
}
template <Compute C>
void dnnl_grouped_bt(ConstMatrixView<float> dys, StackedView<const float> w,
                     std::span<const int32_t> offsets, float beta, MatrixView<float> dxs) {
  onednn::grouped_gemm_bt(C, dys, w, offsets, beta, dxs);
}
template <Compute C>
void dnnl_grouped_at(ConstMatrixView<float> xs, ConstMatrixView<float> dys,
                     std::span<const int32_t> offsets, StackedView<float> dw) {
  onednn::grouped_gemm_at(C, xs, dys, offsets, dw);
}

void blas_gemm(bool ta, bool tb, float alpha, ConstMatrixView<float> a, ConstMatrixView<float> b,
               float beta, MatrixView<float> c) {
  cpu::gemm<float>(ta, tb, alpha, a, b, beta, c);
}
void blas_grouped(ConstMatrixView<float> xs, StackedView<const float> w,
                  std::span<const int32_t> offsets, MatrixView<float> ys) {
  cpu::grouped_gemm<float>(xs, w, offsets, ys);
}
void blas_grouped_bf16w(ConstMatrixView<float> xs, StackedView<const bf16> w,
                        std::span<const int32_t> offsets, MatrixView<float> ys) {
  cpu::grouped_gemm(xs, w, offsets, ys);
}
void blas_grouped_bt(ConstMatrixView<float> dys, StackedView<const float> w,
                     std::span<const int32_t> offsets, float beta, MatrixView<float> dxs) {
  cpu::grouped_gemm_bt<float>(dys, w, offsets, beta, dxs);
}
void blas_grouped_at(ConstMatrixView<float> xs, ConstMatrixView<float> dys,
                     std::span<const int32_t> offsets, StackedView<float> dw) {
  cpu::grouped_gemm_at<float>(xs, dys, offsets, dw);
}

template <Compute C>
Backend make_onednn(Isa isa) {
  Backend b;
  b.isa = isa;
  b.library = "onednn";
  b.precision = C == Compute::kBf16 ? Precision::kBf16 : Precision::kF32;
  b.name = fmt::format("cpu-{}-onednn-{}", isa_name(isa), precision_name(b.precision));
  b.gemm_f32 = dnnl_gemm<C>;
  b.grouped_gemm_f32 = dnnl_grouped<C>;
  b.grouped_gemm_bf16w = dnnl_grouped_bf16w<C>;
  b.grouped_gemm_bt_f32 = dnnl_grouped_bt<C>;
  b.grouped_gemm_at_f32 = dnnl_grouped_at<C>;
  return b;
}

Backend make_openblas(Isa isa) {
  Backend b;
  b.isa = isa;
  b.library = "openblas";
  b.precision = Precision::kF32;
  b.name = fmt::format("cpu-{}-openblas-f32", isa_name(isa));
  b.gemm_f32 = blas_gemm;
  b.grouped_gemm_f32 = blas_grouped;
  b.grouped_gemm_bf16w = blas_grouped_bf16w;
  b.grouped_gemm_bt_f32 = blas_grouped_bt;
  b.grouped_gemm_at_f32 = blas_grouped_at;
  return b;
}

struct BackendTable {
  Backend f32, bf16, openblas;
  bool has_bf16 = false;
  std::vector<const Backend*> all;
};

// Built once for the process's CPU (cpu_features(), cap included); oneDNN is capped to match.
// Filled in place: the backends point at each other (their f32 twins) and `all` at them.
const BackendTable& backend_table() {
  static BackendTable t;
  static std::once_flag once;
  std::call_once(once, [] {
    const CpuFeatures& cpu = cpu_features();
    onednn::set_max_isa(int(cpu.isa));
    t.f32 = make_onednn<Compute::kF32>(cpu.isa);
    t.has_bf16 = cpu.isa >= Isa::kAvx512Bf16;
    if (t.has_bf16) t.bf16 = make_onednn<Compute::kBf16>(cpu.isa);
    t.openblas = make_openblas(cpu.isa);
    t.f32.f32 = &t.f32;
    t.bf16.f32 = &t.f32;
    t.openblas.f32 = &t.openblas;
    t.all.push_back(&t.f32);
    if (t.has_bf16) t.all.push_back(&t.bf16);
    t.all.push_back(&t.openblas);
  });
  return t;
}

// Seconds of the best of a few single-threaded 256 x 1024 x 1024 products (one GEMM tile's
// worth of work, inside a parallel region of one thread as the kernels run it).
double time_tile(const Backend& be) {
  constexpr int64_t M = 256, K = 1024, N = 1024;
  std::vector<float> a(size_t(M * K)), b(size_t(K * N)), c(size_t(M * N));
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 7) * 0.1f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(i % 5) * 0.1f;
  double best = 1e30;
  ThreadScope one(1);
  for (int rep = 0; rep < 4; ++rep) {
    const double t0 = wall_seconds();
    be.gemm_f32(false, false, 1.0f, {a.data(), M, K}, {b.data(), K, N}, 0.0f, {c.data(), M, N});
    if (rep > 0) best = std::min(best, wall_seconds() - t0);
  }
  return best;
}

}  // namespace

std::string_view isa_name(Isa isa) { return kIsaNames[int(isa)]; }

namespace cpu {
void dnnl_sgemm(ConstMatrixView<float> a, ConstMatrixView<float> b, MatrixView<float> c) {
  backend_table();  // oneDNN capped to the ISA first
  onednn::dense_gemm(Compute::kF32, a, b, c);
}
void dnnl_gemm_bf16(ConstMatrixView<bf16> a, ConstMatrixView<bf16> b, MatrixView<float> c) {
  backend_table();
  onednn::dense_gemm_bf16(a, b, c);
}
}  // namespace cpu

Isa parse_isa(std::string_view s, std::string_view what) {
  for (int i = 0; i < 5; ++i)
    if (s == kIsaNames[i]) return Isa(i);
  throw ConfigError(
      fmt::format("{} = '{}': expected one of baseline, avx2, avx512, avx512_bf16, amx", what, s));
}

std::string CpuFeatures::describe() const {
  std::string s = fmt::format("{} ({} family {} model {}), isa {}", brand, vendor, family, model,
                              isa_name(isa));
  if (!cap.empty() && isa < detected)
    s += fmt::format(" (capped by SY_MAX_ISA={}, detected {})", cap, isa_name(detected));
  else if (!cap.empty())
    s += fmt::format(" (SY_MAX_ISA={} is not below it)", cap);
  s += fmt::format(", L2 {} KiB, LLC {} MiB", l2_bytes >> 10, llc_bytes >> 20);
  return s;
}

CpuFeatures detect_cpu_features(std::string_view cap) {
  CpuFeatures f;
  const Regs l0 = cpuid(0);
  char vendor[13] = {};
  std::memcpy(vendor, &l0.b, 4);
  std::memcpy(vendor + 4, &l0.d, 4);
  std::memcpy(vendor + 8, &l0.c, 4);
  f.vendor = vendor;
  const Regs l1 = cpuid(1);
  const unsigned base_family = (l1.a >> 8) & 0xf, base_model = (l1.a >> 4) & 0xf;
  f.family = int(base_family == 0xf ? base_family + ((l1.a >> 20) & 0xff) : base_family);
  f.model = int(base_family == 0x6 || base_family == 0xf ? base_model + (((l1.a >> 16) & 0xf) << 4)
                                                         : base_model);
  if (cpuid(0x80000000u).a >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i);
      std::memcpy(brand + 16 * i, &r, 16);
    }
    std::string_view b(brand);
    while (!b.empty() && b.front() == ' ') b.remove_prefix(1);
    while (!b.empty() && (b.back() == ' ' || b.back() == '\0')) b.remove_suffix(1);
    f.brand = std::string(b);
  }
  f.detected = detect_isa();
  f.isa = f.detected;
  if (!cap.empty()) {
    f.cap = std::string(cap);
    f.isa = std::min(f.detected, parse_isa(cap, "SY_MAX_ISA"));
  }
  read_caches(f.vendor == "AuthenticAMD", f);
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    const char* cap = std::getenv("SY_MAX_ISA");
    return detect_cpu_features(cap != nullptr ? cap : "");
  }();
  return f;
}

std::span<const Backend* const> available_backends(const CpuFeatures& cpu) {
  const BackendTable& t = backend_table();
  SY_CHECK(cpu.isa == t.f32.isa, "backends were built for {}, asked for {}", isa_name(t.f32.isa),
           isa_name(cpu.isa));
  return t.all;
}

const PrecisionChoice& resolve_precision(const CpuFeatures& cpu) {
  static std::once_flag once;
  static PrecisionChoice choice;
  std::call_once(once, [&] {
    const BackendTable& t = backend_table();
    if (!t.has_bf16) {
      choice = {Precision::kF32, fmt::format("no AVX512-BF16 at isa {}", isa_name(cpu.isa))};
    } else if (cpu.isa >= Isa::kAmx) {
      choice = {Precision::kBf16, "AMX-BF16 tiles"};
    } else {
      const double f32 = time_tile(t.f32), bf16 = time_tile(t.bf16);
      const double ratio = f32 / bf16;
      choice = {ratio >= 1.25 ? Precision::kBf16 : Precision::kF32,
                fmt::format("bf16 GEMM measured {:.2f}x f32 on this CPU", ratio)};
    }
  });
  return choice;
}

const Backend& pick_backend(const CpuFeatures& cpu, Precision precision) {
  const BackendTable& t = backend_table();
  SY_CHECK(cpu.isa == t.f32.isa, "backends were built for {}, asked for {}", isa_name(t.f32.isa),
           isa_name(cpu.isa));
  const char* lib = std::getenv("SY_GEMM_LIBRARY");
  if (lib != nullptr && *lib != '\0') {
    const std::string_view l(lib);
    if (l == "openblas") {
      if (precision == Precision::kBf16)
        throw ConfigError(
            "SY_GEMM_LIBRARY=openblas: OpenBLAS has no bf16 GEMM here; use "
            "model.precision=f32 or unset SY_GEMM_LIBRARY");
      return t.openblas;
    }
    if (l != "onednn")
      throw ConfigError(fmt::format("SY_GEMM_LIBRARY = '{}': expected onednn or openblas", l));
  }
  if (precision == Precision::kAuto) precision = resolve_precision(cpu).precision;
  if (precision == Precision::kBf16) {
    if (!t.has_bf16)
      throw ConfigError(fmt::format(
          "precision bf16 (model.precision or --precision): this CPU offers isa {} ({}); bf16 "
          "compute needs AVX512-BF16 (use f32 or auto)",
          isa_name(cpu.isa), cpu.brand));
    return t.bf16;
  }
  return t.f32;
}

std::string describe_kernels(Precision precision) {
  const CpuFeatures& cpu = cpu_features();
  const Backend& be = pick_backend(cpu, precision);
  std::string why;
  if (precision == Precision::kAuto)
    why = fmt::format(" (auto: {})", resolve_precision(cpu).reason);
  std::string skinny;
  if (be.precision == Precision::kBf16) {
    const cpu::SkinnyBf16Choice& c = cpu::skinny_dot_bf16_choice();
    skinny = c.ratio > 0 ? fmt::format("; few-row bf16 products: {} (vdpbf16ps measured {:.2f}x "
                                       "the widening kernel)",
                                       c.use_dot ? "vdpbf16ps" : "widened to f32", c.ratio)
                         : fmt::format("; few-row bf16 products: {} (SY_SKINNY_BF16)",
                                       c.use_dot ? "vdpbf16ps" : "widened to f32");
  }
  return fmt::format("kernels {}{} on {}{}", be.name, why, cpu.describe(), skinny);
}

const Backend& backend_of(const ExecContext& ctx) {
  if (ctx.backend != nullptr) return *ctx.backend;
  static const Backend& fallback = pick_backend(cpu_features(), Precision::kF32);
  return fallback;
}

}  // namespace sy
