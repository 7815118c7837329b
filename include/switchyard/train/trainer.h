// The training loop: batches from the corpus, forward, backward, clipping, AdamW, MoE bias
// balancing, periodic validation and checkpoints, a progress line, and at the end an HTML
// report. A stop request (Ctrl-C in the CLI) ends the run after the current step with a clean
// checkpoint. --resume continues from a checkpoint to the same losses as an unbroken run.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "switchyard/nn/model.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/data.h"
#include "switchyard/train/run_config.h"

namespace sy {

struct TrainOptions {
  std::string out_dir;        // checkpoint.safetensors and report.html go here
  bool resume = false;        // continue out_dir's checkpoint (its model config must match)
  // Start from these parameters instead of a random initialisation (fine-tuning; shapes must be
  // those of cfg.model); the optimizer starts fresh. Not with resume.
  const LmParams* init = nullptr;
  int n_threads = 0;          // 0: all cores
  std::FILE* log = stdout;    // progress lines; nullptr: silent
  const std::atomic<bool>* stop = nullptr;  // set: finish the step, checkpoint, return
  int64_t stop_after = -1;    // >= 0: stop after this many steps as if asked to (tests)
  // Expert and data parallelism (dist/): every rank calls train() with the same config; each
  // trains batch / world_size of every step's sequences and holds its share of the experts.
  // World rank 0 logs and writes the checkpoint (the whole model) and report. nullptr: one
  // process.
  const ParallelGroup* parallel = nullptr;
  bool exchange_bf16 = false;  // with parallel: rows cross ranks as bf16 (ExecContext)
  bool exchange_overlap = false;  // with parallel: exchanges overlap expert compute (ExecContext)
};

struct TrainResult {
  int64_t steps_done = 0;
  bool interrupted = false;
  double final_val_loss = 0;
  double tokens_per_s = 0;    // mean over the run's steps, evaluation excluded (all ranks)
  double exchange_seconds = 0;  // expert parallelism: all-to-all time per step, mean over ranks
  double seconds = 0;
  TrainHistory history;
  std::string checkpoint, report;
};

TrainResult train(const RunConfig& cfg, const TrainOptions& opt);

// Mean cross-entropy (nats per token) of the model over the batches. With ctx.parallel, each
// rank scores its share of every batch's sequences and the mean is over all of them.
double evaluate(const LanguageModel& model, const LmParams& p, const std::vector<Batch>& batches,
                const ExecContext& ctx);

// -log softmax(logits)[target] of one row of logits, in nats, computed in float64.
double next_token_nats(std::span<const float> logits, int32_t target);

// Cross-entropy summed per document over a labelled corpus's validation batches (Batch::doc),
// and the targets counted: loss of document d = nats / targets. One process (no ctx.parallel).
struct DocLoss {
  double nats = 0;
  int64_t targets = 0;
  double mean() const { return targets > 0 ? nats / double(targets) : 0.0; }
};
std::vector<DocLoss> evaluate_by_doc(const LanguageModel& model, const LmParams& p,
                                     const std::vector<Batch>& batches, int64_t n_docs,
                                     const ExecContext& ctx);

// The HTML report: loss curves and per-layer expert load over training, as inline SVG.
std::string render_report(const RunConfig& cfg, const TrainHistory& history);
// Validation loss of several runs against steps: one standalone SVG (up to 8 colours).
std::string render_loss_svg(const std::vector<std::string>& names,
                            const std::vector<const TrainHistory*>& histories,
                            const std::string& title);
// Validation loss of several runs on one plot, with a line of text under it.
std::string render_comparison(const std::vector<std::string>& names,
                              const std::vector<const TrainHistory*>& histories,
                              const std::string& caption);

}  // namespace sy
