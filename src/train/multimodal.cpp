// Multimodal runs: the three data sets, batches of the training mix, the training loop, the
// evaluation with routing by modality, checkpoints, the routes report.
#include "switchyard/train/multimodal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "switchyard/core/error.h"
#include "switchyard/core/file.h"
#include "switchyard/core/parallel.h"
#include "switchyard/core/rng.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/routes.h"
#include "switchyard/train/vision.h"
#include "train/params_checkpoint.h"

namespace sy {

namespace {

using nlohmann::json;

// Seeds of the three episode sets: one stream each, so no episode is in two of them.
constexpr uint64_t kEpisodeSplit = 0x5BD1E995ull;

std::string image_file(const MultimodalDataConfig& cfg, const std::string& name) {
  if (cfg.image_dir.empty()) return fashion_mnist_path(name);
  return (std::filesystem::path(resolve_data_path(cfg.image_dir)) / name).string();
}

ExecContext context_for(const MultimodalConfig& model, int threads) {
  ExecContext ctx;
  ctx.n_threads = threads;
  ctx.backend = &pick_backend(cpu_features(), model.precision);
  return ctx;
}

// Episodes [e0, e0 + n) of `set` as the model's control input and targets.
void control_rows(const ArmEpisodes& set, std::span<const int64_t> episodes, MmBatch& b) {
  const int64_t L = set.steps, n = int64_t(episodes.size());
  if (n == 0) {
    b.control = Tensor();
    b.control_targets = Tensor();
    return;
  }
  b.control.resize_for_overwrite({n * L, kArmFeatures}, DType::kF32);
  b.control_targets.resize_for_overwrite({n * L, kArmActions}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = episodes[i];
    std::memcpy(b.control.data<float>() + i * L * kArmFeatures,
                set.inputs.data() + e * L * kArmFeatures, size_t(L * kArmFeatures) * sizeof(float));
    std::memcpy(b.control_targets.data<float>() + i * L * kArmActions,
                set.actions.data() + e * L * kArmActions, size_t(L * kArmActions) * sizeof(float));
  }
}

void text_rows(const Batch& t, MmBatch& b) {
  b.text = t.tokens;
  b.text_targets = t.targets;
}

void zero(MmParams& g) {
  for (auto& [name, t] : g.named()) t->fill_zero();
}

// [modality][expert] counts of one layer.
std::vector<std::vector<double>> modality_by_expert(const std::vector<int64_t>& counts, int64_t E) {
  std::vector<std::vector<double>> joint(size_t(kModalities), std::vector<double>(size_t(E), 0.0));
  for (int64_t m = 0; m < kModalities; ++m)
    for (int64_t e = 0; e < E; ++e) joint[m][e] = double(counts[size_t(m * E + e)]);
  return joint;
}

}  // namespace

MultimodalData load_multimodal_data(const MultimodalRunConfig& cfg) {
  const MultimodalDataConfig& d = cfg.data;
  const MultimodalConfig& m = cfg.model;
  d.validate();
  MultimodalData out;
  ImageSet train = read_idx(image_file(d, "train-images-idx3-ubyte.gz"),
                            image_file(d, "train-labels-idx1-ubyte.gz"));
  out.test_images = read_idx(image_file(d, "t10k-images-idx3-ubyte.gz"),
                             image_file(d, "t10k-labels-idx1-ubyte.gz"));
  for (const ImageSet* s : {&train, &out.test_images}) {
    if (s->rows != m.image_rows || s->cols != m.image_cols)
      throw ConfigError(fmt::format("images are {} x {}: expected the model's {} x {} "
                                    "(model.image_rows, image_cols)",
                                    s->rows, s->cols, m.image_rows, m.image_cols));
    if (s->n_classes > m.n_classes)
      throw ConfigError(fmt::format("labels go up to {}: expected < {} (model.n_classes)",
                                    s->n_classes - 1, m.n_classes));
  }
  if (d.val_images >= train.n)
    throw ConfigError(fmt::format("data.val_images = {}: expected fewer than the {} training images",
                                  d.val_images, train.n));
  std::tie(out.train_images, out.val_images) = split_images(train, d.val_images, cfg.train.seed);
  out.text = load_corpus(resolve_data_path(d.text), d.text_val_fraction, m.text_context);
  const uint64_t seed = cfg.train.seed;
  out.train_control = arm_episodes(d.arm, d.train_episodes, m.control_steps, seed);
  out.val_control = arm_episodes(d.arm, d.val_episodes, m.control_steps, seed + kEpisodeSplit);
  out.test_control = arm_episodes(d.arm, d.val_episodes, m.control_steps, seed + 2 * kEpisodeSplit);
  return out;
}

MmEval evaluate_multimodal(const MultimodalModel& model, const MmParams& p,
                           const MultimodalData& data, MmSplit split,
                           const MultimodalRunConfig& cfg, const ExecContext& ctx_in,
                           int64_t max_batches) {
  const MultimodalConfig& mc = model.config();
  const MultimodalDataConfig& d = cfg.data;
  ExecContext ctx = ctx_in;
  ctx.training = false;
  const ImageSet& images = split == MmSplit::kVal ? data.val_images : data.test_images;
  const ArmEpisodes& control = split == MmSplit::kVal ? data.val_control : data.test_control;
  const int64_t Bi = d.images_per_step, Bt = d.text_per_step, Bc = d.control_per_step;
  auto batches = [](int64_t n, int64_t per) { return per > 0 ? (n + per - 1) / per : 0; };
  // Every batch keeps the training mix: by default as many batches as the held-out images
  // fill, with the text windows spread over its held-out part and the episodes taken in order.
  if (max_batches == 0 && Bi > 0) max_batches = batches(images.n, Bi);
  auto capped = [&](int64_t n, int64_t per) {
    return per == 0 ? 0 : max_batches > 0 ? std::min(n, max_batches * per) : n;
  };
  const int64_t n_img = capped(images.n, Bi), n_eps = capped(control.n, Bc);
  std::vector<Batch> text;
  if (Bt > 0)
    text = val_batches(data.text, Bt, mc.text_context,
                       max_batches > 0 ? max_batches * Bt * mc.text_context : 0);
  const int64_t nb = std::max({batches(n_img, Bi), int64_t(text.size()), batches(n_eps, Bc)});

  const int64_t E = mc.moe.n_experts, k = mc.moe.slots_per_token();
  MmEval ev;
  ev.modality_expert.assign(size_t(mc.n_moe_layers()), std::vector<int64_t>(size_t(kModalities * E), 0));
  std::array<double, kModalities> sums{};
  std::vector<std::array<int64_t, kModalities>> slots(size_t(mc.n_moe_layers())),
      drops(size_t(mc.n_moe_layers()));
  int64_t correct = 0, rows = 0;
  MmCache cache;
  MmBatch b;
  std::vector<int64_t> index;
  const double t0 = wall_seconds();
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t i0 = std::min(n_img, i * Bi), i1 = std::min(n_img, i0 + Bi);
    index.resize(size_t(i1 - i0));
    std::iota(index.begin(), index.end(), i0);
    if (index.empty()) {
      b.images = Tensor();
    } else {
      image_batch(images, index, b.images);
    }
    b.labels.assign(images.labels.begin() + i0, images.labels.begin() + i1);
    b.text.clear();
    b.text_targets.clear();
    if (i < int64_t(text.size())) text_rows(text[size_t(i)], b);
    const int64_t e0 = std::min(n_eps, i * Bc), e1 = std::min(n_eps, e0 + Bc);
    index.resize(size_t(e1 - e0));
    std::iota(index.begin(), index.end(), e0);
    control_rows(control, index, b);
    const MmStep s = model.forward(p, b, cache, ctx);
    for (int64_t m = 0; m < kModalities; ++m) {
      sums[m] += s.loss[m] * double(s.count[m]);
      ev.count[m] += s.count[m];
    }
    correct += s.image_correct;
    rows += cache.n_rows;
    int64_t layer = 0;
    for (int64_t l = 0; l < mc.n_layers; ++l) {
      if (!mc.is_moe(l)) continue;
      const MoeCache& moe = cache.layers[l].moe;
      for (int64_t r = 0; r < cache.n_rows; ++r) {
        const int64_t m = int64_t(MultimodalModel::row_modality(cache, r));
        ++ev.modality_expert[layer][size_t(m * E + moe.router.expert[size_t(r * k)])];
        slots[layer][m] += k;
        for (int64_t j = 0; j < k; ++j) drops[layer][m] += moe.plan.slot_row[size_t(r * k + j)] < 0;
      }
      ++layer;
    }
  }
  ev.rows_per_s = double(rows) / std::max(1e-9, wall_seconds() - t0);
  for (int64_t m = 0; m < kModalities; ++m)
    ev.loss[m] = ev.count[m] > 0 ? sums[m] / double(ev.count[m]) : 0.0;
  ev.image_accuracy = ev.count[0] > 0 ? double(correct) / double(ev.count[0]) : 0.0;
  for (const auto& counts : ev.modality_expert)
    ev.nmi.push_back(normalized_mutual_information(modality_by_expert(counts, E)));
  for (size_t l = 0; l < slots.size(); ++l) {
    std::array<double, kModalities> share{};
    for (int64_t m = 0; m < kModalities; ++m)
      share[m] = slots[l][m] > 0 ? double(drops[l][m]) / double(slots[l][m]) : 0.0;
    ev.dropped.push_back(share);
  }
  return ev;
}

MultimodalRun train_multimodal(const MultimodalRunConfig& cfg, const MultimodalData& data,
                               const std::string& out_dir, const MultimodalTrainOptions& opt) {
  auto log = [&](const std::string& line) {
    if (opt.quiet) return;
    if (opt.log) return opt.log(line);
    fmt::print(stderr, "{}\n", line);
  };
  const TrainConfig& t = cfg.train;
  const MultimodalDataConfig& d = cfg.data;
  const MultimodalModel model(cfg.model);
  if (cfg.model.n_moe_layers() > 0) cfg.model.moe.check_trainable(/*guided=*/false);
  std::filesystem::create_directories(out_dir);
  const std::string ck_path = (std::filesystem::path(out_dir) / "checkpoint.safetensors").string();
  const std::string history_path = (std::filesystem::path(out_dir) / "history.json").string();
  MultimodalRun run;
  run.params = init_mm_params(cfg.model, DType::kF32, t.seed);
  MmAdamW adam(t, run.params);
  int64_t start = 0;
  if (opt.resume) {
    detail::require_checkpoint(ck_path, out_dir);
    MultimodalCheckpoint ck = load_multimodal_checkpoint(ck_path, /*with_optimizer=*/true);
    detail::require_same_config(ck_path, multimodal_config_json(ck.cfg), multimodal_config_json(cfg));
    run.params = std::move(ck.params);
    adam = std::move(*ck.optimizer);
    start = ck.step;
  }
  MmParams g = zeros_like(run.params);
  ExecContext ctx = context_for(cfg.model, opt.threads);
  std::optional<MoeLayer> moe;
  if (cfg.model.n_moe_layers() > 0) moe.emplace(cfg.model.moe_config());
  log(describe_kernels(cfg.model.precision));
  log(fmt::format("{}: {} parameters, {:.3f} M multiply-adds per row in the blocks; each step {} "
                  "images, {} text sequences of {} bytes, {} arm episodes of {} steps",
                  cfg.name, cfg.model.total_params(), double(cfg.model.block_macs_per_row()) / 1e6,
                  d.images_per_step, d.text_per_step, cfg.model.text_context, d.control_per_step,
                  cfg.model.control_steps));

  const ImageSet& train = data.train_images;
  const int64_t Bi = d.images_per_step, px = train.rows * train.cols, n = train.n;
  const Philox rng(t.seed, /*stream=*/0x3A11);
  std::vector<int64_t> order(static_cast<size_t>(n)), all(static_cast<size_t>(Bi)), episodes;
  std::iota(all.begin(), all.end(), 0);
  ImageSet batch_set{.n = Bi, .rows = train.rows, .cols = train.cols,
                     .pixels = std::vector<uint8_t>(static_cast<size_t>(Bi * px)), .labels = {},
                     .n_classes = 0};
  MmBatch b;
  b.labels.resize(size_t(Bi));
  MmCache cache;
  json history = detail::resumed_history(history_path, start);
  if (start > 0) log(fmt::format("resuming {} at step {} of {}", ck_path, start, t.steps));
  int64_t epoch = -1, avg_n = 0;
  double train_seconds = 0, acc_avg = 0;
  auto save = [&](int64_t step) {
    save_multimodal_checkpoint(ck_path, cfg, run.params, step, &adam);
    history["train_seconds"] = train_seconds;
    write_file_atomic(history_path, history.dump(1));
  };
  std::array<double, kModalities> loss_avg{};
  const int64_t log_every = std::max<int64_t>(1, t.steps / 25);
  auto eval_val = [&](int64_t step, int64_t max_batches) {
    run.val = evaluate_multimodal(model, run.params, data, MmSplit::kVal, cfg, ctx, max_batches);
    json nmi = run.val.nmi;
    history["evals"].push_back({{"step", step},
                                {"image_loss", run.val.loss[0]},
                                {"image_accuracy", run.val.image_accuracy},
                                {"text_loss", run.val.loss[1]},
                                {"control_mse", run.val.loss[2]},
                                {"nmi", nmi}});
    std::string nmis;
    for (double v : run.val.nmi) nmis += fmt::format(" {:.3f}", v);
    log(fmt::format("step {:5d}  validation: image loss {:.4f} accuracy {:.2f}%  text {:.4f} "
                    "nats/byte  control MSE {:.5f}{}",
                    step, run.val.loss[0], 100 * run.val.image_accuracy, run.val.loss[1],
                    run.val.loss[2], nmis.empty() ? "" : "  NMI(modality; expert)" + nmis));
  };
  for (int64_t step = start; step < t.steps; ++step) {
    const double t0 = wall_seconds();
    for (int64_t i = 0; i < Bi; ++i) {
      const int64_t pos = step * Bi + i;
      if (pos / n != epoch) {
        epoch = pos / n;
        detail::epoch_order(rng, epoch, order);
      }
      const int64_t img = order[size_t(pos % n)];
      augment_image(train.image(img), train.rows, train.cols, d.pad, d.flip, rng, uint64_t(pos),
                    {batch_set.pixels.data() + i * px, size_t(px)});
      b.labels[i] = train.labels[img];
    }
    if (Bi > 0) image_batch(batch_set, all, b.images);
    b.text.clear();
    b.text_targets.clear();
    if (d.text_per_step > 0)
      text_rows(train_batch(data.text, d.text_per_step, cfg.model.text_context, t.seed, step), b);
    episodes.resize(size_t(d.control_per_step));
    for (int64_t i = 0; i < d.control_per_step; ++i)
      episodes[i] = int64_t(rng.bits((uint64_t(1) << 62) + uint64_t(step * d.control_per_step + i))[0] %
                            uint32_t(data.train_control.n));
    control_rows(data.train_control, episodes, b);

    ctx.training = true;
    ctx.seed = t.seed * 0x9E3779B97F4A7C15ull + uint64_t(step);
    const MmStep s = model.forward(run.params, b, cache, ctx);
    zero(g);
    model.backward(run.params, cache, g, ctx);
    const double norm = clip_grad_norm(g, t.grad_clip);
    const double lr = learning_rate(t, step);
    adam.step(run.params, g, lr);
    if (moe && cfg.model.moe.gating == Gating::kSigmoidBias) {
      int64_t m = 0;
      for (int64_t l = 0; l < cfg.model.n_layers; ++l)
        if (cfg.model.is_moe(l)) moe->update_bias(run.params.layers[l].moe, s.routing[m++]);
    }
    const double dt = wall_seconds() - t0;
    train_seconds += dt;
    for (int64_t m = 0; m < kModalities; ++m) loss_avg[m] += s.loss[m];
    acc_avg += s.count[0] > 0 ? double(s.image_correct) / double(s.count[0]) : 0.0;
    ++avg_n;
    history["steps"].push_back({{"step", step + 1}, {"image_loss", s.loss[0]},
                                {"text_loss", s.loss[1]}, {"control_mse", s.loss[2]},
                                {"aux", s.aux}, {"lr", lr}, {"grad_norm", norm}});
    if ((step + 1) % log_every == 0 || step + 1 == t.steps) {
      const double a = double(avg_n);
      log(fmt::format("step {:5d}  image loss {:.4f} ({:.1f}% right)  text {:.4f}  control {:.5f}  "
                      "aux {:.4f}  lr {:.2e}  {:.0f} rows/s",
                      step + 1, loss_avg[0] / a, 100 * acc_avg / a, loss_avg[1] / a,
                      loss_avg[2] / a, s.aux, lr, double(cache.n_rows) / dt));
      loss_avg = {};
      acc_avg = 0;
      avg_n = 0;
    }
    if ((step + 1) % t.eval_interval == 0 && step + 1 < t.steps) eval_val(step + 1, 30);
    const bool stop = (opt.stop != nullptr && opt.stop->load()) ||
                      (opt.stop_after >= 0 && step + 1 - start >= opt.stop_after);
    if (stop && step + 1 < t.steps) {
      save(step + 1);
      log(fmt::format("stopped after step {}: {} holds it; --resume continues", step + 1, ck_path));
      run.steps = step + 1;
      run.seconds = train_seconds;
      run.interrupted = true;
      return run;
    }
    if ((step + 1) % t.checkpoint_interval == 0 && step + 1 < t.steps) save(step + 1);
  }
  run.steps = t.steps;
  run.seconds = train_seconds;
  eval_val(t.steps, d.eval_batches);
  save(t.steps);
  log(fmt::format("trained {} steps in {:.1f} s", t.steps - start, train_seconds));
  return run;
}

void save_multimodal_checkpoint(const std::string& path, const MultimodalRunConfig& cfg,
                                const MmParams& params, int64_t step, const MmAdamW* adam) {
  detail::save_params_checkpoint(path, kMultimodalCheckpointFormat, multimodal_config_json(cfg),
                                 params, step, adam);
}

bool is_multimodal_checkpoint(const std::string& path) {
  if (!std::filesystem::is_regular_file(path) || is_sharded_checkpoint(path)) return false;
  const MappedSafetensors f(path);
  const auto it = f.metadata().find("format");
  return it != f.metadata().end() && it->second == kMultimodalCheckpointFormat;
}

MultimodalCheckpoint load_multimodal_checkpoint(const std::string& path, bool with_optimizer) {
  SafetensorsFile f = read_safetensors(path);
  MultimodalCheckpoint ck;
  ck.step = detail::check_checkpoint_header(f, path, kMultimodalCheckpointFormat);
  try {
    ck.cfg = parse_multimodal_config(
        detail::checkpoint_meta(f, path, kMultimodalCheckpointFormat, "config"), path);
  } catch (const ConfigError& e) {
    throw IoError(fmt::format("{}: its config does not load: {}", path, e.what()));
  }
  ck.params = init_mm_params(ck.cfg.model, DType::kF32, 0);
  if (with_optimizer) ck.optimizer.emplace(ck.cfg.train, ck.params);
  detail::read_params_checkpoint(f, path, ck.params, with_optimizer ? &*ck.optimizer : nullptr);
  return ck;
}

std::string render_multimodal_routes_text(const MultimodalRunConfig& cfg, const MmEval& ev) {
  const int64_t E = cfg.model.moe.n_experts;
  std::string out = fmt::format(
      "image accuracy {:.2f}% (loss {:.4f}), text {:.4f} nats/byte ({:.3f} bits), control MSE "
      "{:.5f}\n",
      100 * ev.image_accuracy, ev.loss[0], ev.loss[1], ev.loss[1] / std::log(2.0), ev.loss[2]);
  if (ev.modality_expert.empty()) return out + "a dense model: no MoE layer to report\n";
  for (size_t l = 0; l < ev.modality_expert.size(); ++l) {
    const auto joint = modality_by_expert(ev.modality_expert[l], E);
    out += fmt::format("MoE layer {}: NMI(modality; first-choice expert) {:.3f}, share of the "
                       "modality's entropy the expert explains {:.3f}\n",
                       l, ev.nmi[l], label_entropy_explained(joint));
    out += fmt::format("  slots dropped by capacity: image {:.2f}%, text {:.2f}%, control {:.2f}%\n",
                       100 * ev.dropped[l][0], 100 * ev.dropped[l][1], 100 * ev.dropped[l][2]);
    out += "  share of each modality's rows per expert\n";
    out += fmt::format("  {:<8}{:>10}", "modality", "rows");
    for (int64_t e = 0; e < E; ++e) out += fmt::format(" {:>5}", fmt::format("e{}", e));
    out += "\n";
    for (int64_t m = 0; m < kModalities; ++m) {
      double row = 0;
      for (double v : joint[m]) row += v;
      out += fmt::format("  {:<8}{:>10.0f}", modality_name(Modality(m)), row);
      for (int64_t e = 0; e < E; ++e)
        out += fmt::format(" {:>4.0f}%", row > 0 ? 100 * joint[m][e] / row : 0.0);
      out += "\n";
    }
    out += "  expert  its rows by modality (image / text / control)\n";
    for (int64_t e = 0; e < E; ++e) {
      double col = 0;
      for (int64_t m = 0; m < kModalities; ++m) col += joint[m][e];
      out += fmt::format("  {:>6}", fmt::format("e{}", e));
      for (int64_t m = 0; m < kModalities; ++m)
        out += fmt::format(" {:>5.1f}%", col > 0 ? 100 * joint[m][e] / col : 0.0);
      out += "\n";
    }
  }
  return out;
}

std::string render_multimodal_routes_html(const MultimodalRunConfig& cfg, const MmEval& ev,
                                          const std::string& title) {
  const int64_t E = cfg.model.moe.n_experts;
  std::string html = fmt::format(
      "<!doctype html><html><head><meta charset=\"utf-8\"><title>routes: {0}</title><style>"
      "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} "
      "td,th{{padding:3px 6px;text-align:right;font-size:12px}}</style></head><body>"
      "<h1>Routes of {0}</h1><p>Image accuracy {1:.2f}%, text {2:.4f} nats/byte, control MSE "
      "{3:.5f}. Each cell: the share of the modality's rows whose first choice is the expert.</p>",
      escape_html(title), 100 * ev.image_accuracy, ev.loss[1], ev.loss[2]);
  for (size_t l = 0; l < ev.modality_expert.size(); ++l) {
    const auto joint = modality_by_expert(ev.modality_expert[l], E);
    html += fmt::format("<h2>MoE layer {}</h2><p>NMI(modality; expert) {:.3f}; share of the "
                        "modality's entropy the expert explains {:.3f}</p><table><tr><th></th>",
                        l, ev.nmi[l], label_entropy_explained(joint));
    for (int64_t e = 0; e < E; ++e) html += fmt::format("<th>e{}</th>", e);
    html += "</tr>";
    for (int64_t m = 0; m < kModalities; ++m) {
      double row = 0;
      for (double v : joint[m]) row += v;
      html += fmt::format("<tr><th style=\"text-align:left\">{}</th>", modality_name(Modality(m)));
      for (int64_t e = 0; e < E; ++e) {
        const double share = row > 0 ? joint[m][e] / row : 0.0;
        const int shade = int(std::lround(255 * (1 - share)));
        html += fmt::format("<td style=\"background:rgb({0},{0},255);color:{2}\">{1:.0f}%</td>",
                            shade, 100 * share, share > 0.5 ? "white" : "black");
      }
      html += "</tr>";
    }
    // The same counts by expert: what each expert's rows are made of.
    html += "<tr><th style=\"text-align:left\" colspan=\"99\">each expert's rows by modality</th></tr>";
    for (int64_t m = 0; m < kModalities; ++m) {
      html += fmt::format("<tr><th style=\"text-align:left\">{}</th>", modality_name(Modality(m)));
      for (int64_t e = 0; e < E; ++e) {
        double col = 0;
        for (int64_t q = 0; q < kModalities; ++q) col += joint[q][e];
        html += fmt::format("<td>{:.0f}%</td>", col > 0 ? 100 * joint[m][e] / col : 0.0);
      }
      html += "</tr>";
    }
    html += "</table>";
  }
  html += "</body></html>\n";
  return html;
}

}  // namespace sy
