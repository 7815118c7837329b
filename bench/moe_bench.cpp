// Google Benchmark view of the MoE layer on the shapes of `switchyard bench moe` (A, B, C1,
// C16), plus the dense sgemm of the same active FLOPs as the ceiling, so one run gives both.
// Counters: FLOP/s of active FLOPs (forward: 6 n d f + 2 T d E; forward+backward: 3x).
// decode_<config>/B: one decode step of the language model for B sequences (one new token
// each, 64 positions cached), the serving engine's inner loop, on the auto-precision kernels.
//   ./build/bench/moe_bench --benchmark_filter='A|dense_A'
//   ./build/bench/moe_bench --benchmark_filter=decode
// prefill_<config>/P: one sequence's P-token prompt in one decode_batch call.
#include <benchmark/benchmark.h>

#include "cli/bench_moe.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/moe/moe_layer.h"
#include "switchyard/nn/model.h"
#include "switchyard/serve/engine.h"
#include "switchyard/train/run_config.h"

namespace {

using namespace sy;

struct Setup {
  MoeConfig cfg;
  MoeParams p, g;
  Tensor x, y, dy, dx;
  MoeCache cache;
  double flops_fwd = 0;

  explicit Setup(const cli::MoeShape& s)
      : cfg{.d_model = s.d_model,
            .d_ff = s.d_ff,
            .n_experts = s.n_experts,
            .top_k = s.top_k,
            .dropless = true},
        p(init_moe_params(cfg, DType::kF32, 1)),
        g(zeros_like(p)),
        x({s.n_tokens, s.d_model}, DType::kF32),
        dy({s.n_tokens, s.d_model}, DType::kF32) {
    fill_normal(x.span<float>(), Philox(1, 100), 1.0f);
    fill_normal(dy.span<float>(), Philox(1, 103), 1.0f);
    flops_fwd = 6.0 * double(s.n_tokens * s.top_k) * double(s.d_model * s.d_ff) +
                2.0 * double(s.n_tokens * s.d_model * s.n_experts);
  }
};

void forward(benchmark::State& state, const cli::MoeShape& s) {
  Setup u(s);
  MoeLayer layer(u.cfg);
  for (auto _ : state) layer.forward(u.p, u.x, u.y, u.cache, {});
  state.counters["FLOP/s"] =
      benchmark::Counter(u.flops_fwd, benchmark::Counter::kIsIterationInvariantRate);
}

void forward_backward(benchmark::State& state, const cli::MoeShape& s) {
  Setup u(s);
  MoeLayer layer(u.cfg);
  for (auto _ : state) {
    layer.forward(u.p, u.x, u.y, u.cache, {});
    layer.backward(u.p, u.cache, u.dy, u.g, u.dx, {});
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(3 * u.flops_fwd, benchmark::Counter::kIsIterationInvariantRate);
}

// The ceiling: sgemm [T*k, d] x [d, f], one plain multi-threaded BLAS call.
void dense(benchmark::State& state, const cli::MoeShape& s) {
  const int64_t M = s.n_tokens * s.top_k;
  Tensor a({M, s.d_model}, DType::kF32), b({s.d_model, s.d_ff}, DType::kF32),
      c({M, s.d_ff}, DType::kF32);
  fill_normal(a.span<float>(), Philox(1, 101), 1.0f);
  fill_normal(b.span<float>(), Philox(1, 102), 1.0f);
  for (auto _ : state) cpu::blas_sgemm(a.matrix<float>(), b.matrix<float>(), c.matrix<float>());
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(M * s.d_model * s.d_ff),
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// A built-in config's model as switchyard serve runs it: dropless, random weights, one thread,
// the auto-precision kernels (bf16 experts on a bf16 backend), freed memory kept.
struct ServeSetup {
  LmConfig cfg;
  LanguageModel model;
  ExecContext ctx;
  LmParams params;
  explicit ServeSetup(const std::string& config)
      : cfg([&] {
          keep_freed_memory_for_reuse();
          LmConfig c = load_run_config(config, {}).model;
          c.moe.dropless = true;
          return c;
        }()),
        model(cfg) {
    ctx.n_threads = 1;
    ctx.backend = &pick_backend(cpu_features(), Precision::kAuto);
    params = init_lm_params(cfg, DType::kF32, 1);
    if (decodes_with_bf16_experts(ctx.backend)) params = bf16_expert_params(params);
  }
};

// B sequences decode one token each after a 64-byte prompt; the caches are rolled back to 64
// positions after every step so each step sees the same context length.
void decode(benchmark::State& state, const std::string& config) {
  const ServeSetup u(config);
  const LanguageModel& model = u.model;
  const LmParams& params = u.params;
  const ExecContext& ctx = u.ctx;
  const int64_t B = state.range(0), prompt_len = 64;
  std::vector<DecodeState> states(static_cast<size_t>(B));
  std::vector<DecodeState*> ptrs;
  std::vector<int32_t> prompt(static_cast<size_t>(prompt_len)), fed(static_cast<size_t>(B));
  for (int64_t i = 0; i < prompt_len; ++i) prompt[size_t(i)] = int32_t('a' + i % 26);
  std::vector<std::span<const int32_t>> tokens;
  for (int64_t s = 0; s < B; ++s) {
    ptrs.push_back(&states[size_t(s)]);
    tokens.emplace_back(prompt);
  }
  Tensor logits;
  model.decode_batch(params, tokens, ptrs, logits, ctx);
  for (int64_t s = 0; s < B; ++s) {
    fed[size_t(s)] = int32_t('a' + s % 26);
    tokens[size_t(s)] = std::span<const int32_t>(&fed[size_t(s)], 1);
  }
  for (auto _ : state) {
    model.decode_batch(params, tokens, ptrs, logits, ctx);
    for (DecodeState* st : ptrs)
      for (KvCache& kv : st->kv) kv.n_pos = prompt_len;
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(B), benchmark::Counter::kIsIterationInvariantRate);
}

// One sequence's prompt of P tokens in one call (the step that decides time to first token).
void prefill(benchmark::State& state, const std::string& config) {
  const ServeSetup u(config);
  const LanguageModel& model = u.model;
  const LmParams& params = u.params;
  const ExecContext& ctx = u.ctx;
  std::vector<int32_t> prompt(static_cast<size_t>(state.range(0)));
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t('a' + i % 26);
  const std::span<const int32_t> tokens[1] = {prompt};
  DecodeState st;
  DecodeState* const states[1] = {&st};
  Tensor logits;
  for (auto _ : state) {
    model.decode_batch(params, tokens, states, logits, ctx);
    for (KvCache& kv : st.kv) kv.n_pos = 0;
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(state.range(0)), benchmark::Counter::kIsIterationInvariantRate);
}

const bool registered = [] {
  benchmark::RegisterBenchmark("prefill_austen-moe", prefill, "austen-moe")
      ->Arg(32)
      ->Arg(64)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinWarmUpTime(0.3);
  for (const std::string config : {"austen-moe", "austen-dense"})
    benchmark::RegisterBenchmark(("decode_" + config).c_str(), decode, config)
        ->Arg(1)
        ->Arg(8)
        ->Arg(32)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinWarmUpTime(0.3);
  for (const cli::MoeShape& s : cli::moe_bench_shapes()) {
    benchmark::RegisterBenchmark(("dense_" + s.name).c_str(), dense, s)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinWarmUpTime(0.5);
    benchmark::RegisterBenchmark(("moe_fwd_" + s.name).c_str(), forward, s)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinWarmUpTime(0.5);
    benchmark::RegisterBenchmark(("moe_fwd_bwd_" + s.name).c_str(), forward_backward, s)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinWarmUpTime(0.5);
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
