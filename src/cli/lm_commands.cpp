#include "cli/lm_commands.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "cli/bench_moe.h"
#include "cli/multimodal_commands.h"
#include "cli/vision_commands.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/core/file.h"
#include "switchyard/core/rng.h"
#include "switchyard/io/hf_export.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/serve/engine.h"
#include "switchyard/serve/sampling.h"
#include "switchyard/serve/server.h"
#include "switchyard/train/data.h"
#include "switchyard/train/parallel.h"
#include "switchyard/train/routes.h"
#include "switchyard/train/sweep.h"
#include "switchyard/train/trainer.h"
#include "switchyard/train/multimodal.h"
#include "switchyard/train/vision.h"
#ifdef SY_WITH_MPI
#include "switchyard/dist/comm.h"
#endif

namespace sy::cli {

namespace {

bool mpi_launched() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

}  // namespace

namespace {

std::atomic<bool> g_stop{false};

// First SIGINT (Ctrl-C), SIGTERM (a scheduler, kill) or SIGUSR1: finish the step, write a
// clean checkpoint, exit 0. Under mpirun the request rides in the step's allreduce, so a signal
// to any one rank stops all of them at the same step boundary. SIGUSR1 is there for mpirun:
// OpenMPI forwards it to every rank at once, while its own SIGTERM/SIGINT handling sends the
// ranks SIGTERM only after odls_base_sigkill_timeout seconds and SIGKILL as long again after
// (docs/expert_parallel.md). A second signal ends the process at once (files are still only
// ever renamed into place whole).
void on_stop_signal(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  std::signal(SIGUSR1, SIG_DFL);
}

}  // namespace

StopSignals::StopSignals() {
  g_stop.store(false);
  old_int_ = std::signal(SIGINT, on_stop_signal);
  old_term_ = std::signal(SIGTERM, on_stop_signal);
  old_usr1_ = std::signal(SIGUSR1, on_stop_signal);
}

StopSignals::~StopSignals() {
  std::signal(SIGINT, old_int_);
  std::signal(SIGTERM, old_term_);
  std::signal(SIGUSR1, old_usr1_);
}

const std::atomic<bool>* StopSignals::flag() { return &g_stop; }

namespace {

RunConfig config_for(const std::string& name, std::vector<std::string> overrides, int64_t steps) {
  if (steps > 0) overrides.push_back(fmt::format("train.steps={}", steps));
  return load_run_config(name, overrides);
}

std::string default_out(const std::string& config) {
  return (std::filesystem::path("runs") / std::filesystem::path(config).stem()).string();
}

}  // namespace

namespace {

// Threads for each of the ranks sharing this machine: the cores split evenly.
int threads_per_rank(int asked) {
  if (asked > 0) return asked;
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const int ranks = local != nullptr ? std::max(1, std::atoi(local)) : 1;
  return std::max(1, max_threads() / ranks);
}

int train_with(const TrainCliOptions& o, const ParallelGroup* grid) {
  RunConfig cfg = config_for(o.config, o.overrides, o.steps);
  const bool lead = grid == nullptr || grid->world_rank() == 0;
  TrainOptions opt;
  // Fine-tuning: the model's shape from the directory; on --resume the checkpoint holds the
  // weights, and the same shape makes it this run's.
  std::optional<ImportedLm> imported;
  if (!o.init_from.empty()) {
    imported.emplace(import_hf_lm(o.init_from, cfg.model));
    cfg.model = imported->cfg;
    if (!o.resume) opt.init = &imported->params;
    if (lead)
      fmt::print("{} the model of {}: d {}, {} layers, {} heads, {}\n",
                 o.resume ? "resuming" : "initialised from", o.init_from, cfg.model.d_model,
                 cfg.model.n_layers, cfg.model.n_heads,
                 cfg.model.moe_every > 0
                     ? fmt::format("{} experts of width {}, top-{}", cfg.model.moe.n_experts,
                                   cfg.model.moe.d_ff, cfg.model.moe.top_k)
                     : fmt::format("dense, width {}", cfg.model.d_ff));
  }
  opt.out_dir = o.out.empty() ? default_out(o.config) : o.out;
  opt.resume = o.resume;
  opt.n_threads = grid != nullptr ? threads_per_rank(o.threads) : o.threads;
  opt.stop = &g_stop;
  opt.parallel = grid;
  if (o.exchange != "f32" && o.exchange != "bf16")
    throw ConfigError(fmt::format("--exchange {}: expected f32 or bf16", o.exchange));
  opt.exchange_bf16 = o.exchange == "bf16";
  opt.exchange_overlap = grid != nullptr && overlap_exchange(o.overlap, *grid);
  opt.log = lead ? stdout : nullptr;
  const LmConfig& m = cfg.model;
  if (lead)
    fmt::print("{}: {:.2f} M parameters ({:.2f} M active per token), {} layers ({} MoE), "
               "{} steps of {} x {} tokens, {} threads{} -> {}\n",
               cfg.name, double(m.total_params()) / 1e6, double(m.active_params()) / 1e6,
               m.n_layers, m.n_moe_layers(), cfg.train.steps, cfg.train.batch, m.context,
               opt.n_threads > 0 ? opt.n_threads : max_threads(),
               grid == nullptr ? std::string()
                               : fmt::format(" per rank, {} ranks: {} expert-parallel x {} "
                                             "data-parallel, rows as {}{}",
                                             grid->world_size(), grid->ep_size(), grid->dp_size(),
                                             o.exchange,
                                             opt.exchange_overlap ? ", overlapped" : ""),
               opt.out_dir);
  const TrainResult r = [&] {
    const StopSignals guard;
    return train(cfg, opt);
  }();
  // A clean stop is a success: the checkpoint is whole and --resume continues it.
  if (!lead) return 0;
  if (grid != nullptr)
    print_log(stdout, "all-to-all: {:.1f} ms per step, mean over ranks\n", 1e3 * r.exchange_seconds);
  if (r.interrupted)
    print_log(stdout, "interrupted after step {}: checkpoint {} (continue with --resume)\n", r.steps_done,
               r.checkpoint);
  const std::string val =
      std::isnan(r.final_val_loss)
          ? std::string("no evaluation yet (see train.eval_interval)")
          : fmt::format("val loss {:.4f} ({:.3f} bits per byte)", r.final_val_loss,
                        r.final_val_loss / std::log(2.0));
  print_log(stdout, "done: {} steps, {}, {:.0f} tokens/s, {:.0f} s\ncheckpoint {}\nreport {}\n",
             r.steps_done, val, r.tokens_per_s, r.seconds, r.checkpoint, r.report);
  return 0;
}

}  // namespace

int run_train(const TrainCliOptions& o) {
  if (!o.init_from.empty() && (is_vision_config(o.config) || is_multimodal_config(o.config)))
    throw ConfigError(fmt::format("--init-from with --config {}: a published language model "
                                  "initialises a language model run only",
                                  o.config));
  if (is_vision_config(o.config)) return train_vision_cli(o);
  if (is_multimodal_config(o.config)) return train_multimodal_cli(o);
  if (o.expert_parallel <= 0 && !mpi_launched()) return train_with(o, nullptr);
#ifdef SY_WITH_MPI
  MpiSession mpi(nullptr, nullptr);
  Comm::set_timeout(o.comm_timeout);
  const Comm world = Comm::world();
  try {
    const MpiParallelGroup grid(world, o.expert_parallel > 0 ? o.expert_parallel : world.size());
    return train_with(o, &grid);
  } catch (const std::exception& e) {
    // The other ranks may be waiting for this one in a collective: end the whole job now.
    fmt::print(stderr, "error: rank {} of {}: {}\n", world.rank(), world.size(), e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, dynamic_cast<const ConfigError*>(&e) != nullptr ? 2 : 1);
    return 1;
  }
#else
  throw ConfigError(
      "--expert-parallel: this switchyard was built without MPI (scripts/setup.sh installs "
      "libopenmpi-dev and openmpi-bin; then rebuild)");
#endif
}

namespace {
int eval_hf(const EvalCliOptions& o);
}  // namespace

int run_eval(const EvalCliOptions& o) {
  if (o.checkpoint.empty() == o.model.empty())
    throw ConfigError("eval: expected one of --checkpoint or --model");
  if (!o.model.empty()) return eval_hf(o);
  if (const std::string path = find_checkpoint(o.checkpoint); is_vision_checkpoint(path))
    return eval_vision_cli(o, path);
  if (const std::string path = find_checkpoint(o.checkpoint); is_multimodal_checkpoint(path))
    return eval_multimodal_cli(o, path);
  if (!o.overrides.empty() || o.split != "test")
    throw ConfigError("--set and --split: for vision and multimodal checkpoints; a language model "
                      "is evaluated on its validation split as configured");
  const Checkpoint ck = load_checkpoint(o.checkpoint, /*with_optimizer=*/false);
  const std::string data = resolve_data_path(o.data.empty() ? ck.cfg.data.path : o.data);
  const Corpus corpus = load_corpus(data, ck.cfg.data.val_fraction, ck.cfg.model.context);
  const LanguageModel model(ck.cfg.model);
  const auto batches = val_batches(corpus, ck.cfg.train.batch, ck.cfg.model.context, o.max_tokens);
  int64_t n = 0;
  for (const Batch& b : batches) n += int64_t(b.tokens.size());
  ExecContext ctx;
  ctx.n_threads = o.threads;
  const Precision precision = o.precision.empty() ? ck.cfg.model.precision
                                                : parse_precision(o.precision, "--precision");
  ctx.backend = &pick_backend(cpu_features(), precision);
  fmt::print(stderr, "{}\n", describe_kernels(precision));
  const double t0 = wall_seconds();
  const double loss = evaluate(model, ck.params, batches, ctx);
  fmt::print("{} (step {}) on {} validation split: {} tokens, loss {:.4f} nats/byte, {:.4f} bits "
             "per byte ({:.1f} s)\n",
             o.checkpoint, ck.step, data, n, loss, loss / std::log(2.0), wall_seconds() - t0);
  return 0;
}

namespace {

Sampling sampling_of(const GenerateCliOptions& o) {
  return {.temperature = o.temperature, .top_k = o.top_k, .top_p = o.top_p};
}

void check_sampling(const GenerateCliOptions& o) {
  check_sampling(sampling_of(o), FieldNames::kFlags);
  if (o.prompt.empty()) throw ConfigError("--prompt is empty: expected at least one byte");
  if (o.checkpoint.empty() == o.model.empty())
    throw ConfigError("generate: expected one of --checkpoint or --model");
}

void print_hf_model(const HfModel& m) {
  const DecoderConfig& c = m.config;
  fmt::print(stderr, "{} ({}): {:.2f} M parameters ({:.2f} M active per token), {} layers ({} MoE), "
                     "{} weights, tokenizer: {}\n",
             m.dir, m.model_type, double(c.total_params()) / 1e6, double(c.active_params()) / 1e6,
             c.n_layers, c.n_moe_layers(), m.weights_dtype,
             m.tokenizer ? m.tokenizer->kind() : std::string("none"));
}

// Published models run in f32 compute unless --precision says otherwise (bf16 weights stay
// bf16 either way): f32 is what their fixtures were checked in.
ExecContext hf_context(int threads, const std::string& precision_flag) {
  const Precision precision =
      precision_flag.empty() ? Precision::kF32 : parse_precision(precision_flag, "--precision");
  ExecContext ctx;
  ctx.n_threads = threads;
  ctx.training = false;
  ctx.backend = &pick_backend(cpu_features(), precision);
  fmt::print(stderr, "{}\n", describe_kernels(precision));
  return ctx;
}

}  // namespace

HeldOutText held_out_text(const HfModel& m, const std::string& data) {
  HeldOutText h;
  h.path = resolve_data_path(data.empty() ? "data/austen.txt.gz" : data);
  const Corpus corpus = load_corpus(h.path, 0.05, 2);
  h.text.assign(corpus.val.begin(), corpus.val.end());
  if (m.tokenizer) h.ids = m.tokenizer->encode(h.text, /*add_special_tokens=*/false);
  return h;
}

namespace {

// Generation from a Hugging Face model directory: its tokenizer, BOS template and EOS ids.
int generate_hf(const GenerateCliOptions& o) {
  const HfModel m = load_hf_model(o.model);
  if (!m.tokenizer) throw IoError(fmt::format("{}: no tokenizer.json to encode the prompt", o.model));
  print_hf_model(m);
  const DecoderModel model(m.config);
  const ExecContext ctx = hf_context(o.threads, o.precision);
  std::vector<int32_t> ids = m.tokenizer->encode(o.prompt);
  DecoderState state = model.start();
  Tensor logits;
  const double p0 = wall_seconds();
  model.forward(m.params, ids, state, logits, ctx, /*all_positions=*/false);
  fmt::print(stderr, "[prefill of {} tokens in {:.3f} s: {:.0f} tokens/s]\n", ids.size(),
             wall_seconds() - p0, double(ids.size()) / (wall_seconds() - p0));
  const int64_t V = m.config.vocab;
  const Philox rng = sampling_stream(o.seed);
  SamplerScratch scratch;
  std::vector<int32_t> out;
  std::string shown;
  fmt::print("{}", o.prompt);
  const double t0 = wall_seconds();
  int64_t made = 0;
  for (; made < o.tokens; ++made) {
    const float* last = logits.data<float>() + (logits.dim(0) - 1) * V;
    const int32_t next = sample_token({last, size_t(V)}, sampling_of(o), rng, made, scratch);
    if (std::find(m.eos_ids.begin(), m.eos_ids.end(), next) != m.eos_ids.end()) break;
    out.push_back(next);
    // Print what the decoded text gained; a piece that ends inside a character waits.
    const std::string text = m.tokenizer->decode(out, /*skip_special_tokens=*/true);
    if (text.starts_with(shown) && !text.ends_with("\xef\xbf\xbd")) {
      fmt::print("{}", text.substr(shown.size()));
      std::fflush(stdout);
      shown = text;
    }
    if (state.n_pos >= m.config.max_context) break;
    const int32_t tok[1] = {next};
    model.forward(m.params, tok, state, logits, ctx);
  }
  const std::string text = m.tokenizer->decode(out, true);
  if (text.starts_with(shown)) fmt::print("{}", text.substr(shown.size()));
  fmt::print(stderr, "\n[{} tokens in {:.2f} s: {:.0f} tokens/s]\n", made, wall_seconds() - t0,
             double(made) / (wall_seconds() - t0));
  return 0;
}

// Cross-entropy of a Hugging Face model on the validation split of a text: windows of up to 256
// tokens of the text as its tokenizer cuts it, each scored from its second token on.
int eval_hf(const EvalCliOptions& o) {
  const HfModel m = load_hf_model(o.model);
  if (!m.tokenizer) throw IoError(fmt::format("{}: no tokenizer.json to encode the text", o.model));
  print_hf_model(m);
  const HeldOutText held = held_out_text(m, o.data);
  const std::string& data = held.path;
  const std::string& text = held.text;
  const std::vector<int32_t>& ids = held.ids;
  const DecoderModel model(m.config);
  const ExecContext ctx = hf_context(o.threads, o.precision);
  const int64_t window = std::min<int64_t>(256, m.config.max_context), V = m.config.vocab;
  const int64_t limit = o.max_tokens > 0 ? std::min<int64_t>(o.max_tokens, int64_t(ids.size()))
                                         : int64_t(ids.size());
  double nats = 0;
  int64_t scored = 0;
  const double t0 = wall_seconds();
  Tensor logits;
  for (int64_t at = 0; at + 1 < limit; at += window) {
    const int64_t n = std::min(window, limit - at);
    if (n < 2) break;
    DecoderState s = model.start();
    model.forward(m.params, std::span(ids).subspan(size_t(at), size_t(n)), s, logits, ctx);
    for (int64_t i = 0; i + 1 < n; ++i) {
      nats += next_token_nats({logits.data<float>() + i * V, size_t(V)}, ids[size_t(at + i + 1)]);
      ++scored;
    }
  }
  const double bytes = double(text.size()) * double(limit) / double(ids.size());
  fmt::print("{} on {} validation split: {} tokens, loss {:.4f} nats/token, {:.4f} bits per "
             "byte ({:.1f} s)\n",
             o.model, data, scored, nats / double(scored), nats / std::log(2.0) / bytes,
             wall_seconds() - t0);
  return 0;
}

}  // namespace

int run_generate(const GenerateCliOptions& o) {
  check_sampling(o);
  if (!o.model.empty()) return generate_hf(o);
  const Checkpoint ck = load_checkpoint(o.checkpoint, /*with_optimizer=*/false);
  const LmConfig& m = ck.cfg.model;
  const LanguageModel model(m);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  const Precision precision =
      o.precision.empty() ? m.precision : parse_precision(o.precision, "--precision");
  ctx.backend = &pick_backend(cpu_features(), precision);
  fmt::print(stderr, "{}\n", describe_kernels(precision));
  std::vector<int32_t> text(o.prompt.begin(), o.prompt.end());
  for (int32_t& t : text) t &= 0xFF;  // bytes, not chars
  if (int64_t(text.size()) > m.context) text.erase(text.begin(), text.end() - m.context);
  DecodeState state = model.start(DType::kF32);
  std::vector<float> logits;
  model.decode(ck.params, text, state, logits, ctx);
  fmt::print("{}", o.prompt);
  const Philox rng = sampling_stream(o.seed);
  SamplerScratch scratch;
  const double t0 = wall_seconds();
  for (int64_t i = 0; i < o.tokens; ++i) {
    const int32_t next = sample_token(logits, sampling_of(o), rng, i, scratch);
    std::fputc(next, stdout);
    std::fflush(stdout);
    text.push_back(next);
    if (state.n_pos() >= m.context) {
      // The window is full: keep the last half and rebuild the cache from it.
      text.erase(text.begin(), text.end() - m.context / 2);
      state = model.start(DType::kF32);
      model.decode(ck.params, text, state, logits, ctx);
    } else {
      model.decode(ck.params, std::span<const int32_t>(&text.back(), 1), state, logits, ctx);
    }
  }
  fmt::print(stderr, "\n[{} tokens in {:.2f} s: {:.0f} tokens/s]\n", o.tokens,
             wall_seconds() - t0, double(o.tokens) / (wall_seconds() - t0));
  return 0;
}

int run_serve(const ServeCliOptions& o) {
  if (o.model.empty() == o.checkpoint.empty())
    throw ConfigError(
        "serve: expected one of --checkpoint (a Switchyard run or checkpoint) or --model (a "
        "Hugging Face model directory)");
  EngineOptions eo;
  eo.max_batch = o.max_batch;
  eo.max_waiting = o.max_waiting;
  eo.prefill_chunk = o.prefill_chunk;
  eo.step_tokens = std::max(o.step_tokens, o.max_batch);
  eo.n_threads = o.threads;
  std::optional<Checkpoint> ck;
  std::optional<HfModel> hf;
  Precision precision = Precision::kAuto;
  std::string what;  // for the start line
  if (!o.checkpoint.empty()) {
    const std::string path = find_checkpoint(o.checkpoint);
    ck = load_checkpoint(path, /*with_optimizer=*/false);
    precision = ck->cfg.model.precision;
    what = fmt::format("{} (step {})", path, ck->step);
  } else {
    hf = load_hf_model(o.model);
    what = fmt::format("{} ({}, {} weights)", o.model, hf->model_type, hf->weights_dtype);
  }
  if (!o.precision.empty()) precision = parse_precision(o.precision, "--precision");
  eo.backend = &pick_backend(cpu_features(), precision);
  fmt::print(stderr, "{}\n", describe_kernels(precision));
  keep_freed_memory_for_reuse();
  const std::string name = !o.name.empty() ? o.name
                           : ck            ? ck->cfg.name
                                           : std::filesystem::path(o.model).filename().string();
  Engine engine(ck ? serve_byte_model(ck->cfg.model, ck->params, eo)
                   : serve_hf_model(std::move(*hf), eo),
                eo);
  ServerOptions so;
  so.host = o.host;
  so.port = o.port;
  so.model_name = name;
  so.request_timeout_s = o.timeout;
  so.max_body_bytes = o.max_body;
  // A client that vanishes mid-write must not end the process.
  std::signal(SIGPIPE, SIG_IGN);
  Server server(engine, so);
  const StopSignals guard;
  std::thread watcher([&] {
    while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    server.stop();
  });
  print_log(stdout, "serving {} as '{}' on http://{}:{} (batch {}, queue {})\n", what,
            so.model_name, o.host, server.port(), eo.max_batch, eo.max_waiting);
  server.run();
  g_stop.store(true);  // run() can also end by itself (the listener failed)
  watcher.join();
  print_log(stdout, "stopped: {} completions served\n", engine.metrics().requests_finished);
  return 0;
}

int run_export(const ExportCliOptions& o) {
  const std::string path = find_checkpoint(o.checkpoint);
  const Checkpoint ck = load_checkpoint(path, /*with_optimizer=*/false);
  const auto notes = export_hf_model(ck.cfg.model, ck.params, o.out);
  fmt::print("{} (step {}) -> {} as {}: config.json, model.safetensors, tokenizer.json (bytes)\n",
             path, ck.step, o.out, ck.cfg.model.moe_every > 0 ? "mixtral" : "llama");
  for (const std::string& n : notes) fmt::print("note: {}\n", n);
  return 0;
}

int run_compare(const CompareCliOptions& o) {
  if (is_vision_config(o.moe) || is_vision_config(o.dense)) return compare_vision_cli(o);
  if (is_multimodal_config(o.moe) || is_multimodal_config(o.dense)) return compare_multimodal_cli(o);
  const RunConfig moe = config_for(o.moe, {}, o.steps), dense = config_for(o.dense, {}, o.steps);
  if (moe.train.steps != dense.train.steps || moe.train.eval_interval != dense.train.eval_interval)
    throw ConfigError(fmt::format("compare: {} and {} differ in train.steps or "
                                  "train.eval_interval: expected the same",
                                  o.moe, o.dense));
  std::vector<TrainResult> results;
  for (const RunConfig* cfg : {&dense, &moe}) {
    const std::string dir = (std::filesystem::path(o.out) / std::filesystem::path(cfg->name).stem()).string();
    if (std::filesystem::exists(std::filesystem::path(dir) / "checkpoint.safetensors"))
      throw ConfigError(fmt::format("{}/checkpoint.safetensors exists: pass --out to compare into "
                                    "another directory (nothing was overwritten)",
                                    dir));
    TrainOptions opt;
    opt.out_dir = dir;
    opt.n_threads = o.threads;
    fmt::print("== {} ({:.2f} M active parameters per token)\n", cfg->name,
               double(cfg->model.active_params()) / 1e6);
    results.push_back(train(*cfg, opt));
  }
  const TrainHistory &hd = results[0].history, &hm = results[1].history;
  const double target = results[0].final_val_loss;
  int64_t reach = -1;
  for (const auto& e : hm.evals)
    if (e.val_loss <= target) {
      reach = e.step;
      break;
    }
  std::string table = fmt::format("| step | {} val loss | {} val loss |\n|---:|---:|---:|\n",
                                  dense.name, moe.name);
  for (size_t i = 0; i < std::min(hd.evals.size(), hm.evals.size()); ++i)
    table += fmt::format("| {} | {:.4f} | {:.4f} |\n", hd.evals[i].step, hd.evals[i].val_loss,
                         hm.evals[i].val_loss);
  std::string verdict =
      reach > 0 ? fmt::format("{} first reaches {}'s final validation loss {:.4f} at step {} of "
                              "{} ({:.2f}x fewer steps; evaluated every {} steps)",
                              moe.name, dense.name, target, reach, dense.train.steps,
                              double(dense.train.steps) / double(reach), moe.train.eval_interval)
                : fmt::format("{} does not reach {}'s final validation loss {:.4f} within {} steps",
                              moe.name, dense.name, target, moe.train.steps);
  std::string speed = fmt::format("tokens/s: {} {:.0f}, {} {:.0f}", dense.name,
                                  results[0].tokens_per_s, moe.name, results[1].tokens_per_s);
  fmt::print("\n{}\n{}\n{}\n", table, verdict, speed);
  write_file_atomic((std::filesystem::path(o.out) / "compare.md").string(),
                    table + "\n" + verdict + "\n\n" + speed + "\n");
  write_file_atomic((std::filesystem::path(o.out) / "compare.html").string(),
                    render_comparison({dense.name, moe.name}, {&hd, &hm}, verdict));
  fmt::print("wrote {}/compare.md and {}/compare.html\n", o.out, o.out);
  return 0;
}

int run_sweep(const SweepCliOptions& o) {
  const RunConfig moe = config_for(o.moe, {}, o.steps), dense = config_for(o.dense, {}, o.steps);
  const std::vector<SweepRun> runs = plan_sweep(moe, dense, o.experts, o.seeds, o.main_seeds);
  const int64_t dense_active = dense.model.active_params();
  fmt::print("sweep: {} runs of {} steps into {}\n{:<24} {:>4} {:>6} {:>14} {:>9} {:>12}\n",
             runs.size(), moe.train.steps, o.out, "run", "E", "width", "active params",
             "vs dense", "total params");
  for (const SweepRun& r : runs) {
    const LmConfig& m = r.cfg.model;
    fmt::print("{:<24} {:>4} {:>6} {:>14} {:>9.4f} {:>12}\n", r.name, r.experts,
               r.experts > 0 ? m.moe.d_ff : m.d_ff, m.active_params(),
               double(m.active_params()) / double(dense_active), m.total_params());
  }
  if (o.plan_only) return 0;
  SweepOptions opt;
  opt.out_dir = o.out;
  opt.n_threads = o.threads;
  opt.stop = &g_stop;
  const SweepReport r = [&] {
    const StopSignals guard;
    return sy::run_sweep(runs, opt);
  }();
  fmt::print("\n{}\nwrote {}/sweep.md and {}/sweep.svg\n", r.markdown, o.out, o.out);
  if (r.interrupted) {
    fmt::print("interrupted: run the same command again to continue\n");
    return 0;
  }
  return 0;
}

namespace {

// Routes of a Hugging Face model on the validation split of a text, in windows of up to 256
// tokens as its tokenizer cuts the text.
int routes_hf(const RoutesCliOptions& o) {
  const HfModel m = load_hf_model(o.model);
  if (!m.tokenizer) throw IoError(fmt::format("{}: no tokenizer.json to encode the text", o.model));
  if (m.config.n_moe_layers() == 0)
    throw ConfigError(fmt::format("{}: a dense model ({}) has no routes", o.model, m.model_type));
  print_hf_model(m);
  HeldOutText held = held_out_text(m, o.data);
  const std::string& data = held.path;
  std::vector<int32_t>& ids = held.ids;
  if (o.max_tokens > 0 && int64_t(ids.size()) > o.max_tokens) ids.resize(size_t(o.max_tokens));
  const DecoderModel model(m.config);
  const ExecContext ctx = hf_context(o.threads, "");
  const RouteAnalysis a = analyze_decoder_routes(model, m.params, *m.tokenizer, ids,
                                                 std::min<int64_t>(256, m.config.max_context), ctx);
  fmt::print("{} ({}), {} validation split\n{}", o.model, m.model_type, data, render_routes_text(a));
  const std::string html = o.html.empty() ? "routes.html" : o.html;
  write_file_atomic(html, render_routes_html(a, o.model));
  fmt::print("wrote {}\n", html);
  return 0;
}

}  // namespace

int run_routes(const RoutesCliOptions& o) {
  if (o.checkpoint.empty() == o.model.empty())
    throw ConfigError("routes: expected one of --checkpoint or --model");
  if (!o.model.empty()) return routes_hf(o);
  if (const std::string path = find_checkpoint(o.checkpoint); is_vision_checkpoint(path))
    return vision_routes_cli(o, path);
  if (const std::string path = find_checkpoint(o.checkpoint); is_multimodal_checkpoint(path))
    return multimodal_routes_cli(o, path);
  const Checkpoint ck = load_checkpoint(o.checkpoint, /*with_optimizer=*/false);
  if (ck.cfg.model.n_moe_layers() == 0)
    throw ConfigError(fmt::format("{}: a dense model (model.moe_every = 0) has no routes", o.checkpoint));
  const std::string data = resolve_data_path(o.data.empty() ? ck.cfg.data.path : o.data);
  const Corpus corpus = load_corpus(data, ck.cfg.data.val_fraction, ck.cfg.model.context);
  const LanguageModel model(ck.cfg.model);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  ctx.backend = &pick_backend(cpu_features(), ck.cfg.model.precision);
  const RouteAnalysis a = analyze_routes(
      model, ck.params, val_batches(corpus, ck.cfg.train.batch, ck.cfg.model.context, o.max_tokens), ctx,
      &corpus);
  fmt::print("{} (step {}), {} validation split\n{}", o.checkpoint, ck.step, data, render_routes_text(a));
  // Beside the checkpoint, in its run directory (a sharded checkpoint is a directory of it).
  const std::filesystem::path found = find_checkpoint(o.checkpoint);
  const std::filesystem::path run_dir = found.filename() == kShardIndex
                                            ? found.parent_path().parent_path()
                                            : found.parent_path();
  const std::string html = o.html.empty() ? (run_dir / "routes.html").string() : o.html;
  write_file_atomic(html, render_routes_html(a, o.checkpoint));
  fmt::print("wrote {}\n", html);
  return 0;
}

namespace {

struct Policy {
  std::string name, what;
  std::vector<std::string> overrides;
};

// The routing policies compare-routers trains, as overrides of the base config.
std::vector<Policy> router_policies() {
  return {
      {"softmax_topk", "softmax top-2, renormalised, balance loss 0.01", {}},
      {"softmax_no_balance", "softmax top-2 without the balance loss", {"model.moe.loss_balance_weight=0"}},
      {"switch_top1", "Switch: top-1, not renormalised, jitter 0.01",
       {"model.moe.top_k=1", "model.moe.renormalize=false", "model.moe.jitter_eps=0.01"}},
      {"sigmoid_bias", "sigmoid scores, loss-free bias balancing (rate 0.01), no balance loss",
       {"model.moe.router=sigmoid_bias", "model.moe.loss_balance_weight=0", "model.moe.bias_update_rate=0.01"}},
      {"sigmoid_groups", "sigmoid_bias limited to the best 2 of 4 expert groups",
       {"model.moe.router=sigmoid_bias", "model.moe.loss_balance_weight=0", "model.moe.bias_update_rate=0.01",
        "model.moe.n_groups=4", "model.moe.topk_groups=2"}},
      {"expert_choice", "each expert takes its top-C tokens (C at capacity factor 1.25)",
       {"model.moe.router=expert_choice"}},
      {"shared_expert", "softmax top-2 plus one shared expert of width 512",
       {"model.moe.n_shared_experts=1"}},
      {"batch_prioritized", "softmax top-2, drops decided by top-1 probability (V-MoE)",
       {"model.moe.batch_prioritized=true"}},
      {"hash", "hash of the byte id, top-2 consecutive experts", {"model.moe.router=hash"}},
      {"random", "2 random experts per token", {"model.moe.router=random"}},
      {"noisy_topk", "noisy top-2 with the importance and load losses, 0.1 each (Shazeer 2017)",
       {"model.moe.router=noisy_topk", "model.moe.loss_importance_weight=0.1",
        "model.moe.loss_load_weight=0.1"}},
  };
}

// Mean over MoE layers of the coefficient of variation of expert load, over the steps after
// the first half of training (warm-up excluded).
double late_load_cv(const TrainHistory& h) {
  double sum = 0;
  int64_t n = 0;
  for (size_t s = h.steps.size() / 2; s < h.steps.size(); ++s)
    for (const auto& layer : h.steps[s].load) sum += load_cv(layer), ++n;
  return n > 0 ? sum / double(n) : 0;
}

double late_dropped(const TrainHistory& h) {
  double sum = 0;
  int64_t n = 0;
  for (size_t s = h.steps.size() / 2; s < h.steps.size(); ++s)
    for (double d : h.steps[s].dropped) sum += d, ++n;
  return n > 0 ? sum / double(n) : 0;
}

// The policies named (all when none), in the order of router_policies(); an unknown name is an
// error listing the known ones.
std::vector<Policy> choose_policies(const std::vector<std::string>& names) {
  std::vector<Policy> chosen;
  for (const Policy& p : router_policies())
    if (names.empty() || std::find(names.begin(), names.end(), p.name) != names.end())
      chosen.push_back(p);
  for (const std::string& name : names) {
    bool known = false;
    std::string all;
    for (const Policy& p : router_policies()) known |= p.name == name, all += (all.empty() ? "" : ", ") + p.name;
    if (!known) throw ConfigError(fmt::format("--policies {}: unknown policy (known: {})", name, all));
  }
  return chosen;
}

}  // namespace

int run_compare_routers(const CompareRoutersCliOptions& o) {
  const std::vector<Policy> chosen = choose_policies(o.policies);
  for (const Policy& p : chosen)
    if (std::filesystem::exists(std::filesystem::path(o.out) / p.name / "checkpoint.safetensors"))
      throw ConfigError(fmt::format("{}/{}/checkpoint.safetensors exists: pass --out to compare into "
                                    "another directory (nothing was overwritten)", o.out, p.name));
  std::string table =
      "| policy | what | val loss | load CV (2nd half) | dropped % (2nd half) | tokens/s |\n"
      "|---|---|---:|---:|---:|---:|\n";
  std::vector<std::string> names;
  std::vector<TrainHistory> histories;
  for (const Policy& p : chosen) {
    RunConfig cfg = config_for(o.config, p.overrides, o.steps);
    cfg.name = p.name;
    TrainOptions opt;
    opt.out_dir = (std::filesystem::path(o.out) / p.name).string();
    opt.n_threads = o.threads;
    opt.stop = &g_stop;
    fmt::print("== {}: {}\n", p.name, p.what);
    TrainResult r = [&] {
      const StopSignals guard;
      return train(cfg, opt);
    }();
    table += fmt::format("| {} | {} | {:.4f} | {:.3f} | {:.2f} | {:.0f} |\n", p.name, p.what,
                         r.final_val_loss, late_load_cv(r.history), 100 * late_dropped(r.history),
                         r.tokens_per_s);
    names.push_back(p.name);
    histories.push_back(std::move(r.history));
    if (r.interrupted) break;
  }
  std::vector<const TrainHistory*> hs;
  for (const auto& h : histories) hs.push_back(&h);
  const std::string caption = fmt::format("{} steps of {} per policy.", o.steps, o.config);
  fmt::print("\n{}\n{}\n", table, caption);
  write_file_atomic((std::filesystem::path(o.out) / "routers.md").string(), table + "\n" + caption + "\n");
  write_file_atomic((std::filesystem::path(o.out) / "routers.html").string(),
                    render_comparison(names, hs, caption));
  fmt::print("wrote {}/routers.md and {}/routers.html\n", o.out, o.out);
  return 0;
}

int run_bench_routers(const BenchRoutersCliOptions& o) {
  const std::vector<MoeShape>& shapes = moe_bench_shapes();
  const auto shape = std::find_if(shapes.begin(), shapes.end(), [&](const MoeShape& s) {
    return s.name == o.shape && !s.decode && !s.gpu_only;
  });
  if (shape == shapes.end())
    throw ConfigError(fmt::format("--shape {}: expected A or B (the CPU training shapes)", o.shape));
  if (!(o.capacity_factor > 0))
    throw ConfigError(fmt::format("--capacity-factor {}: expected > 0 (expert choice needs one)",
                                  o.capacity_factor));
  if (o.iters < 1) throw ConfigError(fmt::format("--iters {}: expected >= 1", o.iters));
  const std::vector<Policy> chosen = choose_policies(o.policies);
  if (chosen.front().name != "softmax_topk")
    throw ConfigError("--policies: the reference softmax_topk must be among them");

  // Each policy's MoE config: austen-moe's with the policy's overrides, at the shape's sizes.
  struct Run {
    const Policy* policy;
    MoeLayer layer;
    MoeParams p, g;
    MoeCache cache;
    std::vector<double> fwd, fwd_bwd;
    int64_t rows = 0;
  };
  std::vector<std::unique_ptr<Run>> runs;
  const std::vector<std::string> at_shape = {
      fmt::format("model.d_model={}", shape->d_model), fmt::format("model.moe.d_ff={}", shape->d_ff),
      fmt::format("model.moe.n_experts={}", shape->n_experts),
      fmt::format("model.moe.top_k={}", shape->top_k),
      fmt::format("model.moe.capacity_factor_train={}", o.capacity_factor)};
  for (const Policy& pol : chosen) {
    std::vector<std::string> ov = at_shape;
    ov.insert(ov.end(), pol.overrides.begin(), pol.overrides.end());
    const MoeConfig mc = load_run_config("austen-moe", ov).model.moe_config();
    MoeParams p = init_moe_params(mc, DType::kF32, 1);
    MoeParams g = zeros_like(p);
    runs.push_back(std::unique_ptr<Run>(new Run{&pol, MoeLayer(mc), std::move(p), std::move(g), {}, {}, {}}));
  }
  const int64_t T = shape->n_tokens, d = shape->d_model;
  Tensor x({T, d}, DType::kF32), dy({T, d}, DType::kF32), y, dx;
  fill_normal(x.span<float>(), Philox(7, 1), 1.0f);
  fill_normal(dy.span<float>(), Philox(7, 2), 1.0f);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) ids[t] = int32_t(Philox(7, 3).bits(uint64_t(t))[0] % 256);
  ExecContext ctx{.n_threads = o.threads, .seed = 1, .training = true};
  fmt::print("switchyard bench routers: shape {} (T={} d={} f={} E={} k={}), capacity factor {}, "
             "{} threads, median of {} round-robin runs\n",
             shape->name, T, d, shape->d_ff, shape->n_experts, shape->top_k, o.capacity_factor,
             o.threads > 0 ? o.threads : max_threads(), o.iters);
  for (int it = -1; it < o.iters; ++it)  // round -1 warms up
    for (auto& r : runs) {
      double t0 = wall_seconds();
      const MoeForward f = r->layer.forward(r->p, x, y, r->cache, ctx, ids);
      const double t1 = wall_seconds();
      r->layer.backward(r->p, r->cache, dy, r->g, dx, ctx);
      const double t2 = wall_seconds();
      r->rows = r->cache.plan.n_rows() + r->layer.config().n_shared_experts * T;
      (void)f;
      if (it < 0) continue;
      r->fwd.push_back(t1 - t0);
      r->fwd_bwd.push_back(t2 - t0);
    }
  auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  const double ref_fwd = median(runs.front()->fwd), ref_fb = median(runs.front()->fwd_bwd);
  const double ref_rows = double(runs.front()->rows);
  nlohmann::json all = nlohmann::json::array();
  fmt::print("{:<20} {:>9} {:>7} {:>11} {:>7} {:>9} {:>12}\n", "policy", "fwd ms", "ratio",
             "fwd+bwd ms", "ratio", "rows", "ratio/row");
  for (auto& r : runs) {
    const double f = median(r->fwd), fb = median(r->fwd_bwd);
    // Time per computed expert row (shared experts' rows included) against the reference's:
    // policies that compute more rows or fewer (top-1, drops) compared for their routing cost.
    const double per_row = (fb / double(std::max<int64_t>(r->rows, 1))) / (ref_fb / ref_rows);
    fmt::print("{:<20} {:9.2f} {:7.3f} {:11.2f} {:7.3f} {:9} {:12.3f}\n", r->policy->name, f * 1e3,
               f / ref_fwd, fb * 1e3, fb / ref_fb, r->rows, per_row);
    all.push_back({{"policy", r->policy->name}, {"fwd_ms", f * 1e3}, {"fwd_ratio", f / ref_fwd},
                   {"fwd_bwd_ms", fb * 1e3}, {"fwd_bwd_ratio", fb / ref_fb}, {"rows", r->rows},
                   {"fwd_bwd_ratio_per_row", per_row}});
  }
  write_json_output(all.dump(2) + "\n", o.json_path);
  return 0;
}

}  // namespace sy::cli
