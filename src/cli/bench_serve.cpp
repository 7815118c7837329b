// `switchyard bench serve`: see bench_serve.h.
#include "cli/bench_serve.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/bench_moe.h"
#include "switchyard/core/rng.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/serve/engine.h"
#include "switchyard/serve/server.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/parallel.h"
#include "switchyard/train/run_config.h"

namespace sy::cli {

namespace {

using nlohmann::json;

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(q * double(v.size() - 1) + 0.5));
  return v[i];
}

// What one N measured.
struct Point {
  int64_t clients = 0;
  bool batching = true;
  int64_t requests = 0, failed = 0, tokens = 0;
  double seconds = 0;
  std::vector<double> ttft, itl;
  double mean_batch = 0, experts_touched = 0, experts_expected = 0, decode_step_s = 0;
  double model_step_s = 0;  // the model alone at batch `clients` (no server)
  double req_per_s() const { return double(requests) / seconds; }
  double tokens_per_s() const { return double(tokens) / seconds; }
};

// One streamed completion from the server at port: appends its first-token time and its
// per-token gaps (an event of c tokens after a gap g counts c gaps of g / c). Returns the
// tokens received, or -1 for a failed request.
int64_t stream_one(int port, const std::string& body, std::vector<double>& ttft,
                   std::vector<double>& itl) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(300, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = body;
  std::string buf;
  int64_t got = 0;
  const double sent = wall_seconds();
  double last = sent;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    buf.append(data, n);
    for (size_t end; (end = buf.find("\n\n")) != std::string::npos; buf.erase(0, end + 2)) {
      if (buf.compare(0, 6, "data: ") != 0 || buf.compare(6, 6, "[DONE]") == 0) continue;
      const json e = json::parse(buf.substr(6, end - 6), nullptr, false);
      if (!e.is_object() || !e.contains("switchyard")) continue;
      const int64_t c = int64_t(e["switchyard"]["tokens"].size());
      if (c == 0) continue;
      const double now = wall_seconds();
      if (got == 0) {
        ttft.push_back(now - sent);
        for (int64_t i = 1; i < c; ++i) itl.push_back(0);
      } else {
        for (int64_t i = 0; i < c; ++i) itl.push_back((now - last) / double(c));
      }
      got += c;
      last = now;
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  if (!cli.send(req, res, err) || res.status != 200) {
    static std::once_flag said;
    std::call_once(said, [&] {
      fmt::print(stderr, "bench serve: a request failed: {} (HTTP {}) {}\n",
                 httplib::to_string(err), res.status, res.body.substr(0, 200));
    });
    return -1;
  }
  return got;
}

Point run_point(const LmConfig& cfg, const LmParams& params, const EngineOptions& base,
                int64_t clients, bool batching, const BenchServeOptions& opt) {
  EngineOptions eo = base;
  eo.max_batch = batching ? std::max<int64_t>(clients, 1) : 1;
  eo.max_waiting = clients + 8;
  eo.step_tokens = std::max(eo.step_tokens, eo.max_batch);
  Engine engine(cfg, params, eo);
  ServerOptions so;
  so.port = 0;
  so.model_name = "bench";
  so.request_timeout_s = 0;
  Server server(engine, so);
  std::thread listener([&] { server.run(); });

  Point p;
  p.clients = clients;
  p.batching = batching;
  std::mutex mutex;
  const double t0 = wall_seconds();
  std::vector<std::thread> threads;
  for (int64_t c = 0; c < clients; ++c)
    threads.emplace_back([&, c] {
      std::vector<double> ttft, itl;
      int64_t done = 0, failed = 0, tokens = 0;
      for (int64_t r = 0; r < opt.requests && wall_seconds() - t0 < opt.max_seconds; ++r) {
        const Philox rng{uint64_t(c), uint64_t(r)};
        std::string prompt;
        for (int64_t i = 0; i < opt.prompt_bytes; ++i)
          prompt.push_back(char('a' + rng.bits(uint64_t(i))[0] % 26));
        const json body = {{"prompt", prompt},   {"max_tokens", opt.max_tokens},
                           {"temperature", 1.0}, {"seed", c * 1000 + r},
                           {"stream", true},     {"switchyard_experts", true}};
        const int64_t got = stream_one(server.port(), body.dump(), ttft, itl);
        if (got < 0)
          ++failed;
        else
          ++done, tokens += got;
      }
      std::lock_guard lock(mutex);
      p.requests += done, p.failed += failed, p.tokens += tokens;
      p.ttft.insert(p.ttft.end(), ttft.begin(), ttft.end());
      p.itl.insert(p.itl.end(), itl.begin(), itl.end());
    });
  for (std::thread& t : threads) t.join();
  p.seconds = wall_seconds() - t0;
  const EngineMetrics m = engine.metrics();
  server.stop();
  listener.join();
  if (m.steps > 0) {
    p.mean_batch = double(m.step_sequences) / double(m.steps);
    p.experts_touched = m.experts_touched_sum / double(m.steps);
  }
  const double E = double(cfg.moe.n_experts), k = double(cfg.moe.top_k);
  p.experts_expected = cfg.n_moe_layers() > 0 ? E * (1 - std::pow(1 - k / E, p.mean_batch)) : 0;
  p.decode_step_s = m.decode_steps > 0 ? m.decode_step_seconds / double(m.decode_steps) : 0;
  return p;
}

// The model alone, no server: seconds of one decode step of B sequences (one token each,
// after a prompt of prompt_bytes), median of a few steps.
double model_step_seconds(const LmConfig& cfg, const LmParams& params, const EngineOptions& eo,
                          int64_t B, int64_t prompt_bytes) {
  LmConfig c = cfg;
  c.moe.dropless = true;
  const LanguageModel model(c);
  ExecContext ctx;
  ctx.n_threads = eo.n_threads;
  ctx.backend = eo.backend;
  ctx.training = false;
  std::vector<DecodeState> states(static_cast<size_t>(B));
  std::vector<DecodeState*> ptrs;
  std::vector<int32_t> prompt(size_t(prompt_bytes), 'a'), fed(static_cast<size_t>(B));
  std::vector<std::span<const int32_t>> tokens;
  for (int64_t s = 0; s < B; ++s) {
    states[s] = model.start(DType::kF32);
    ptrs.push_back(&states[s]);
    tokens.emplace_back(prompt);
  }
  Tensor logits;
  model.decode_batch(params, tokens, ptrs, logits, ctx);
  std::vector<double> t;
  for (int i = 0; i < 9 && states[0].n_pos() < cfg.context; ++i) {
    for (int64_t s = 0; s < B; ++s) {
      fed[s] = int32_t('a' + (s + i) % 26);
      tokens[s] = std::span<const int32_t>(&fed[s], 1);
    }
    const double t0 = wall_seconds();
    model.decode_batch(params, tokens, ptrs, logits, ctx);
    t.push_back(wall_seconds() - t0);
  }
  return percentile(t, 0.5);
}

// Bytes of weights one batch-1 decode step reads: every matrix once, an embedding row, and of
// each MoE layer's experts the k chosen (dense and shared experts whole).
double decode_weight_bytes(const LmConfig& cfg, const LmParams& p) {
  double bytes = 0;
  for (const auto& [name, t] : p.named()) {
    const double b = double(t->nbytes());
    if (name == "embed")
      bytes += b / double(cfg.vocab);
    else if (is_expert_weight(name))
      bytes += b * double(cfg.moe.top_k) / double(cfg.moe.n_experts);
    else
      bytes += b;
  }
  return bytes;
}

std::string svg(const std::vector<Point>& points, const std::string& title) {
  double xmax = 0, ymax = 0;
  for (const Point& p : points) {
    xmax = std::max(xmax, 1e3 * percentile(p.itl, 0.5));
    ymax = std::max(ymax, p.tokens_per_s());
  }
  xmax = xmax * 1.1 + 1e-9, ymax = ymax * 1.1 + 1e-9;
  const double W = 640, H = 420, L = 70, B = 50, R = 20, T = 40;
  auto X = [&](double x) { return L + (W - L - R) * x / xmax; };
  auto Y = [&](double y) { return H - B - (H - B - T) * y / ymax; };
  std::string s = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
      "<text x='{}' y='22' font-size='14'>{}</text>\n"
      "<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n"
      "<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n"
      "<text x='{}' y='{}' text-anchor='middle'>inter-token latency p50 (ms)</text>\n"
      "<text x='16' y='{}' transform='rotate(-90 16 {})' text-anchor='middle'>output "
      "tokens/s</text>\n",
      W, H, L, title, L, H - B, W - R, H - B, L, H - B, L, T, (L + W - R) / 2, H - 12,
      (H - B + T) / 2, (H - B + T) / 2);
  for (int i = 0; i <= 4; ++i) {
    s += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{:.1f}</text>\n", X(xmax * i / 4),
                     H - B + 16, xmax * i / 4);
    s += fmt::format("<text x='{}' y='{}' text-anchor='end'>{:.0f}</text>\n", L - 6,
                     Y(ymax * i / 4) + 4, ymax * i / 4);
  }
  for (const bool batching : {true, false}) {
    const char* colour = batching ? "#1f77b4" : "#d62728";
    std::string line;
    for (const Point& p : points) {
      if (p.batching != batching) continue;
      const double x = X(1e3 * percentile(p.itl, 0.5)), y = Y(p.tokens_per_s());
      line += fmt::format("{:.1f},{:.1f} ", x, y);
      s += fmt::format(
          "<circle cx='{:.1f}' cy='{:.1f}' r='3' fill='{}'/><text x='{:.1f}' "
          "y='{:.1f}' fill='{}'>{}</text>\n",
          x, y, colour, x + 5, y - 5, colour, p.clients);
    }
    s += fmt::format("<polyline points='{}' fill='none' stroke='{}'/>\n", line, colour);
    s += fmt::format("<text x='{}' y='{}' fill='{}'>{}</text>\n", W - 220,
                     batching ? T + 10 : T + 26, colour,
                     batching ? "continuous batching (label: clients)" : "batching off");
  }
  return s + "</svg>\n";
}

}  // namespace

int run_bench_serve(const BenchServeOptions& opt) {
  keep_freed_memory_for_reuse();  // as switchyard serve does
  LmConfig cfg;
  LmParams params;
  std::string what;
  if (!opt.checkpoint.empty()) {
    const std::string path = find_checkpoint(opt.checkpoint);
    Checkpoint ck = load_checkpoint(path, /*with_optimizer=*/false);
    cfg = ck.cfg.model;
    params = std::move(ck.params);
    what = path;
  } else {
    const RunConfig run = load_run_config(opt.config, {});
    cfg = run.model;
    params = init_lm_params(cfg, DType::kF32, 1);
    what = run.name + " (random weights)";
  }
  if (opt.requests < 1 || opt.max_tokens < 1 || opt.prompt_bytes < 1 ||
      opt.prompt_bytes + opt.max_tokens > cfg.context)
    throw ConfigError(
        fmt::format("bench serve: --requests {}, --max-tokens {}, --prompt-bytes "
                    "{}: expected >= 1 each, prompt + tokens within the context "
                    "({})",
                    opt.requests, opt.max_tokens, opt.prompt_bytes, cfg.context));
  for (int64_t n : opt.clients)
    if (n < 1) throw ConfigError(fmt::format("--clients {}: expected >= 1", n));
  const Precision precision =
      opt.precision.empty() ? cfg.precision : parse_precision(opt.precision, "--precision");
  EngineOptions eo;
  eo.n_threads = opt.threads;
  eo.backend = &pick_backend(cpu_features(), precision);
  const CpuFeatures cpu = cpu_features();
  fmt::print("bench serve: {}, {}; {} requests x {} tokens per client, prompt {} bytes\n", what,
             describe_kernels(precision), opt.requests, opt.max_tokens, opt.prompt_bytes);
  const double copy_bw = copy_bandwidth(5);
  // What a decode step reads: the engine's own copy, with bf16 experts on a bf16 backend.
  const bool bf16 = decodes_with_bf16_experts(eo.backend);
  const LmParams bf16_params = bf16 ? bf16_expert_params(params) : LmParams{};
  const LmParams& decode_p = bf16 ? bf16_params : params;
  const double weight_bytes = decode_weight_bytes(cfg, decode_p);
  const double ceiling_s = weight_bytes / copy_bw;

  std::vector<Point> points;
  fmt::print("{:>8} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>15} {:>9} {:>9}\n",
             "clients", "batching", "req/s", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50",
             "ITL p99", "batch", "experts/step", "step", "alone");
  for (const bool batching :
       opt.batching_off ? std::vector<bool>{true, false} : std::vector<bool>{true})
    for (int64_t n : opt.clients) {
      Point p = run_point(cfg, params, eo, n, batching, opt);
      if (batching) p.model_step_s = model_step_seconds(cfg, decode_p, eo, n, opt.prompt_bytes);
      fmt::print(
          "{:>8} {:>9} {:>9.2f} {:>10.1f} {:>7.1f}ms {:>7.1f}ms {:>7.2f}ms {:>7.2f}ms "
          "{:>7.2f} {:>7.2f} ({:.2f}) {:>7.2f}ms {:>7.2f}ms{}\n",
          n, batching ? "on" : "off", p.req_per_s(), p.tokens_per_s(),
          1e3 * percentile(p.ttft, 0.5), 1e3 * percentile(p.ttft, 0.99),
          1e3 * percentile(p.itl, 0.5), 1e3 * percentile(p.itl, 0.99), p.mean_batch,
          p.experts_touched, p.experts_expected, 1e3 * p.decode_step_s, 1e3 * p.model_step_s,
          p.failed > 0 ? fmt::format("  {} failed", p.failed) : std::string());
      points.push_back(p);
    }
  const Point* one = nullptr;
  for (const Point& p : points)
    if (p.batching && p.clients == 1) one = &p;
  fmt::print(
      "experts/step: distinct experts a step's rows chose, mean over MoE layers, and in "
      "brackets E(1 - (1 - k/E)^B) at the mean batch B; step: the engine's mean decode "
      "step (model time, no prompt rows); alone: the model's decode step at batch = clients "
      "without the server (what batching can buy at most)\n");
  fmt::print(
      "batch-1 decode step: {} KiB of weights read; copy bandwidth {:.1f} GB/s (read + "
      "written): ceiling {:.3f} ms{}\n",
      weight_bytes / 1024, copy_bw / 1e9, 1e3 * ceiling_s,
      one != nullptr ? fmt::format("; measured {:.3f} ms per decode step in the engine "
                                   "({:.2f}x the ceiling)",
                                   1e3 * one->decode_step_s, one->decode_step_s / ceiling_s)
                     : std::string());
  if (!opt.svg_path.empty()) {
    std::ofstream(opt.svg_path) << svg(points, fmt::format("{} on {}", what, cpu.describe()));
    fmt::print("wrote {}\n", opt.svg_path);
  }
  if (!opt.json_path.empty()) {
    json j = {{"model", what},
              {"cpu", cpu.describe()},
              {"kernels", describe_kernels(precision)},
              {"copy_bandwidth_bytes_per_s", copy_bw},
              {"decode_weight_bytes", weight_bytes},
              {"decode_ceiling_s", ceiling_s},
              {"points", json::array()}};
    for (const Point& p : points)
      j["points"].push_back({{"clients", p.clients},
                             {"batching", p.batching},
                             {"requests", p.requests},
                             {"failed", p.failed},
                             {"tokens_per_s", p.tokens_per_s()},
                             {"requests_per_s", p.req_per_s()},
                             {"ttft_p50_s", percentile(p.ttft, 0.5)},
                             {"ttft_p99_s", percentile(p.ttft, 0.99)},
                             {"itl_p50_s", percentile(p.itl, 0.5)},
                             {"itl_p99_s", percentile(p.itl, 0.99)},
                             {"mean_batch", p.mean_batch},
                             {"experts_touched", p.experts_touched},
                             {"experts_expected", p.experts_expected},
                             {"decode_step_s", p.decode_step_s},
                             {"model_step_s", p.model_step_s}});
    write_json_output(j.dump(2) + "\n", opt.json_path);
  }
  return 0;
}

}  // namespace sy::cli
