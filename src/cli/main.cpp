// The `switchyard` command. Subcommands are built on CLI11; library errors (sy::Error) become
// `error: ...` with exit 1, usage errors exit 2 with the closest valid flag suggested.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <new>
#include <string>
#include <vector>

#include "cli/bench_moe.h"
#ifdef SY_WITH_MPI
#include "cli/bench_ep.h"
#endif
#include "cli/bench_model.h"
#include "cli/bench_serve.h"
#include "cli/bench_train.h"
#include "cli/vision_commands.h"
#include "cli/lm_commands.h"
#include "switchyard/core/error.h"
#include "switchyard/io/hf_model.h"

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

// The long flag of `app` (or of the subcommand that was parsed last) closest to `arg`.
std::string closest_flag(const CLI::App& app, const std::string& arg) {
  const CLI::App* cur = &app;
  for (;;) {
    auto subs = cur->get_subcommands();
    if (subs.empty()) break;
    cur = subs.front();
  }
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const CLI::Option* o : cur->get_options())
    for (const std::string& name : o->get_lnames()) {
      const size_t d = edit_distance(arg, "--" + name);
      if (d < best_d) best_d = d, best = "--" + name;
    }
  return best_d <= std::max<size_t>(3, arg.size() / 3) ? best : "";
}

// The subcommand path of argv (e.g. `bench moe`) checked against the app's tree before CLI11
// sees it: CLI11 alone answers an unknown NAME with "A subcommand is required", and prints the
// main help for `NAME --help`. Returns the error to print, or "" when every word is known.
std::string unknown_subcommand(const CLI::App& app, int argc, char** argv) {
  const CLI::App* cur = &app;
  std::string path = "switchyard";
  for (int i = 1; i < argc; ++i) {
    const std::string word = argv[i];
    if (word.empty() || word[0] == '-') break;
    const auto subs = cur->get_subcommands([](const CLI::App*) { return true; });
    if (subs.empty()) break;
    const CLI::App* next = nullptr;
    std::string best, names;
    size_t best_d = SIZE_MAX;
    for (const CLI::App* s : subs) {
      if (s->get_name() == word) next = s;
      const size_t d = edit_distance(word, s->get_name());
      if (d < best_d) best_d = d, best = s->get_name();
      names += (names.empty() ? "" : ", ") + s->get_name();
    }
    if (next == nullptr) {
      const bool close = best_d <= std::max<size_t>(2, word.size() / 3);
      return fmt::format("'{} {}' is not a command{}; the commands of {} are: {}", path, word,
                         close ? fmt::format(" (did you mean '{} {}'?)", path, best) : "",
                         path, names);
    }
    cur = next;
    path += " " + word;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Switchyard: sparse Mixture-of-Experts models in C++", "switchyard"};
  app.set_version_flag("--version", "switchyard 0.1.0");
  app.require_subcommand(1);

  CLI::App* bench =
      app.add_subcommand("bench", "Benchmarks against ceilings measured in the same run");
  bench->require_subcommand(1);
  sy::cli::BenchMoeOptions moe_opt;
  CLI::App* bench_moe = bench->add_subcommand("moe", "MoE layer forward and backward on CPU");
  bench_moe->add_option("--shape", moe_opt.shapes,
                        "Shapes to run: A, B, C1, C16, M, X (default: all that fit the device)");
  bench_moe->add_option("--device", moe_opt.device, "cpu, or cuda (bf16 on the GPU)")
      ->capture_default_str();
  bench_moe->add_option("--threads", moe_opt.n_threads, "Threads (0: all cores)")
      ->capture_default_str();
  bench_moe->add_option("--iters", moe_opt.iters, "Timed runs per figure (0: per shape)")
      ->capture_default_str();
  bench_moe->add_option("--weights", moe_opt.weights, "Expert weight dtype: f32 or bf16")
      ->capture_default_str();
  bench_moe->add_option("--precision", moe_opt.precision, "GEMM precision: f32, bf16 or auto")
      ->capture_default_str();
  bench_moe
      ->add_option("--capacity-factor", moe_opt.capacity_factor, "Capacity factor (0: dropless)")
      ->capture_default_str();
  bench_moe->add_option("--json", moe_opt.json_path,
                        "Also write the results as JSON (- for stdout)");
  bench_moe->add_option("--seed", moe_opt.seed, "Seed of weights and inputs")
      ->capture_default_str();

  sy::cli::BenchServeOptions bs_opt;
  CLI::App* bench_serve = bench->add_subcommand(
      "serve", "Throughput against latency of the server under N concurrent streaming clients");
  bench_serve->add_option("--checkpoint", bs_opt.checkpoint,
                          "Serve this (default: random weights of --config)");
  bench_serve->add_option("--config", bs_opt.config, "Built-in config or JSON file")
      ->capture_default_str();
  bench_serve->add_option("--clients", bs_opt.clients, "Concurrent clients, one run each")
      ->capture_default_str();
  bench_serve->add_option("--requests", bs_opt.requests, "Requests per client")
      ->capture_default_str();
  bench_serve->add_option("--max-tokens", bs_opt.max_tokens, "Tokens per request")
      ->capture_default_str();
  bench_serve->add_option("--prompt-bytes", bs_opt.prompt_bytes, "Prompt length")
      ->capture_default_str();
  bench_serve->add_option("--max-seconds", bs_opt.max_seconds,
                          "Per client count: no new request after this")
      ->capture_default_str();
  bench_serve->add_flag("!--no-batching-off", bs_opt.batching_off,
                        "Skip the comparison run with batching off");
  bench_serve->add_option("--threads", bs_opt.threads, "Engine threads (0: all cores)")
      ->capture_default_str();
  bench_serve->add_option("--precision", bs_opt.precision, "f32, bf16 or auto (default: model's)");
  bench_serve->add_option("--json", bs_opt.json_path, "Also write JSON (- for stdout)");
  bench_serve->add_option("--svg", bs_opt.svg_path, "Write throughput against latency as SVG");

  sy::cli::BenchModelOptions bm_opt;
  CLI::App* bench_model = bench->add_subcommand(
      "model", "A Hugging Face model's prefill and decode tokens/s against the weight-read ceiling");
  bench_model->add_option("--model", bm_opt.model, "Hugging Face model directory")->required();
  bench_model->add_option("--prefill", bm_opt.prefill, "Prompt lengths to time (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  bench_model->add_option("--batch", bm_opt.batch, "Sequences decoding together (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  bench_model->add_option("--steps", bm_opt.steps, "Timed decode steps per batch")
      ->capture_default_str();
  bench_model->add_option("--context", bm_opt.context, "Tokens each decoding sequence holds first")
      ->capture_default_str();
  bench_model->add_option("--iters", bm_opt.iters, "Prefill runs per length (the fastest counts)")
      ->capture_default_str();
  bench_model->add_option("--threads", bm_opt.n_threads, "Threads (0: all cores)")
      ->capture_default_str();
  bench_model->add_option("--precision", bm_opt.precision, "GEMM precision f32, bf16 or auto")
      ->capture_default_str();
  bench_model->add_option("--text", bm_opt.text, "Text the prompts come from")
      ->capture_default_str();
  bench_model->add_option("--json", bm_opt.json_path, "Also write JSON (- for stdout)");

  sy::cli::BenchTrainOptions bt_opt;
  CLI::App* bench_train =
      bench->add_subcommand("train", "Training steps/s of a config against the dense GEMM rates");
  bench_train->add_option("--config", bt_opt.config, "Built-in config or JSON file")
      ->capture_default_str();
  bench_train->add_option("--steps", bt_opt.steps, "Timed steps")->capture_default_str();
  bench_train->add_option("--warmup", bt_opt.warmup, "Untimed steps first")->capture_default_str();
  bench_train->add_option("--threads", bt_opt.n_threads, "Threads (0: all cores)")
      ->capture_default_str();
  bench_train->add_option(
      "--precision", bt_opt.precision,
      "GEMM precision f32, bf16 or auto (default: the config's model.precision)");
  bench_train->add_option("--json", bt_opt.json_path, "Also write JSON (- for stdout)");

#ifdef SY_WITH_MPI
  sy::cli::BenchEpOptions ep_opt;
  CLI::App* bench_ep = bench->add_subcommand(
      "expert-parallel",
      "Under mpirun -np P: MoE layer all-to-all vs compute, values sent per token, and training "
      "tokens/s on P ranks vs one process with P threads");
  bench_ep->add_option("--config", ep_opt.config, "Built-in config or JSON file")
      ->capture_default_str();
  bench_ep->add_option("--iters", ep_opt.iters, "Timed layer steps")->capture_default_str();
  bench_ep->add_option("--train-steps", ep_opt.train_steps, "Training steps per run (0: skip)")
      ->capture_default_str();
  bench_ep->add_option("--capacity-factor", ep_opt.capacity_factor,
                       "Layer capacity factor (0: dropless)")
      ->capture_default_str();
  bench_ep->add_option("--exchange", ep_opt.exchange, "Rows cross ranks as f32 or bf16")
      ->capture_default_str();
  bench_ep->add_option("--overlap", ep_opt.overlap,
                       "Overlap the row exchanges with the experts' compute, block by block: on, "
                       "off, auto (on when the ranks span hosts)")
      ->capture_default_str();
  bench_ep->add_flag("--split-wait", ep_opt.split_wait,
                     "Time the wait for the slowest rank apart from moving the rows (adds a "
                     "one-value all-reduce before each row exchange)");
  bench_ep->add_option("--json", ep_opt.json_path, "Also write JSON (- for stdout)");
#endif

  sy::cli::TrainCliOptions train_opt;
  CLI::App* train = app.add_subcommand(
      "train", "Train a language model, a vision transformer or the multimodal model (default: "
               "austen-moe)");
  train->add_option("--config", train_opt.config,
                    "Built-in config (austen-moe, austen-dense, fashion-vit, multimodal-moe, ...) or a JSON file")
      ->capture_default_str();
  train->add_option("--set", train_opt.overrides,
                    "Override a config value, e.g. --set train.lr=0.001 (repeatable)");
  train->add_option("--steps", train_opt.steps, "Training steps (overrides train.steps)");
  train->add_option("--out", train_opt.out, "Run directory (default: runs/<config>)");
  train->add_flag("--resume", train_opt.resume, "Continue the checkpoint in the run directory");
  train->add_option("--init-from", train_opt.init_from,
                    "Fine-tune a Hugging Face mixtral or llama directory of Switchyard's "
                    "architecture (byte vocabulary; e.g. one `export` wrote): its shape and "
                    "weights, the rest from --config");
  train->add_option("--threads", train_opt.threads,
                    "Threads (0: all cores, shared by the ranks on one machine)")
      ->capture_default_str();
  train->add_option("--expert-parallel", train_opt.expert_parallel,
                    "Under mpirun: split each MoE layer's experts over this many ranks; the "
                    "ranks / N groups are data-parallel replicas (default with mpirun: all ranks)")
      ->check(CLI::PositiveNumber);
  train->add_option("--comm-timeout", train_opt.comm_timeout,
                    "Seconds a rank waits on its peers before the job stops with an error "
                    "(0: forever)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  train->add_option("--exchange", train_opt.exchange,
                    "Under mpirun: the MoE rows cross ranks as f32 (equal to one process) or "
                    "bf16 (half the bytes)")
      ->capture_default_str();
  train->add_option("--overlap", train_opt.overlap,
                    "Under mpirun: overlap the MoE row exchanges with the experts' compute, each "
                    "rank computing a source's rows as they arrive: on, off, auto (on when an "
                    "expert group spans hosts, where it pays)")
      ->capture_default_str();

  sy::cli::EvalCliOptions eval_opt;
  CLI::App* eval = app.add_subcommand("eval", "Validation loss and bits per byte of a checkpoint");
  eval->add_option("--checkpoint", eval_opt.checkpoint, "Checkpoint file");
  eval->add_option("--model", eval_opt.model, "Hugging Face model directory (" + sy::supported_hf_architectures() + ")");
  eval->add_option("--data", eval_opt.data,
                  "Text file (default: the checkpoint's data.path); vision and multimodal "
                  "checkpoints: the image directory");
  eval->add_option("--max-tokens", eval_opt.max_tokens, "Tokens to score (0: whole split)")
      ->capture_default_str();
  eval->add_option("--split", eval_opt.split, "Vision and multimodal checkpoints: the test or val split")
      ->capture_default_str();
  eval->add_option("--set", eval_opt.overrides,
                   "Vision and multimodal checkpoints: evaluate under a changed config value, e.g. --set "
                   "model.moe.capacity_factor_eval=0.5 (repeatable)");
  eval->add_option("--threads", eval_opt.threads, "Threads (0: all cores)")->capture_default_str();
  eval->add_option("--precision", eval_opt.precision,
                   "GEMM precision f32, bf16 or auto (default: f32 with --model, the checkpoint's own)");

  sy::cli::SuperclassesCliOptions sc_opt;
  CLI::App* superclasses = app.add_subcommand(
      "superclasses",
      "Cluster a trained vision model's classes by its validation confusion into one "
      "super-class per expert (Mobile V-MoE's guided routing)");
  superclasses->add_option("--checkpoint", sc_opt.checkpoint, "Vision checkpoint or run directory")
      ->required();
  superclasses->add_option("--experts", sc_opt.experts, "Super-classes (experts) to make")
      ->required()
      ->check(CLI::PositiveNumber);
  superclasses->add_option("--out", sc_opt.out,
                           "JSON to write (default: superclasses.json beside the checkpoint; "
                           "the picture goes beside it as .svg)");
  superclasses->add_option("--threads", sc_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();

  sy::cli::ServeCliOptions serve_opt;
  CLI::App* serve = app.add_subcommand(
      "serve", "Serve a model over HTTP: OpenAI-style completions with continuous batching");
  serve->add_option("--checkpoint", serve_opt.checkpoint, "Run directory or checkpoint");
  serve->add_option("--model", serve_opt.model, "Hugging Face model directory (" + sy::supported_hf_architectures() + ")");
  serve->add_option("--host", serve_opt.host, "Address to listen on")->capture_default_str();
  serve->add_option("--port", serve_opt.port, "Port (0: any free one, printed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  serve->add_option("--name", serve_opt.name, "The model's id in the API (default: config name)");
  serve->add_option("--max-batch", serve_opt.max_batch, "Sequences decoding together")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve->add_option("--max-waiting", serve_opt.max_waiting,
                    "Requests queued beyond the batch; more get 429")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve->add_option("--prefill-chunk", serve_opt.prefill_chunk,
                    "Prompt tokens a sequence feeds per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve->add_option("--step-tokens", serve_opt.step_tokens, "Rows per model step at most")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve->add_option("--timeout", serve_opt.timeout, "Seconds a request may take (0: no limit)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  serve->add_option("--max-body", serve_opt.max_body, "Request body limit in bytes")
      ->capture_default_str();
  serve->add_option("--threads", serve_opt.threads, "Compute threads (0: all cores)")
      ->capture_default_str();
  serve->add_option("--precision", serve_opt.precision,
                    "GEMM precision: f32, bf16 or auto (default: the checkpoint's)");

  sy::cli::GenerateCliOptions gen_opt;
  CLI::App* generate = app.add_subcommand("generate", "Sample text from a checkpoint");
  generate->add_option("--checkpoint", gen_opt.checkpoint, "Checkpoint file");
  generate->add_option("--model", gen_opt.model, "Hugging Face model directory (" + sy::supported_hf_architectures() + ")");
  generate->add_option("--prompt", gen_opt.prompt, "Text to continue");
  generate->add_option("--tokens", gen_opt.tokens, "Bytes to generate")->capture_default_str();
  generate->add_option("--temperature", gen_opt.temperature, "0: greedy")->capture_default_str();
  generate->add_option("--top-k", gen_opt.top_k, "Keep the k likeliest (0: off)")
      ->capture_default_str();
  generate->add_option("--top-p", gen_opt.top_p, "Nucleus mass (1: off)")->capture_default_str();
  generate->add_option("--seed", gen_opt.seed, "Sampling seed")->capture_default_str();
  generate->add_option("--threads", gen_opt.threads, "Threads")->capture_default_str();
  generate->add_option("--precision", gen_opt.precision,
                       "GEMM precision f32, bf16 or auto (default: f32 with --model, the checkpoint's own)");

  sy::cli::ExportCliOptions export_opt;
  CLI::App* export_cmd = app.add_subcommand(
      "export", "Write a trained model as a Hugging Face directory (mixtral, or llama if dense)");
  export_cmd->add_option("--checkpoint", export_opt.checkpoint, "Run directory or checkpoint file")
      ->required();
  export_cmd->add_option("--out", export_opt.out, "Directory to write")->required();

  sy::cli::CompareCliOptions cmp_opt;
  CLI::App* compare = app.add_subcommand(
      "compare", "Train an MoE config and a dense one (austen-moe, austen-dense) and compare");
  compare->add_option("--moe", cmp_opt.moe, "MoE config")->capture_default_str();
  compare->add_option("--dense", cmp_opt.dense, "Dense config")->capture_default_str();
  compare->add_option("--steps", cmp_opt.steps, "Steps of both runs (default: the configs')");
  compare->add_option("--out", cmp_opt.out, "Directory of both runs")->capture_default_str();
  compare->add_option("--threads", cmp_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();

  sy::cli::SweepCliOptions sweep_opt;
  CLI::App* sweep = app.add_subcommand(
      "sweep", "Train dense and MoE with E = 4 .. 64 experts at equal active FLOPs; tabulate");
  sweep->add_option("--moe", sweep_opt.moe, "MoE config (its E is the main pair's)")
      ->capture_default_str();
  sweep->add_option("--dense", sweep_opt.dense, "Dense config")->capture_default_str();
  sweep->add_option("--experts", sweep_opt.experts, "Expert counts")
      ->delimiter(',')->capture_default_str();
  sweep->add_option("--seeds", sweep_opt.seeds, "Seeds of every config")
      ->delimiter(',')->capture_default_str();
  sweep->add_option("--main-seeds", sweep_opt.main_seeds,
                    "More seeds of the main pair (dense, and MoE at the --moe config's E)")
      ->delimiter(',')->capture_default_str();
  sweep->add_option("--steps", sweep_opt.steps, "Steps of every run (default: the configs')");
  sweep->add_option("--out", sweep_opt.out, "Directory of the runs and the report")
      ->capture_default_str();
  sweep->add_option("--threads", sweep_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();
  sweep->add_flag("--plan", sweep_opt.plan_only, "Print the runs and their FLOPs; train nothing");

  sy::cli::RoutesCliOptions routes_opt;
  CLI::App* routes = app.add_subcommand(
      "routes", "Per layer and expert: load, drops, entropy, co-selection, specialisation");
  routes->add_option("--checkpoint", routes_opt.checkpoint, "Checkpoint file");
  routes->add_option("--model", routes_opt.model,
                     "Hugging Face model directory (" + sy::supported_hf_architectures() + ")");
  routes->add_option("--data", routes_opt.data,
                    "Text file (default: the checkpoint's data.path); vision and multimodal "
                    "checkpoints: the image directory");
  routes->add_option("--max-tokens", routes_opt.max_tokens, "Validation tokens (0: all)")
      ->capture_default_str();
  routes->add_option("--html", routes_opt.html,
                     "HTML report (default: routes.html beside the checkpoint; with --model, in "
                     "the working directory)");
  routes->add_option("--threads", routes_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();

  sy::cli::BenchRoutersCliOptions br_opt;
  CLI::App* bench_routers = bench->add_subcommand(
      "routers", "Layer time of every routing policy against softmax top-k at a benchmark shape");
  bench_routers->add_option("--shape", br_opt.shape, "A or B")->capture_default_str();
  bench_routers->add_option("--policies", br_opt.policies, "Policies (default: all)");
  bench_routers->add_option("--iters", br_opt.iters, "Timed rounds")->capture_default_str();
  bench_routers->add_option("--capacity-factor", br_opt.capacity_factor, "Capacity factor")
      ->capture_default_str();
  bench_routers->add_option("--threads", br_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();
  bench_routers->add_option("--json", br_opt.json_path, "Also write JSON (- for stdout)");
  sy::cli::CompareRoutersCliOptions cr_opt;
  CLI::App* compare_routers = app.add_subcommand(
      "compare-routers", "Train the default model with each routing policy and tabulate");
  compare_routers->add_option("--config", cr_opt.config, "Base config")->capture_default_str();
  compare_routers->add_option("--policies", cr_opt.policies, "Policies to run (default: all)");
  compare_routers->add_option("--steps", cr_opt.steps, "Steps per policy")->capture_default_str();
  compare_routers->add_option("--out", cr_opt.out, "Directory of the runs")->capture_default_str();
  compare_routers->add_option("--threads", cr_opt.threads, "Threads (0: all cores)")
      ->capture_default_str();

  if (const std::string err = unknown_subcommand(app, argc, argv); !err.empty()) {
    fmt::print(stderr, "error: {}\n", err);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ExtrasError& e) {
    std::string msg = e.what();
    for (const std::string& extra : app.remaining(true)) {
      const std::string hint = extra.rfind("--", 0) == 0 ? closest_flag(app, extra) : "";
      if (!hint.empty()) msg += fmt::format(" (did you mean {}?)", hint);
    }
    fmt::print(stderr, "error: {}\n", msg);
    return 2;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }

  try {
    if (bench_moe->parsed()) return sy::cli::run_bench_moe(moe_opt);
    if (bench_train->parsed()) return sy::cli::run_bench_train(bt_opt);
    if (bench_serve->parsed()) return sy::cli::run_bench_serve(bs_opt);
    if (bench_model->parsed()) return sy::cli::run_bench_model(bm_opt);
    if (train->parsed()) return sy::cli::run_train(train_opt);
    if (eval->parsed()) return sy::cli::run_eval(eval_opt);
    if (superclasses->parsed()) return sy::cli::run_superclasses(sc_opt);
    if (generate->parsed()) return sy::cli::run_generate(gen_opt);
    if (serve->parsed()) return sy::cli::run_serve(serve_opt);
    if (export_cmd->parsed()) return sy::cli::run_export(export_opt);
    if (compare->parsed()) return sy::cli::run_compare(cmp_opt);
    if (sweep->parsed()) return sy::cli::run_sweep(sweep_opt);
    if (routes->parsed()) return sy::cli::run_routes(routes_opt);
    if (compare_routers->parsed()) return sy::cli::run_compare_routers(cr_opt);
    if (bench_routers->parsed()) return sy::cli::run_bench_routers(br_opt);
#ifdef SY_WITH_MPI
    if (bench_ep->parsed()) return sy::cli::run_bench_ep(ep_opt);
#endif
  } catch (const sy::ConfigError& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  } catch (const sy::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    // A size no check above caught: say so and exit with a status, not a signal.
    fmt::print(stderr, "error: out of memory (a size in the input may be larger than intended)\n");
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: internal: {}\n", e.what());
    return 1;
  }
  return 0;
}
