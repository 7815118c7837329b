// The experts sweep: a dense model and MoE models with E = 4 .. 64 experts at the same active
// FLOPs per token, trained on the same data order for the same steps, and the table, plot and
// per-language comparison that show how the MoE gain grows with E.
//
//   std::vector<SweepRun> runs = plan_sweep(load_run_config("udhr-moe"),
//                                           load_run_config("udhr-dense"), {4, 8, 16, 32, 64},
//                                           {1}, {1, 2});
//   SweepReport r = run_sweep(runs, {.out_dir = "runs/sweep"});
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/train/checkpoint.h"
#include "switchyard/train/run_config.h"
#include "switchyard/train/trainer.h"

namespace sy {

struct SweepRun {
  std::string name;  // "udhr-dense-s1", "udhr-moe-e32-s1": its directory under the sweep's
  int64_t experts = 0;  // 0: the dense model
  uint64_t seed = 1;
  RunConfig cfg;
};

// The expert width that gives an MoE layer of `experts` experts (top-k and router from `moe`)
// the active parameters per token of the dense layer of width `dense_ff`: router plus k experts
// equal to one dense SwiGLU, rounded to the nearest multiple of 8 (GEMM-friendly), at least 8.
int64_t equal_flops_expert_width(const LmConfig& moe, int64_t dense_ff, int64_t experts);

// Every run of the sweep: for each seed of `seeds` the dense config and the MoE config at each
// E of `experts`; for the seeds of `main_seeds` not in `seeds`, also the dense config and the
// MoE config at its own E (the main pair, for a spread over seeds). The MoE configs differ from
// `moe` only in moe.n_experts and moe.d_ff (equal_flops_expert_width), the dense one from
// `dense` only in train.seed; both must agree in train.steps, batch and eval_interval and in
// everything but the FFN. Throws ConfigError naming what differs.
std::vector<SweepRun> plan_sweep(const RunConfig& moe, const RunConfig& dense,
                                 const std::vector<int64_t>& experts,
                                 const std::vector<uint64_t>& seeds,
                                 const std::vector<uint64_t>& main_seeds);

struct SweepOptions {
  std::string out_dir = "runs/sweep";
  int n_threads = 0;
  std::FILE* log = stdout;
  const std::atomic<bool>* stop = nullptr;
};

struct SweepResult {
  SweepRun run;
  TrainHistory history;
  double final_val_loss = 0;  // the last periodic evaluation (same windows for every run)
  double tokens_per_s = 0;    // training, from the history's steps (0 where unknown)
  std::vector<DocLoss> doc_loss;  // the whole validation split, per document
  double val_loss_all = 0;        // the same, over all documents' targets
};

struct SweepReport {
  std::vector<SweepResult> results;  // in plan order
  bool interrupted = false;
  std::string markdown, svg;         // also written to out_dir/sweep.md and sweep.svg
};

// Trains each run into out_dir/<name> (a finished run there with the same config is reused, an
// unfinished one resumed; another config there is an error, nothing overwritten), scores each
// finished model on the whole validation split per document (kept in doc_loss.json beside
// its checkpoint), and writes the report.
SweepReport run_sweep(const std::vector<SweepRun>& runs, const SweepOptions& opt);

// The report of finished results: one table (per run: E, expert width, active and total
// parameters, final loss, steps and wall-clock time to the same seed's dense final loss,
// share of languages where it beats dense), the per-language gap, and the loss curves.
std::string render_sweep_markdown(const std::vector<SweepResult>& results,
                                  const std::vector<CorpusDoc>& docs);

// First evaluated step whose validation loss is at or below `target`; -1 if none.
int64_t steps_to_reach(const TrainHistory& h, double target);

}  // namespace sy
