#include "cli/bench_model.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/bench_moe.h"
#include "cli/lm_commands.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/nn/decoder.h"

namespace sy::cli {

namespace {

// The process's peak resident bytes (VmHWM: of this program's memory since exec, unlike
// getrusage's ru_maxrss, which Linux carries over from the parent across execve).
int64_t peak_resident_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.starts_with("VmHWM:")) return std::stoll(line.substr(6)) * 1024;  // kB
  return 0;
}

// Multiply-adds of attention scores and values for a prompt of L tokens, every layer, as
// computed (causal, windowed).
double attention_macs(const DecoderConfig& c, int64_t L) {
  double macs = 0;
  for (int64_t l = 0; l < c.n_layers; ++l)
    for (int64_t p = 0; p < L; ++p) {
      const int64_t keys = c.window[l] > 0 ? std::min(p + 1, c.window[l]) : p + 1;
      macs += double(c.n_heads) * double(c.head_dim + c.v_head_dim) * double(keys);
    }
  return macs;
}

// Bytes of each MoE layer's stacked experts (w1, w3, w2), 0 for dense layers.
std::vector<int64_t> expert_bytes(const DecoderParams& p) {
  std::vector<int64_t> b;
  for (const DecoderLayerParams& l : p.layers)
    b.push_back(int64_t(l.moe.w1.nbytes() + l.moe.w3.nbytes() + l.moe.w2.nbytes()));
  return b;
}

// The phases of the last profiled forward, printed (in `unit`s of seconds) and as JSON.
nlohmann::json phases(const DecoderTimes& t, double unit) {
  const char* name = unit == 1.0 ? "s" : "ms";
  fmt::print("  phases ({}): qkv {:.3f}, attention {:.3f}, out proj {:.3f}, MoE {:.3f} (router "
             "{:.3f}, plan {:.3f}, gather {:.3f}, experts {:.3f}, combine {:.3f}), dense ffn "
             "{:.3f}, shared {:.3f}, lm head {:.3f}\n",
             name, t.qkv / unit, t.attend / unit, t.out_proj / unit, t.moe_total / unit,
             t.moe.router / unit, t.moe.plan / unit, t.moe.gather / unit, t.moe.experts / unit,
             t.moe.combine / unit, t.dense_ffn / unit, t.shared / unit, t.lm_head / unit);
  return {{"qkv", t.qkv},           {"attention", t.attend},      {"out_proj", t.out_proj},
          {"moe", t.moe_total},     {"moe_router", t.moe.router}, {"moe_gather", t.moe.gather},
          {"moe_experts", t.moe.experts}, {"moe_combine", t.moe.combine},
          {"dense_ffn", t.dense_ffn}, {"shared", t.shared},       {"lm_head", t.lm_head}};
}

int32_t argmax(const float* x, int64_t n) { return int32_t(std::max_element(x, x + n) - x); }

}  // namespace

int run_bench_model(const BenchModelOptions& opt) {
  if (opt.model.empty()) throw ConfigError("bench model: --model DIR is required");
  for (int64_t L : opt.prefill)
    if (L < 1) throw ConfigError(fmt::format("--prefill {}: expected >= 1 tokens", L));
  for (int64_t B : opt.batch)
    if (B < 1) throw ConfigError(fmt::format("--batch {}: expected >= 1 sequences", B));
  if (opt.steps < 1 || opt.context < 1 || opt.iters < 1)
    throw ConfigError(fmt::format("--steps {} --context {} --iters {}: expected >= 1 each",
                                  opt.steps, opt.context, opt.iters));
  const Precision precision = parse_precision(opt.precision, "--precision");

  const int64_t rss0 = peak_resident_bytes();
  const double l0 = wall_seconds();
  const HfModel m = load_hf_model(opt.model);
  const double load_s = wall_seconds() - l0;
  const int64_t rss = peak_resident_bytes();
  const DecoderConfig& c = m.config;
  for (int64_t L : opt.prefill)
    if (L > c.max_context)
      throw ConfigError(fmt::format("--prefill {}: past the model's context of {} tokens", L,
                                    c.max_context));
  if (opt.context + opt.steps + 1 > c.max_context)
    throw ConfigError(fmt::format("--context {} + --steps {}: past the model's context of {}",
                                  opt.context, opt.steps, c.max_context));
  const int64_t weights = m.params.bytes();

  ThreadScope threads(opt.n_threads);
  ExecContext ctx;
  ctx.n_threads = opt.n_threads;
  ctx.training = false;
  const Backend& be = pick_backend(cpu_features(), precision);
  ctx.backend = &be;
  const DecoderModel model(c);

  // The held-out text as the model's tokenizer cuts it, repeated as needed (bytes mod vocab
  // without one).
  HeldOutText held = held_out_text(m, opt.text);
  std::vector<int32_t>& ids = held.ids;
  if (!m.tokenizer)
    for (unsigned char ch : held.text) ids.push_back(int32_t(ch % c.vocab));
  if (ids.empty()) throw IoError(fmt::format("{}: no tokens to benchmark with", held.path));
  const int64_t need = std::max(*std::max_element(opt.prefill.begin(), opt.prefill.end()),
                                opt.context * *std::max_element(opt.batch.begin(), opt.batch.end()));
  for (size_t i = 0; int64_t(ids.size()) < need; ++i) ids.push_back(ids[i]);

  fmt::print("bench model: {} ({}), {} layers ({} MoE), {:.2f} GB of {} weights, tokenizer {}\n",
             m.dir, m.model_type, c.n_layers, c.n_moe_layers(), double(weights) / 1e9,
             m.weights_dtype, m.tokenizer ? m.tokenizer->kind() : std::string("none"));
  fmt::print("{}; {} threads\n", describe_kernels(precision), max_threads());
  fmt::print("load {:.2f} s; peak resident after load {:.2f} GB = {:.3f} x the weights (grew by "
             "{:.2f} GB from {:.2f} GB before loading)\n",
             load_s, double(rss) / 1e9, double(rss) / double(weights), double(rss - rss0) / 1e9,
             double(rss0) / 1e9);

  const double copy_bw = copy_bandwidth(5);
  const DenseCeilings dense = measure_dense_ceilings(2048, 2048, 2048, 3);
  const double dense_rate = dense.best(be.precision);
  fmt::print("copy bandwidth {:.1f} GB/s (read + write); dense 2048^3 {} {:.1f} GFLOP/s\n",
             copy_bw / 1e9, precision_name(be.precision), dense_rate / 1e9);

  nlohmann::json j = {{"model", m.dir},
                      {"model_type", m.model_type},
                      {"layers", c.n_layers},
                      {"weights_bytes", weights},
                      {"weights_dtype", m.weights_dtype},
                      {"load_s", load_s},
                      {"peak_resident_bytes", rss},
                      {"resident_before_load_bytes", rss0},
                      {"resident_over_weights", double(rss) / double(weights)},
                      {"kernels", be.name},
                      {"cpu", cpu_features().describe()},
                      {"threads", max_threads()},
                      {"copy_bytes_per_s", copy_bw},
                      {"dense_flops_per_s", dense_rate}};

  Tensor logits;
  {  // Untimed: the first call's allocations, page faults and oneDNN primitives.
    DecoderState s = model.start();
    model.forward(m.params, std::span(ids).first(std::min<size_t>(ids.size(), 64)), s, logits, ctx,
                  /*all_positions=*/false);
  }
  // FLOPs of a prompt's position: every weight but the embedding and the LM head (computed for
  // the last position only), with each MoE layer's k experts.
  const double per_token = 2.0 * double(c.active_params() - c.d_model * c.vocab);
  for (int64_t L : opt.prefill) {
    double best = 1e30;
    for (int it = 0; it < opt.iters; ++it) {
      DecoderState s = model.start();
      const double t0 = wall_seconds();
      model.forward(m.params, std::span(ids).first(size_t(L)), s, logits, ctx, false);
      best = std::min(best, wall_seconds() - t0);
    }
    const double flops =
        per_token * double(L) + 2.0 * attention_macs(c, L) + 2.0 * double(c.d_model * c.vocab);
    fmt::print("prefill {:5d} tokens: {:8.3f} s, {:8.1f} tokens/s, {:7.1f} GFLOP/s = {:.2f} of "
               "dense\n",
               L, best, double(L) / best, flops / best / 1e9, flops / best / dense_rate);
    // Once more with the phases timed (profiling adds a clock read per phase and layer).
    ExecContext prof = ctx;
    prof.profile = true;
    DecoderState s = model.start();
    model.forward(m.params, std::span(ids).first(size_t(L)), s, logits, prof, false);
    j["prefill"].push_back({{"tokens", L},
                            {"seconds", best},
                            {"tokens_per_s", double(L) / best},
                            {"flops", flops},
                            {"vs_dense", flops / best / dense_rate},
                            {"phases_s", phases(model.last_times(), 1.0)}});
  }

  const std::vector<int64_t> per_layer_experts = expert_bytes(m.params);
  int64_t all_experts = 0;
  for (int64_t b : per_layer_experts) all_experts += b;
  const int64_t fixed = weights - int64_t(m.params.embed.nbytes()) - all_experts;
  for (int64_t B : opt.batch) {
    std::vector<DecoderState> states;
    for (int64_t b = 0; b < B; ++b) {
      states.push_back(model.start());
      model.forward(m.params, std::span(ids).subspan(size_t(b * opt.context), size_t(opt.context)),
                    states.back(), logits, ctx, false);
    }
    std::vector<int32_t> next(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) next[b] = ids[size_t((b + 1) * opt.context) % ids.size()];
    std::vector<DecoderState*> ptrs;
    for (DecoderState& s : states) ptrs.push_back(&s);
    std::vector<std::span<const int32_t>> toks(static_cast<size_t>(B));
    std::vector<double> step_s;
    double bytes = 0;
    for (int64_t step = 0; step < opt.steps; ++step) {
      for (int64_t b = 0; b < B; ++b) toks[b] = std::span(&next[b], 1);
      const double t0 = wall_seconds();
      model.forward_batch(m.params, toks, ptrs, logits, ctx);
      step_s.push_back(wall_seconds() - t0);
      for (int64_t b = 0; b < B; ++b) next[b] = argmax(logits.data<float>() + b * c.vocab, c.vocab);
      // What this step read: the fixed weights, plus the experts its rows chose.
      double step_bytes = double(fixed);
      size_t moe = 0;
      for (int64_t l = 0; l < c.n_layers; ++l) {
        if (!c.moe_layer[l]) continue;
        const RoutingStats& r = model.last_routing()[moe++];
        const int64_t used = std::count_if(r.rows.begin(), r.rows.end(), [](int64_t x) { return x > 0; });
        step_bytes += double(per_layer_experts[l]) * double(used) / double(c.moe.n_experts);
      }
      bytes += step_bytes;
    }
    std::sort(step_s.begin(), step_s.end());
    const double median = step_s[step_s.size() / 2];
    ExecContext prof = ctx;
    prof.profile = true;
    for (int64_t b = 0; b < B; ++b) toks[b] = std::span(&next[b], 1);
    model.forward_batch(m.params, toks, ptrs, logits, prof);
    bytes /= double(opt.steps);
    const double ceiling = double(B) / (bytes / copy_bw);
    fmt::print("decode batch {:3d}: step {:7.2f} ms, {:8.1f} tokens/s; {:.0f} MB read a step, "
               "weight-read ceiling {:.1f} tokens/s: {:.2f} of it\n",
               B, 1e3 * median, double(B) / median, bytes / 1e6, ceiling,
               double(B) / median / ceiling);
    j["decode"].push_back({{"phases_s", phases(model.last_times(), 1e-3)},
                           {"batch", B},
                           {"context", opt.context},
                           {"step_median_s", median},
                           {"tokens_per_s", double(B) / median},
                           {"bytes_per_step", bytes},
                           {"ceiling_tokens_per_s", ceiling},
                           {"vs_ceiling", double(B) / median / ceiling}});
  }
  write_json_output(j.dump(2) + "\n", opt.json_path);
  return 0;
}

}  // namespace sy::cli
