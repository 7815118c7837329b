// `switchyard train`, `eval`, `generate`, `export` and `compare`: the language-model
// subcommands.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace sy {
struct HfModel;
}

namespace sy::cli {

// The held-out part of a text file (the last 5% of each document; data/austen.txt.gz when
// `data` is empty) and, when the model has a tokenizer, its ids as that tokenizer cuts it (no
// special tokens): what eval, routes and bench model run a Hugging Face model on.
struct HeldOutText {
  std::string path, text;
  std::vector<int32_t> ids;
};
HeldOutText held_out_text(const HfModel& m, const std::string& data);

// For the life of a training run: the first SIGINT (Ctrl-C), SIGTERM or SIGUSR1 sets flag(), so
// the run finishes its step, writes a checkpoint it can resume from and exits 0; a second one
// ends the process at once.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  static const std::atomic<bool>* flag();

 private:
  void (*old_int_)(int) = nullptr;
  void (*old_term_)(int) = nullptr;
  void (*old_usr1_)(int) = nullptr;
};

struct TrainCliOptions {
  std::string config = "austen-moe";
  std::vector<std::string> overrides;  // --set key=value
  int64_t steps = 0;                   // > 0: overrides train.steps
  std::string out;                     // default runs/<config name>
  bool resume = false;
  // A Hugging Face mixtral / llama directory to fine-tune: the model's shape comes from it (the
  // rest of --config stays), its weights replace the random initialisation.
  std::string init_from;
  int threads = 0;
  int expert_parallel = 0;       // > 0: ranks per expert group (run under mpirun)
  double comm_timeout = 300;     // seconds a collective may wait on a peer
  std::string exchange = "f32";  // dtype of the rows crossing ranks: f32 or bf16
  std::string overlap = "auto";  // the exchanges overlap expert compute: on, off, auto (across hosts)
};
int run_train(const TrainCliOptions& o);

struct EvalCliOptions {
  std::string checkpoint;
  std::string model;       // a Hugging Face model directory instead of a checkpoint
  std::string data;        // default: the checkpoint's data.path
  int64_t max_tokens = 0;  // 0: the whole validation split
  std::string split = "test";  // vision checkpoints: test or val
  // Vision checkpoints: overrides of the checkpoint's config for evaluation, e.g.
  // model.moe.capacity_factor_eval=0.5 (those that change a weight's shape are refused).
  std::vector<std::string> overrides;
  int threads = 0;
  std::string precision;  // f32, bf16, auto; empty: f32 for --model, else the checkpoint's
};
int run_eval(const EvalCliOptions& o);

struct GenerateCliOptions {
  std::string checkpoint;
  std::string model;  // a Hugging Face model directory instead of a checkpoint
  std::string prompt = "\n";
  int64_t tokens = 300;
  double temperature = 0.8;
  int64_t top_k = 0;    // 0: off
  double top_p = 0.95;  // 1: off
  uint64_t seed = 1;
  int threads = 1;
  std::string precision;  // f32, bf16, auto; empty: f32 for --model, else the checkpoint's
};
int run_generate(const GenerateCliOptions& o);

struct ServeCliOptions {
  std::string checkpoint;  // a run directory or a checkpoint
  std::string model;       // a Hugging Face model directory: refused for now, named
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port
  std::string name;  // the model's id in the API; default: the config's name
  int64_t max_batch = 32;
  int64_t max_waiting = 256;
  int64_t prefill_chunk = 64;
  int64_t step_tokens = 256;
  double timeout = 300;  // seconds a request may take
  size_t max_body = 1 << 20;
  int threads = 0;
  std::string precision;  // GEMM precision: f32, bf16 or auto; default: the checkpoint's
};
int run_serve(const ServeCliOptions& o);

struct ExportCliOptions {
  std::string checkpoint;  // a run directory or its checkpoint.safetensors
  std::string out;         // the Hugging Face model directory to write
};
int run_export(const ExportCliOptions& o);

struct CompareCliOptions {
  std::string moe = "austen-moe", dense = "austen-dense";
  int64_t steps = 0;  // > 0: both configs' train.steps
  std::string out = "runs/compare";
  int threads = 0;
};
int run_compare(const CompareCliOptions& o);

struct SweepCliOptions {
  std::string moe = "udhr-moe", dense = "udhr-dense";
  std::vector<int64_t> experts = {4, 8, 16, 32, 64};
  std::vector<uint64_t> seeds = {1};
  std::vector<uint64_t> main_seeds = {1, 2};
  int64_t steps = 0;  // > 0: every run's train.steps
  std::string out = "runs/sweep";
  int threads = 0;
  bool plan_only = false;
};
int run_sweep(const SweepCliOptions& o);

struct RoutesCliOptions {
  std::string checkpoint;
  std::string model;          // a Hugging Face model directory instead of a checkpoint
  std::string data;           // default: the checkpoint's data.path
  int64_t max_tokens = 65536; // validation tokens to route (0: all)
  std::string html;           // default: routes.html beside the checkpoint
  int threads = 0;
};
int run_routes(const RoutesCliOptions& o);

struct CompareRoutersCliOptions {
  std::string config = "austen-moe";
  std::vector<std::string> policies;  // empty: all
  int64_t steps = 150;
  std::string out = "runs/routers";
  int threads = 0;
};
int run_compare_routers(const CompareRoutersCliOptions& o);

// `switchyard bench routers`: the MoE layer alone at a foundation benchmark shape under each
// compare-routers policy; median forward and forward+backward time against softmax top-k,
// timed round-robin in the same run so drift on a shared machine hits every policy alike.
struct BenchRoutersCliOptions {
  std::string shape = "A";
  std::vector<std::string> policies;  // empty: all
  int iters = 7;
  double capacity_factor = 1.25;  // expert choice and batch prioritized routing need one
  int threads = 0;
  std::string json_path;
};
int run_bench_routers(const BenchRoutersCliOptions& o);

}  // namespace sy::cli
