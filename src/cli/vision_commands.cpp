// Vision runs from the command line: train (then the test-set figures), eval (accuracy, per-class
// accuracy, confusion matrix, what each expert receives).
#include "cli/vision_commands.h"

#include <filesystem>

#include "switchyard/core/error.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/core/file.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/superclass.h"
#include "switchyard/train/vision.h"

namespace sy::cli {

namespace {

void print_eval(const VisionRunConfig& cfg, const VisionEval& ev, const std::string& split) {
  const ConfusionMatrix& cm = ev.confusion;
  const int64_t K = cm.n_classes;
  fmt::print("{} split: {} images, accuracy {:.2f}%, loss {:.4f} nats, {:.0f} images/s\n", split,
             cm.total(), 100 * cm.accuracy(), ev.loss, ev.images_per_s);
  const std::vector<double> per_class = cm.per_class_accuracy();
  fmt::print("\nper-class accuracy\n");
  for (int64_t c = 0; c < K; ++c)
    fmt::print("  {:>12}  {:6.2f}%\n", image_class_name(c, K), 100 * per_class[c]);
  fmt::print("\nconfusion matrix (rows: true class, columns: predicted)\n{:>14}", "");
  for (int64_t q = 0; q < K; ++q) fmt::print(" {:>5}", q);
  fmt::print("\n");
  for (int64_t c = 0; c < K; ++c) {
    fmt::print("  {:>2} {:>9}", c, image_class_name(c, K).substr(0, 9));
    for (int64_t q = 0; q < K; ++q) fmt::print(" {:5d}", cm.at(c, q));
    fmt::print("\n");
  }
  const int64_t E = cfg.model.moe.n_experts;
  for (size_t m = 0; m < ev.expert_class.size(); ++m) {
    fmt::print("\nMoE layer {}: first-choice {} per expert, by true class\n", m,
               cfg.model.routing == VitRouting::kPerImage ? "images" : "patches");
    fmt::print("{:>8}", "expert");
    for (int64_t c = 0; c < K; ++c) fmt::print(" {:>6}", c);
    fmt::print("\n");
    for (int64_t e = 0; e < E; ++e) {
      fmt::print("{:>8}", e);
      for (int64_t c = 0; c < K; ++c) fmt::print(" {:6d}", ev.expert_class[m][size_t(e * K + c)]);
      fmt::print("\n");
    }
  }
}

}  // namespace

int train_vision_cli(const TrainCliOptions& o) {
  if (o.expert_parallel > 0)
    throw ConfigError("--expert-parallel with a vision config: expected a single-process run");
  std::vector<std::string> overrides = o.overrides;
  if (o.steps > 0) overrides.push_back(fmt::format("train.steps={}", o.steps));
  VisionRunConfig cfg = load_vision_config(o.config, overrides);
  const std::string out =
      o.out.empty() ? (std::filesystem::path("runs") / std::filesystem::path(o.config).stem()).string()
                    : o.out;
  const VisionData data = load_vision_data(cfg.data, cfg.train.seed, cfg.model);
  const StopSignals guard;
  const VisionRun run = train_vision(cfg, data, out,
                                     {.threads = o.threads, .quiet = false, .log = {},
                                      .resume = o.resume, .stop = StopSignals::flag(),
                                      .stop_after = -1});
  if (run.interrupted) {
    fmt::print("{}: stopped after step {} of {}; continue with the same command and --resume\n",
               cfg.name, run.steps, cfg.train.steps);
    return 0;
  }
  const VisionTransformer vit(cfg.model);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  ctx.backend = &pick_backend(cpu_features(), cfg.model.precision);
  const VisionEval ev = evaluate_vision(vit, run.params, data.test, 256, ctx);
  fmt::print("{}: {} steps in {:.1f} s on {} ({:.0f} training images/s); validation accuracy "
             "{:.2f}%, test accuracy {:.2f}%; checkpoint {}/checkpoint.safetensors\n",
             cfg.name, run.steps, run.seconds, cpu_features().describe(), run.train_images_per_s,
             100 * run.val_accuracy, 100 * ev.confusion.accuracy(), out);
  return 0;
}

int eval_vision_cli(const EvalCliOptions& o, const std::string& checkpoint) {
  VisionCheckpoint ck = load_vision_checkpoint(checkpoint);
  if (!o.overrides.empty()) {
    ck.cfg = parse_vision_config(vision_config_json(ck.cfg), checkpoint, o.overrides);
    VisionTransformer(ck.cfg.model).check_params(ck.params);  // a changed shape is named here
  }
  VisionDataConfig data_cfg = ck.cfg.data;
  if (!o.data.empty()) data_cfg.dir = o.data;
  const VisionData data = load_vision_data(data_cfg, ck.cfg.train.seed, ck.cfg.model);
  if (o.split != "test" && o.split != "val")
    throw ConfigError(fmt::format("--split {}: expected test or val", o.split));
  const VisionTransformer vit(ck.cfg.model);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  ctx.backend = &pick_backend(cpu_features(), ck.cfg.model.precision);
  fmt::print(stderr, "{}\n", describe_kernels(ck.cfg.model.precision));
  const VisionEval ev =
      evaluate_vision(vit, ck.params, o.split == "test" ? data.test : data.val, 256, ctx);
  fmt::print("{} (step {}), {:.2f} MFLOPs per image\n", checkpoint, ck.step,
             2.0 * double(ck.cfg.model.macs_per_image()) / 1e6);
  print_eval(ck.cfg, ev, o.split);
  return 0;
}

int run_superclasses(const SuperclassesCliOptions& o) {
  const std::string path = find_checkpoint(o.checkpoint);
  const VisionCheckpoint ck = load_vision_checkpoint(path);
  const VisionData data = load_vision_data(ck.cfg.data, ck.cfg.train.seed, ck.cfg.model);
  const VisionTransformer vit(ck.cfg.model);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  ctx.backend = &pick_backend(cpu_features(), ck.cfg.model.precision);
  // The validation split: the test set stays for the final figures alone.
  const VisionEval ev = evaluate_vision(vit, ck.params, data.val, 256, ctx);
  const SuperClasses s = cluster_classes(ev.confusion, o.experts);
  const int64_t K = ev.confusion.n_classes;
  std::vector<std::string> names;
  for (int64_t c = 0; c < K; ++c) names.push_back(image_class_name(c, K));
  const std::filesystem::path out =
      o.out.empty() ? std::filesystem::path(path).parent_path() / "superclasses.json"
                    : std::filesystem::path(o.out);
  write_file_atomic(out.string(), superclasses_json(s, ev.confusion, names));
  std::filesystem::path svg = out;
  svg.replace_extension(".svg");
  write_file_atomic(svg.string(), superclasses_svg(s, ev.confusion, names));
  fmt::print("{} (step {}): validation accuracy {:.2f}% on {} images\n", path, ck.step,
             100 * ev.confusion.accuracy(), ev.confusion.total());
  for (int64_t g = 0; g < o.experts; ++g) {
    std::string members;
    for (int64_t c = 0; c < K; ++c)
      if (s.of_class[c] == g) members += (members.empty() ? "" : ", ") + names[c];
    fmt::print("  super-class {}: {}\n", g, members);
  }
  fmt::print("{:.1f}% of the confusion weight inside the super-classes ({}); wrote {} and {}\n",
             s.total > 0 ? 100 * s.inside / s.total : 0.0,
             s.exact ? "optimal balanced cut" : "local search", out.string(), svg.string());
  return 0;
}

int compare_vision_cli(const CompareCliOptions& o) {
  std::vector<std::string> overrides;
  if (o.steps > 0) overrides.push_back(fmt::format("train.steps={}", o.steps));
  const VisionRunConfig dense = load_vision_config(o.dense, overrides),
                        moe = load_vision_config(o.moe, overrides);
  struct Result {
    const VisionRunConfig* cfg;
    VisionData data;
    VisionRun run;
    VisionEval test;
  };
  std::vector<Result> results;
  for (const VisionRunConfig* cfg : {&dense, &moe}) {
    const std::string dir =
        (std::filesystem::path(o.out) / std::filesystem::path(cfg->name).stem()).string();
    if (std::filesystem::exists(std::filesystem::path(dir) / "checkpoint.safetensors"))
      throw ConfigError(fmt::format("{}/checkpoint.safetensors exists: pass --out to compare into "
                                    "another directory (nothing was overwritten)",
                                    dir));
    fmt::print("== {} ({:.2f} MFLOPs per image)\n", cfg->name,
               2.0 * double(cfg->model.macs_per_image()) / 1e6);
    Result& r = results.emplace_back(
        Result{cfg, load_vision_data(cfg->data, cfg->train.seed, cfg->model), {}, {}});
    r.run = train_vision(*cfg, r.data, dir, {.threads = o.threads, .quiet = false, .log = {}});
  }
  // Both models' test figures back to back, so that their inference speeds share the machine's
  // state.
  for (Result& r : results) {
    ExecContext ctx;
    ctx.n_threads = o.threads;
    ctx.backend = &pick_backend(cpu_features(), r.cfg->model.precision);
    r.test = evaluate_vision(VisionTransformer(r.cfg->model), r.run.params, r.data.test, 256, ctx);
  }
  fmt::print("\n| config | MFLOPs/image | parameters | test accuracy | train s | train images/s | "
             "inference images/s |\n|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Result& r : results)
    fmt::print("| {} | {:.2f} | {} | {:.2f}% | {:.0f} | {:.0f} | {:.0f} |\n", r.cfg->name,
               2.0 * double(r.cfg->model.macs_per_image()) / 1e6, r.cfg->model.total_params(),
               100 * r.test.confusion.accuracy(), r.run.seconds, r.run.train_images_per_s,
               r.test.images_per_s);
  fmt::print("{}: {:+.2f} points of test accuracy over {}, inference {:.2f}x its images/s, on {}\n",
             moe.name, 100 * (results[1].test.confusion.accuracy() - results[0].test.confusion.accuracy()),
             dense.name, results[1].test.images_per_s / results[0].test.images_per_s,
             cpu_features().describe());
  return 0;
}

int vision_routes_cli(const RoutesCliOptions& o, const std::string& checkpoint) {
  const VisionCheckpoint ck = load_vision_checkpoint(checkpoint);
  if (ck.cfg.model.n_moe_layers() == 0)
    throw ConfigError(fmt::format("{}: a dense vision model has no routes", checkpoint));
  VisionDataConfig data_cfg = ck.cfg.data;
  if (!o.data.empty()) data_cfg.dir = o.data;
  const VisionData data = load_vision_data(data_cfg, ck.cfg.train.seed, ck.cfg.model);
  const VisionTransformer vit(ck.cfg.model);
  ExecContext ctx;
  ctx.n_threads = o.threads;
  ctx.backend = &pick_backend(cpu_features(), ck.cfg.model.precision);
  const VisionEval ev = evaluate_vision(vit, ck.params, data.val, 256, ctx);
  fmt::print("{} (step {}), validation split ({} images)\n{}", checkpoint, ck.step, data.val.n,
             render_vision_routes_text(ck.cfg, ev));
  const std::string html = o.html.empty()
                               ? (std::filesystem::path(checkpoint).parent_path() / "routes.html").string()
                               : o.html;
  write_file_atomic(html, render_vision_routes_html(ck.cfg, ev, data.val, checkpoint));
  fmt::print("wrote {}\n", html);
  return 0;
}

}  // namespace sy::cli
