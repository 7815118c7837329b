#include "cli/bench_train.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli/bench_moe.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/trainer.h"

namespace sy::cli {

int run_bench_train(const BenchTrainOptions& opt) {
  if (opt.steps < 1 || opt.warmup < 0)
    throw ConfigError(
        fmt::format("--steps {} --warmup {}: expected >= 1 and >= 0", opt.steps, opt.warmup));
  RunConfig cfg = load_run_config(opt.config);
  if (!opt.precision.empty()) cfg.model.precision = parse_precision(opt.precision, "--precision");
  const LmConfig& m = cfg.model;
  ThreadScope threads(opt.n_threads);
  ExecContext ctx;
  ctx.n_threads = opt.n_threads;
  const Backend& be = pick_backend(cpu_features(), m.precision);
  ctx.backend = &be;
  fmt::print("{}\n", describe_kernels(m.precision));
  const Corpus corpus =
      load_corpus(resolve_data_path(cfg.data.path), cfg.data.val_fraction, m.context);
  const LanguageModel model(m);
  LmParams p = init_lm_params(m, DType::kF32, cfg.train.seed), g = zeros_like(p);
  AdamW adam(cfg.train, p);
  LmCache cache;
  std::vector<double> step_s;
  for (int64_t s = 0; s < opt.warmup + opt.steps; ++s) {
    const Batch b = train_batch(corpus, cfg.train.batch, m.context, cfg.train.seed, s);
    const double t0 = wall_seconds();
    for (auto& [name, t] : g.named()) t->fill_zero();
    model.forward(p, b.tokens, b.targets, b.n_seq, cache, ctx);
    model.backward(p, cache, g, ctx);
    clip_grad_norm(g, cfg.train.grad_clip);
    adam.step(p, g, learning_rate(cfg.train, s));
    if (s >= opt.warmup) step_s.push_back(wall_seconds() - t0);
  }
  std::sort(step_s.begin(), step_s.end());
  const double median = step_s[step_s.size() / 2];
  const double tokens = double(cfg.train.batch * m.context);
  const double flops_per_token = 6.0 * double(m.active_params() + m.attention_macs_per_token());

  // The ceilings: one large multi-threaded GEMM by each library (the machine's dense rates).
  const int64_t n = 2048;
  const DenseCeilings ceilings = measure_dense_ceilings(n, n, n, 5);
  const double f32_rate = ceilings.best(Precision::kF32),
               bf16_rate = ceilings.best(Precision::kBf16);
  const double best_rate = std::max(f32_rate, bf16_rate), own_rate = ceilings.best(be.precision);
  const double tps = tokens / median, rate = tps * flops_per_token;
  fmt::print("{}: {:.2f} M active params/token, {:.1f} MFLOP/token; {} threads\n", cfg.name,
             double(m.active_params()) / 1e6, flops_per_token / 1e6, max_threads());
  fmt::print(
      "step median {:.3f} s (min {:.3f}, max {:.3f}) over {} steps: {:.0f} tokens/s, "
      "{:.1f} GFLOP/s\n",
      median, step_s.front(), step_s.back(), step_s.size(), tps, rate / 1e9);
  fmt::print(
      "dense {}^3 GFLOP/s: oneDNN f32 {:.1f}, oneDNN bf16 {:.1f}, OpenBLAS f32 {:.1f} ({})\n", n,
      ceilings.onednn_f32 / 1e9, ceilings.onednn_bf16 / 1e9, ceilings.openblas_f32 / 1e9,
      ceilings.openblas_core);
  fmt::print(
      "training runs at {:.2f} of the best dense ceiling ({:.1f}), {:.2f} of its own "
      "precision's ({})\n",
      rate / best_rate, best_rate / 1e9, rate / own_rate, precision_name(be.precision));
  if (!opt.json_path.empty()) {
    const nlohmann::json j = {{"config", cfg.name},
                              {"threads", max_threads()},
                              {"tokens_per_step", tokens},
                              {"step_median_s", median},
                              {"tokens_per_s", tps},
                              {"flops_per_token", flops_per_token},
                              {"gflops", rate / 1e9},
                              {"kernels", be.name},
                              {"cpu", cpu_features().describe()},
                              {"ceilings", ceilings.to_json()},
                              {"best_dense_gflops", best_rate / 1e9},
                              {"vs_best_dense", rate / best_rate},
                              {"vs_own_precision_dense", rate / own_rate}};
    write_json_output(j.dump(2) + "\n", opt.json_path);
  }
  return 0;
}

}  // namespace sy::cli
