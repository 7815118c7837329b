// The multimodal commands: train, eval (per task, by split), routes (by modality), compare (an
// MoE config against its dense twin, each task's test figure).
#include "cli/multimodal_commands.h"

#include <cmath>
#include <filesystem>

#include "switchyard/core/error.h"
#include "switchyard/core/file.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/train/multimodal.h"

namespace sy::cli {

namespace {

ExecContext context_for(const MultimodalConfig& m, int threads) {
  ExecContext ctx;
  ctx.n_threads = threads;
  ctx.backend = &pick_backend(cpu_features(), m.precision);
  return ctx;
}

MmSplit parse_split(const std::string& split) {
  if (split == "test") return MmSplit::kTest;
  if (split == "val") return MmSplit::kVal;
  throw ConfigError(fmt::format("--split {}: expected test or val", split));
}

std::string figures(const MmEval& ev) {
  return fmt::format("image accuracy {:.2f}% (cross-entropy {:.4f}), text {:.4f} nats/byte ({:.3f} "
                     "bits), control MSE {:.5f}",
                     100 * ev.image_accuracy, ev.loss[0], ev.loss[1], ev.loss[1] / std::log(2.0),
                     ev.loss[2]);
}

}  // namespace

int train_multimodal_cli(const TrainCliOptions& o) {
  if (o.expert_parallel > 0)
    throw ConfigError("--expert-parallel with a multimodal config: expected a single-process run");
  std::vector<std::string> overrides = o.overrides;
  if (o.steps > 0) overrides.push_back(fmt::format("train.steps={}", o.steps));
  const MultimodalRunConfig cfg = load_multimodal_config(o.config, overrides);
  const std::string out =
      o.out.empty() ? (std::filesystem::path("runs") / std::filesystem::path(o.config).stem()).string()
                    : o.out;
  const MultimodalData data = load_multimodal_data(cfg);
  const StopSignals guard;
  const MultimodalRun run = train_multimodal(
      cfg, data, out,
      {.threads = o.threads, .quiet = false, .log = {}, .resume = o.resume,
       .stop = StopSignals::flag(), .stop_after = -1});
  if (run.interrupted) {
    fmt::print("{}: stopped after step {} of {}; continue with the same command and --resume\n",
               cfg.name, run.steps, cfg.train.steps);
    return 0;
  }
  const MmEval test =
      evaluate_multimodal(MultimodalModel(cfg.model), run.params, data, MmSplit::kTest, cfg,
                          context_for(cfg.model, o.threads), cfg.data.eval_batches);
  fmt::print("{}: {} steps in {:.1f} s on {}\n  validation: {}\n  test:       {}\ncheckpoint "
             "{}/checkpoint.safetensors\n",
             cfg.name, run.steps, run.seconds, cpu_features().describe(), figures(run.val),
             figures(test), out);
  return 0;
}

int eval_multimodal_cli(const EvalCliOptions& o, const std::string& checkpoint) {
  MultimodalCheckpoint ck = load_multimodal_checkpoint(checkpoint);
  if (!o.overrides.empty()) {
    ck.cfg = parse_multimodal_config(multimodal_config_json(ck.cfg), checkpoint, o.overrides);
    MultimodalModel(ck.cfg.model).check_params(ck.params);  // a changed shape is named here
  }
  if (!o.data.empty()) ck.cfg.data.image_dir = o.data;
  const MmSplit split = parse_split(o.split);
  const MultimodalData data = load_multimodal_data(ck.cfg);
  fmt::print(stderr, "{}\n", describe_kernels(ck.cfg.model.precision));
  const MmEval ev =
      evaluate_multimodal(MultimodalModel(ck.cfg.model), ck.params, data, split, ck.cfg,
                          context_for(ck.cfg.model, o.threads), ck.cfg.data.eval_batches);
  fmt::print("{} (step {}), {} split: {} images, {} text bytes scored, {} control steps\n{}\n",
             checkpoint, ck.step, o.split, ev.count[0], ev.count[1], ev.count[2], figures(ev));
  for (size_t l = 0; l < ev.nmi.size(); ++l)
    fmt::print("MoE layer {}: NMI(modality; expert) {:.3f}; slots dropped: image {:.2f}%, text "
               "{:.2f}%, control {:.2f}%\n",
               l, ev.nmi[l], 100 * ev.dropped[l][0], 100 * ev.dropped[l][1],
               100 * ev.dropped[l][2]);
  return 0;
}

int multimodal_routes_cli(const RoutesCliOptions& o, const std::string& checkpoint) {
  MultimodalCheckpoint ck = load_multimodal_checkpoint(checkpoint);
  if (ck.cfg.model.n_moe_layers() == 0)
    throw ConfigError(fmt::format("{}: a dense multimodal model has no routes", checkpoint));
  if (!o.data.empty()) ck.cfg.data.image_dir = o.data;
  const MultimodalData data = load_multimodal_data(ck.cfg);
  const MmEval ev =
      evaluate_multimodal(MultimodalModel(ck.cfg.model), ck.params, data, MmSplit::kVal, ck.cfg,
                          context_for(ck.cfg.model, o.threads), ck.cfg.data.eval_batches);
  fmt::print("{} (step {}), validation split\n{}", checkpoint, ck.step,
             render_multimodal_routes_text(ck.cfg, ev));
  const std::string html = o.html.empty()
                               ? (std::filesystem::path(checkpoint).parent_path() / "routes.html").string()
                               : o.html;
  write_file_atomic(html, render_multimodal_routes_html(ck.cfg, ev, checkpoint));
  fmt::print("wrote {}\n", html);
  return 0;
}

int compare_multimodal_cli(const CompareCliOptions& o) {
  std::vector<std::string> overrides;
  if (o.steps > 0) overrides.push_back(fmt::format("train.steps={}", o.steps));
  const MultimodalRunConfig dense = load_multimodal_config(o.dense, overrides),
                            moe = load_multimodal_config(o.moe, overrides);
  struct Result {
    const MultimodalRunConfig* cfg;
    MultimodalRun run;
    MmEval test;
  };
  std::vector<Result> results;
  for (const MultimodalRunConfig* cfg : {&dense, &moe}) {
    const std::string dir =
        (std::filesystem::path(o.out) / std::filesystem::path(cfg->name).stem()).string();
    if (std::filesystem::exists(std::filesystem::path(dir) / "checkpoint.safetensors"))
      throw ConfigError(fmt::format("{}/checkpoint.safetensors exists: pass --out to compare into "
                                    "another directory (nothing was overwritten)",
                                    dir));
    fmt::print("== {} ({:.3f} M multiply-adds per row in the blocks)\n", cfg->name,
               double(cfg->model.block_macs_per_row()) / 1e6);
    const MultimodalData data = load_multimodal_data(*cfg);
    Result& r = results.emplace_back(Result{cfg, {}, {}});
    r.run = train_multimodal(*cfg, data, dir, {.threads = o.threads, .quiet = false, .log = {}});
    r.test = evaluate_multimodal(MultimodalModel(cfg->model), r.run.params, data, MmSplit::kTest,
                                 *cfg, context_for(cfg->model, o.threads), cfg->data.eval_batches);
  }
  fmt::print("\n| config | block MACs/row | parameters | image accuracy | image CE | text nats/byte "
             "| control MSE | NMI per MoE layer | train s |\n|---|---:|---:|---:|---:|---:|---:|---|---:|\n");
  for (const Result& r : results) {
    std::string nmi;
    for (double v : r.test.nmi) nmi += fmt::format("{}{:.3f}", nmi.empty() ? "" : ", ", v);
    fmt::print("| {} | {} | {} | {:.2f}% | {:.4f} | {:.4f} | {:.5f} | {} | {:.0f} |\n", r.cfg->name,
               r.cfg->model.block_macs_per_row(), r.cfg->model.total_params(),
               100 * r.test.image_accuracy, r.test.loss[0], r.test.loss[1], r.test.loss[2],
               nmi.empty() ? "-" : nmi, r.run.seconds);
  }
  const MmEval &d = results[0].test, &m = results[1].test;
  fmt::print("{} against {} (test): image CE {:+.4f}, text {:+.4f} nats/byte, control MSE {:+.5f} "
             "(negative: the MoE is better), on {}\n",
             moe.name, dense.name, m.loss[0] - d.loss[0], m.loss[1] - d.loss[1],
             m.loss[2] - d.loss[2], cpu_features().describe());
  return 0;
}

}  // namespace sy::cli
