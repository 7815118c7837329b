// `switchyard bench moe`. For each shape: median wall time of forward and of forward+backward,
// GFLOP/s of active FLOPs, and the ratio to a dense sgemm [T*k, d] x [d, f] timed in the same
// run; the share of layer time spent outside the expert GEMMs (router, plan, gather, combine);
// for decode shapes, bytes of expert weights read per second against memcpy bandwidth.
#include "cli/bench_moe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "switchyard/core/file.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/moe/moe_layer_cuda.h"

namespace sy::cli {

const std::vector<MoeShape>& moe_bench_shapes() {
  static const std::vector<MoeShape> shapes = {
      {"A", 4096, 512, 1024, 8, 2, false, false},   {"B", 4096, 1024, 512, 64, 8, false, false},
      {"C1", 1, 1024, 3584, 8, 2, true, false},     {"C16", 16, 1024, 3584, 8, 2, true, false},
      {"M", 16384, 4096, 14336, 8, 2, false, true}, {"X", 16384, 2048, 1024, 64, 8, false, true},
  };
  return shapes;
}

namespace {

// Median wall time of fn over iters runs after one warm-up run.
double median_seconds(int iters, const std::function<void()>& fn) {
  fn();
  std::vector<double> t(size_t(std::max(iters, 1)));
  for (double& s : t) {
    const double t0 = wall_seconds();
    fn();
    s = wall_seconds() - t0;
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}


int default_iters(const MoeShape& s) { return s.decode ? 50 : 5; }

}  // namespace

double copy_bandwidth(int iters) {
  // Bytes per buffer: at least twice the last-level cache a core sees (some machines report
  // hundreds of MiB), so the copy runs from memory, within 256 MiB .. 2 GiB.
  const int64_t n = std::clamp<int64_t>(2 * cpu_features().llc_bytes, int64_t(256) << 20,
                                        int64_t(2) << 30) / 64 * 64;
  std::vector<char> src(size_t(n), 1), dst(size_t(n), 0);
  const double t = median_seconds(iters, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < 64; ++b)
      std::memcpy(dst.data() + b * (n / 64), src.data() + b * (n / 64), size_t(n / 64));
  });
  return 2.0 * double(n) / t;
}

double DenseCeilings::best(Precision p) const {
  return p == Precision::kBf16 ? onednn_bf16 : std::max(openblas_f32, onednn_f32);
}

nlohmann::json DenseCeilings::to_json() const {
  return {{"openblas_f32_gflops", openblas_f32 / 1e9},
          {"openblas_core", openblas_core},
          {"onednn_f32_gflops", onednn_f32 / 1e9},
          {"onednn_bf16_gflops", onednn_bf16 / 1e9}};
}

// Best (not median) of the runs: a ceiling is what the library can reach, and on a shared
// machine the slow runs are other processes' doing.
double best_seconds(int iters, const std::function<void()>& fn) {
  fn();
  double best = 1e30;
  for (int i = 0; i < std::max(iters, 3); ++i) {
    const double t0 = wall_seconds();
    fn();
    best = std::min(best, wall_seconds() - t0);
  }
  return best;
}

DenseCeilings measure_dense_ceilings(int64_t M, int64_t K, int64_t N, int iters) {
  M = std::max<int64_t>(M, 1);
  Tensor a({M, K}, DType::kF32), b({K, N}, DType::kF32), c({M, N}, DType::kF32);
  fill_normal(a.span<float>(), Philox(7, 101), 1.0f);
  fill_normal(b.span<float>(), Philox(7, 102), 1.0f);
  const double flops = 2.0 * double(M) * double(K) * double(N);
  DenseCeilings r;
  r.openblas_core = cpu::blas_core_name();
  r.openblas_f32 = flops / best_seconds(iters, [&] {
                     cpu::blas_sgemm(a.matrix<float>(), b.matrix<float>(), c.matrix<float>());
                   });
  r.onednn_f32 = flops / best_seconds(iters, [&] {
                   cpu::dnnl_sgemm(a.matrix<float>(), b.matrix<float>(), c.matrix<float>());
                 });
  if (cpu_features().isa >= Isa::kAvx512Bf16) {
    const Tensor ab = convert(a, DType::kBF16), bb = convert(b, DType::kBF16);
    r.onednn_bf16 = flops / best_seconds(iters, [&] {
                      cpu::dnnl_gemm_bf16(ab.matrix<bf16>(), bb.matrix<bf16>(), c.matrix<float>());
                    });
  }
  return r;
}

namespace {

nlohmann::json bench_shape(const MoeShape& s, const BenchMoeOptions& opt, double copy_bw) {
  MoeConfig cfg{.d_model = s.d_model, .d_ff = s.d_ff, .n_experts = s.n_experts, .top_k = s.top_k};
  cfg.dropless = opt.capacity_factor <= 0;
  if (!cfg.dropless) cfg.capacity_factor_train = cfg.capacity_factor_eval = opt.capacity_factor;
  MoeLayer layer(cfg);
  const bool bf16_weights = opt.weights == "bf16";
  auto make_params = [&](uint64_t seed) {
    MoeParams q = init_moe_params(cfg, DType::kF32, seed);
    if (bf16_weights) {
      q.w1 = convert(q.w1, DType::kBF16);
      q.w3 = convert(q.w3, DType::kBF16);
      q.w2 = convert(q.w2, DType::kBF16);
    }
    return q;
  };
  const MoeParams p = make_params(opt.seed);
  Tensor x({s.n_tokens, s.d_model}, DType::kF32), y, dx;
  fill_normal(x.span<float>(), Philox(opt.seed, 100), 1.0f);
  MoeCache cache;
  const int iters = opt.iters > 0 ? opt.iters : default_iters(s);
  const Backend& be = pick_backend(cpu_features(), parse_precision(opt.precision, "--precision"));
  ExecContext ctx{.n_threads = opt.n_threads, .seed = opt.seed, .training = true, .backend = &be};

  MoeForward out = layer.forward(p, x, y, cache, ctx);
  const int64_t n = cache.plan.n_rows();
  const double flops_fwd = 6.0 * double(n) * double(s.d_model) * double(s.d_ff) +
                           2.0 * double(s.n_tokens) * double(s.d_model) * double(s.n_experts);

  // The ceilings: one dense GEMM over all n rows, same K and N as an expert's first GEMM, by
  // each library; the layer is compared with the best one in the precision it computes in.
  DenseCeilings ceilings;
  {
    ThreadScope threads(opt.n_threads);
    ceilings = measure_dense_ceilings(n, s.d_model, s.d_ff, iters);
  }
  const double dense_rate = ceilings.best(be.precision);

  // Decode reads the experts' weights from DRAM, as in serving: copies of the layer (each with
  // its own router, so each touches about as many experts) are cycled through until the
  // experts they touch exceed twice the last-level cache.
  auto experts_touched = [&] {
    int64_t used = 0;
    for (int64_t e = 0; e < s.n_experts; ++e) used += cache.plan.rows_of(e) > 0;
    return used;
  };
  const int64_t used = experts_touched();
  std::vector<MoeParams> extra;
  if (s.decode && used > 0) {
    const int64_t touched = used * 3 * s.d_model * s.d_ff * int64_t(dtype_size(p.w1.dtype()));
    const int64_t copies = (2 * cpu_features().llc_bytes + touched - 1) / touched;
    for (int64_t i = 1; i < copies; ++i) extra.push_back(make_params(opt.seed + uint64_t(i)));
  }
  size_t turn = 0;
  const double t_fwd = median_seconds(iters, [&] {
    const size_t i = turn++ % (extra.size() + 1);
    layer.forward(i == 0 ? p : extra[i - 1], x, y, cache, ctx);
  });
  nlohmann::json r = {
      {"shape", s.name},
      {"T", s.n_tokens},
      {"d", s.d_model},
      {"f", s.d_ff},
      {"E", s.n_experts},
      {"k", s.top_k},
      {"rows", n},
      {"weights", opt.weights},
      {"kernels", be.name},
      {"cpu", cpu_features().describe()},
      {"ceilings", ceilings.to_json()},
      {"dense_gflops", dense_rate / 1e9},
      {"fwd_ms", t_fwd * 1e3},
      {"fwd_gflops", flops_fwd / t_fwd / 1e9},
      {"fwd_vs_dense", flops_fwd / t_fwd / dense_rate},
      {"dropped_fraction", out.stats.dropped_fraction},
  };

  // Phase shares of one profiled forward (its own run: timers add a little overhead).
  ExecContext prof = ctx;
  prof.profile = true;
  layer.forward(p, x, y, cache, prof);
  const MoeTimes& tm = cache.times;
  const double total = tm.router + tm.plan + tm.gather + tm.experts + tm.combine;
  r["fwd_phase_ms"] = {{"router", tm.router * 1e3},
                       {"plan", tm.plan * 1e3},
                       {"gather", tm.gather * 1e3},
                       {"experts", tm.experts * 1e3},
                       {"combine", tm.combine * 1e3}};
  r["fwd_overhead_share"] = total > 0 ? (total - tm.experts) / total : 0.0;

  if (!bf16_weights) {
    MoeParams g = zeros_like(p);
    Tensor dy({s.n_tokens, s.d_model}, DType::kF32);
    fill_normal(dy.span<float>(), Philox(opt.seed, 103), 1.0f);
    const double t_fb = median_seconds(iters, [&] {
      layer.forward(p, x, y, cache, ctx);
      layer.backward(p, cache, dy, g, dx, ctx);
    });
    r["fwd_bwd_ms"] = t_fb * 1e3;
    r["fwd_bwd_gflops"] = 3 * flops_fwd / t_fb / 1e9;
    r["fwd_bwd_vs_dense"] = 3 * flops_fwd / t_fb / dense_rate;
  }

  if (s.decode) {
    // Experts touched per forward, averaged over the copies cycled through.
    double mean_used = 0;
    for (size_t i = 0; i <= extra.size(); ++i) {
      layer.forward(i == 0 ? p : extra[i - 1], x, y, cache, ctx);
      mean_used += double(experts_touched());
    }
    mean_used /= double(extra.size() + 1);
    const double bytes =
        mean_used * 3.0 * double(s.d_model * s.d_ff) * double(dtype_size(p.w1.dtype()));
    r["experts_touched"] = mean_used;
    r["layer_copies"] = int64_t(extra.size() + 1);
    r["llc_mib"] = cpu_features().llc_bytes >> 20;
    r["weight_gbps"] = bytes / t_fwd / 1e9;
    r["copy_gbps"] = copy_bw / 1e9;
    r["weight_bw_vs_copy"] = bytes / t_fwd / copy_bw;
  }
  return r;
}

// The CUDA layer on device-resident inputs (bf16, f32 accumulation); ceiling: a dense cuBLAS
// bf16 GEMM [T*k, d] x [d, f] timed in the same run.
nlohmann::json bench_shape_cuda(const MoeShape& s, const BenchMoeOptions& opt) {
  MoeConfig cfg{.d_model = s.d_model, .d_ff = s.d_ff, .n_experts = s.n_experts, .top_k = s.top_k};
  cfg.dropless = opt.capacity_factor <= 0;
  if (!cfg.dropless) cfg.capacity_factor_train = cfg.capacity_factor_eval = opt.capacity_factor;
  CudaMoeLayer layer(cfg);
  layer.set_params(init_moe_params(cfg, DType::kF32, opt.seed));
  const int iters = opt.iters > 0 ? opt.iters : 20;
  const CudaMoeLayer::Timing t = layer.time_on_device(s.n_tokens, iters, opt.seed);
  const double flops_fwd = 6.0 * double(t.rows) * double(s.d_model) * double(s.d_ff) +
                           2.0 * double(s.n_tokens) * double(s.d_model) * double(s.n_experts);
  const double dense_rate =
      2.0 * double(s.n_tokens * s.top_k) * double(s.d_model) * double(s.d_ff) / (t.dense_ms / 1e3);
  nlohmann::json phases = nlohmann::json::array();  // in order: [name, ms]
  for (const auto& [name, ms] : t.phases) phases.push_back({name, ms});
  return {{"shape", s.name},
          {"device", "cuda"},
          {"phase_ms", phases},
          {"T", s.n_tokens},
          {"d", s.d_model},
          {"f", s.d_ff},
          {"E", s.n_experts},
          {"k", s.top_k},
          {"rows", t.rows},
          {"weights", "bf16"},
          {"dense_gflops", dense_rate / 1e9},
          {"fwd_ms", t.fwd_ms},
          {"fwd_gflops", flops_fwd / (t.fwd_ms / 1e3) / 1e9},
          {"fwd_vs_dense", flops_fwd / (t.fwd_ms / 1e3) / dense_rate},
          {"fwd_bwd_ms", t.fwd_bwd_ms},
          {"fwd_bwd_gflops", 3 * flops_fwd / (t.fwd_bwd_ms / 1e3) / 1e9},
          {"fwd_bwd_vs_dense", 3 * flops_fwd / (t.fwd_bwd_ms / 1e3) / dense_rate}};
}

void print_row(const nlohmann::json& r) {
  std::string line = fmt::format(
      "{:<4} T={:<5} d={:<5} f={:<5} E={:<3} k={}  fwd {:8.2f} ms {:7.1f} GF/s ({:.2f} of dense "
      "{:.1f})",
      r["shape"].get<std::string>(), r["T"].get<int64_t>(), r["d"].get<int64_t>(),
      r["f"].get<int64_t>(), r["E"].get<int64_t>(), r["k"].get<int64_t>(),
      r["fwd_ms"].get<double>(), r["fwd_gflops"].get<double>(), r["fwd_vs_dense"].get<double>(),
      r["dense_gflops"].get<double>());
  if (r.contains("fwd_bwd_ms"))
    line += fmt::format("  fwd+bwd {:8.2f} ms {:7.1f} GF/s ({:.2f})", r["fwd_bwd_ms"].get<double>(),
                        r["fwd_bwd_gflops"].get<double>(), r["fwd_bwd_vs_dense"].get<double>());
  if (r.contains("ceilings")) {
    const auto& c = r["ceilings"];
    line += fmt::format(
        "\n     ceilings GF/s: oneDNN f32 {:.1f}, oneDNN bf16 {:.1f}, OpenBLAS f32 {:.1f} ({})",
        c["onednn_f32_gflops"].get<double>(), c["onednn_bf16_gflops"].get<double>(),
        c["openblas_f32_gflops"].get<double>(), c["openblas_core"].get<std::string>());
  }
  if (r.contains("fwd_overhead_share"))
    line += fmt::format("  non-expert {:.1f}%", 100 * r["fwd_overhead_share"].get<double>());
  if (r.contains("weight_gbps"))
    line +=
        fmt::format("  weights {:.1f} GB/s ({:.2f} of copy {:.1f})", r["weight_gbps"].get<double>(),
                    r["weight_bw_vs_copy"].get<double>(), r["copy_gbps"].get<double>());
  if (r.contains("phase_ms")) {
    line += "\n     phases (ms):";
    for (const auto& phase : r["phase_ms"])
      line += fmt::format(" {} {:.3f};", phase[0].get<std::string>(), phase[1].get<double>());
  }
  std::puts(line.c_str());
  std::fflush(stdout);
}

}  // namespace

int run_bench_moe(const BenchMoeOptions& opt) {
  if (opt.device != "cpu" && opt.device != "cuda")
    throw ConfigError(fmt::format("--device {}: expected cpu or cuda", opt.device));
  const bool cuda = opt.device == "cuda";
  std::vector<MoeShape> chosen;
  for (const MoeShape& s : moe_bench_shapes())
    if (opt.shapes.empty() ? (cuda || !s.gpu_only)
                           : std::count(opt.shapes.begin(), opt.shapes.end(), s.name) > 0)
      chosen.push_back(s);
  for (const std::string& name : opt.shapes)
    if (std::none_of(chosen.begin(), chosen.end(),
                     [&](const MoeShape& s) { return s.name == name; }))
      throw ConfigError(fmt::format("--shape {}: expected one of A, B, C1, C16, M, X", name));
  for (const MoeShape& s : chosen)
    if (s.gpu_only && !cuda)
      throw ConfigError(fmt::format("--shape {}: a GPU-only shape; add --device cuda", s.name));
  if (cuda) {
    if (!cuda_available())
      throw Error("--device cuda: no usable CUDA device (or a build without -DSY_WITH_CUDA=ON)");
    fmt::print("switchyard bench moe --device cuda: bf16, f32 accumulation, {}\n",
               opt.capacity_factor > 0 ? fmt::format("capacity factor {}", opt.capacity_factor)
                                       : std::string("dropless"));
  }
  if (opt.weights != "f32" && opt.weights != "bf16")
    throw ConfigError(fmt::format("--weights {}: expected f32 or bf16", opt.weights));

  double copy_bw = 0;
  if (!cuda &&
      std::any_of(chosen.begin(), chosen.end(), [](const MoeShape& s) { return s.decode; })) {
    ThreadScope threads(opt.n_threads);
    copy_bw = copy_bandwidth(10);
  }
  if (!cuda) {
    fmt::print("switchyard bench moe: {} threads, expert weights {}, {}\n",
               opt.n_threads > 0 ? opt.n_threads : max_threads(), opt.weights,
               opt.capacity_factor > 0 ? fmt::format("capacity factor {}", opt.capacity_factor)
                                       : std::string("dropless"));
    fmt::print("{}\n", describe_kernels(parse_precision(opt.precision, "--precision")));
  }
  nlohmann::json all = nlohmann::json::array();
  for (const MoeShape& s : chosen) {
    nlohmann::json r = cuda ? bench_shape_cuda(s, opt) : bench_shape(s, opt, copy_bw);
    print_row(r);
    all.push_back(r);
  }
  write_json_output(all.dump(2) + "\n", opt.json_path);
  return 0;
}

void write_json_output(const std::string& text, const std::string& path) {
  if (path.empty()) return;
  if (path == "-")
    std::fputs(text.c_str(), stdout);
  else
    write_file_atomic(path, text);
}

}  // namespace sy::cli
