// Vision runs: data, the training loop, evaluation with its confusion matrix, checkpoints.
#include "switchyard/train/vision.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "switchyard/core/error.h"
#include "switchyard/core/file.h"
#include "switchyard/core/parallel.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/optimizer.h"
#include "train/params_checkpoint.h"

namespace sy {

namespace {

using nlohmann::json;

// Fashion-MNIST's training-set pixel mean and standard deviation (of pixels / 255): the inputs
// are standardised by them, as is usual for the data set.
constexpr float kPixelMean = 0.2860f, kPixelStd = 0.3530f;

std::string data_file(const VisionDataConfig& cfg, const std::string& name) {
  if (cfg.dir.empty()) return fashion_mnist_path(name);
  return (std::filesystem::path(resolve_data_path(cfg.dir)) / name).string();
}

// The super-class file: {"superclass": [expert of class 0, expert of class 1, ...], ...}.
std::vector<int32_t> read_superclasses(const std::string& path, int64_t n_classes,
                                       int64_t n_experts) {
  std::ifstream in(path);
  if (!in) throw IoError(fmt::format("{}: cannot open the super-class file", path));
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw IoError(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  if (!j.is_object() || !j.contains("superclass") || !j["superclass"].is_array())
    throw IoError(fmt::format("{}: expected an object with a \"superclass\" array (the expert of "
                              "each class)",
                              path));
  const json& a = j["superclass"];
  if (int64_t(a.size()) != n_classes)
    throw IoError(fmt::format("{}: {} super-class entries for {} classes: expected one per class",
                              path, a.size(), n_classes));
  std::vector<int32_t> out;
  for (const json& v : a) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= n_experts)
      throw IoError(fmt::format("{}: super-class {}: expected an expert 0..{} (model.moe.n_experts "
                                "- 1)",
                                path, v.dump(), n_experts - 1));
    out.push_back(v.get<int32_t>());
  }
  return out;
}

void zero(VitParams& g) {
  for (auto& [name, t] : g.named()) t->fill_zero();
}

ExecContext context_for(const VitConfig& model, int threads) {
  ExecContext ctx;
  ctx.n_threads = threads;
  ctx.backend = &pick_backend(cpu_features(), model.precision);
  return ctx;
}

}  // namespace

VisionData load_vision_data(const VisionDataConfig& cfg, uint64_t seed, const VitConfig& model) {
  cfg.validate();
  ImageSet train = read_idx(data_file(cfg, "train-images-idx3-ubyte.gz"),
                            data_file(cfg, "train-labels-idx1-ubyte.gz"));
  VisionData d;
  d.test = read_idx(data_file(cfg, "t10k-images-idx3-ubyte.gz"),
                    data_file(cfg, "t10k-labels-idx1-ubyte.gz"));
  for (const ImageSet* s : {&train, &d.test}) {
    if (s->rows != model.image_rows || s->cols != model.image_cols || model.channels != 1)
      throw ConfigError(fmt::format("images are {} x {} x 1: expected the model's {} x {} x {} "
                                    "(model.image_rows, image_cols, channels)",
                                    s->rows, s->cols, model.image_rows, model.image_cols,
                                    model.channels));
    if (s->n_classes > model.n_classes)
      throw ConfigError(fmt::format("labels go up to {}: expected < {} (model.n_classes)",
                                    s->n_classes - 1, model.n_classes));
  }
  if (cfg.val_images >= train.n)
    throw ConfigError(fmt::format("data.val_images = {}: expected fewer than the {} training images",
                                  cfg.val_images, train.n));
  std::tie(d.train, d.val) = split_images(train, cfg.val_images, seed);
  if (cfg.train_images > 0 && cfg.train_images < d.train.n) {
    d.train.n = cfg.train_images;
    d.train.pixels.resize(size_t(d.train.n * d.train.rows * d.train.cols));
    d.train.labels.resize(size_t(d.train.n));
  }
  if (!cfg.superclasses.empty())
    d.superclass = read_superclasses(resolve_data_path(cfg.superclasses), model.n_classes,
                                     model.moe.n_experts);
  return d;
}

void image_batch(const ImageSet& set, std::span<const int64_t> index, Tensor& images) {
  const int64_t px = set.rows * set.cols;
  images.resize_for_overwrite({int64_t(index.size()), px}, DType::kF32);
  float* out = images.data<float>();
  for (size_t b = 0; b < index.size(); ++b) {
    SY_CHECK(index[b] >= 0 && index[b] < set.n, "image {} of a set of {}", index[b], set.n);
    const uint8_t* in = set.image(index[b]).data();
    for (int64_t i = 0; i < px; ++i)
      out[int64_t(b) * px + i] = (float(in[i]) / 255.0f - kPixelMean) / kPixelStd;
  }
}

int64_t ConfusionMatrix::total() const {
  return std::accumulate(counts.begin(), counts.end(), int64_t(0));
}

double ConfusionMatrix::accuracy() const {
  int64_t right = 0;
  for (int64_t c = 0; c < n_classes; ++c) right += at(c, c);
  return total() > 0 ? double(right) / double(total()) : 0.0;
}

std::vector<double> ConfusionMatrix::per_class_accuracy() const {
  std::vector<double> out(size_t(n_classes), 0.0);
  for (int64_t c = 0; c < n_classes; ++c) {
    int64_t row = 0;
    for (int64_t q = 0; q < n_classes; ++q) row += at(c, q);
    out[c] = row > 0 ? double(at(c, c)) / double(row) : 0.0;
  }
  return out;
}

VisionEval evaluate_vision(const VisionTransformer& vit, const VitParams& p, const ImageSet& set,
                           int64_t batch, const ExecContext& ctx_in) {
  const VitConfig& cfg = vit.config();
  ExecContext ctx = ctx_in;
  ctx.training = false;
  const int64_t K = cfg.n_classes, L = cfg.seq_len(), E = cfg.moe.n_experts;
  VisionEval ev;
  ev.confusion.n_classes = K;
  ev.confusion.counts.assign(size_t(K * K), 0);
  ev.expert_class.assign(size_t(cfg.n_moe_layers()), std::vector<int64_t>(size_t(E * K), 0));
  ev.image_expert.assign(size_t(cfg.n_moe_layers()), {});
  VitCache cache;
  Tensor images;
  std::vector<int64_t> index;
  std::vector<int32_t> labels;
  double loss_sum = 0;
  const double t0 = wall_seconds();
  for (int64_t i0 = 0; i0 < set.n; i0 += batch) {
    const int64_t B = std::min(batch, set.n - i0);
    index.resize(size_t(B));
    std::iota(index.begin(), index.end(), i0);
    labels.assign(set.labels.begin() + i0, set.labels.begin() + i0 + B);
    image_batch(set, index, images);
    const VitStep s = vit.forward(p, images, labels, {}, cache, ctx);
    loss_sum += s.loss * double(s.n_labelled);
    for (int64_t b = 0; b < B; ++b) ++ev.confusion.counts[size_t(labels[b] * K + s.predicted[b])];
    int64_t m = 0;
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      if (!cfg.is_moe(l)) continue;
      const MoeCache& mc = cache.layers[l].moe;
      const int64_t k = cfg.moe.slots_per_token();
      const int64_t rows = cfg.routing == VitRouting::kPerImage ? 1 : L;  // router rows per image
      std::vector<int64_t> votes(static_cast<size_t>(E));
      for (int64_t b = 0; b < B; ++b) {
        std::fill(votes.begin(), votes.end(), 0);
        for (int64_t r = b * rows; r < (b + 1) * rows; ++r) {
          const int32_t e = mc.router.expert[size_t(r * k)];
          ++ev.expert_class[m][size_t(e * K + labels[b])];
          ++votes[e];
        }
        ev.image_expert[m].push_back(
            int32_t(std::max_element(votes.begin(), votes.end()) - votes.begin()));
      }
      ++m;
    }
  }
  ev.images_per_s = double(set.n) / std::max(1e-9, wall_seconds() - t0);
  ev.loss = set.n > 0 ? loss_sum / double(set.n) : 0.0;
  return ev;
}

VisionRun train_vision(const VisionRunConfig& cfg, const VisionData& data,
                       const std::string& out_dir, const VisionTrainOptions& opt) {
  auto log = [&](const std::string& line) {
    if (opt.quiet) return;
    if (opt.log) return opt.log(line);
    fmt::print(stderr, "{}\n", line);
  };
  const TrainConfig& t = cfg.train;
  const VisionTransformer vit(cfg.model);
  if (!data.superclass.empty() && cfg.model.n_moe_layers() == 0)
    throw ConfigError("data.superclasses with a dense model: expected MoE layers to guide");
  if (cfg.model.n_moe_layers() > 0)
    cfg.model.moe.check_trainable(!data.superclass.empty() && cfg.model.moe.loss_guide_weight > 0);
  std::filesystem::create_directories(out_dir);
  const std::string ck_path = (std::filesystem::path(out_dir) / "checkpoint.safetensors").string();
  const std::string history_path = (std::filesystem::path(out_dir) / "history.json").string();
  VisionRun run;
  run.params = init_vit_params(cfg.model, DType::kF32, t.seed);
  VitAdamW adam(t, run.params);
  int64_t start = 0;
  if (opt.resume) {
    detail::require_checkpoint(ck_path, out_dir);
    VisionCheckpoint ck = load_vision_checkpoint(ck_path, /*with_optimizer=*/true);
    detail::require_same_config(ck_path, vision_config_json(ck.cfg), vision_config_json(cfg));
    run.params = std::move(ck.params);
    adam = std::move(*ck.optimizer);
    start = ck.step;
  }
  VitParams g = zeros_like(run.params);
  ExecContext ctx = context_for(cfg.model, opt.threads);
  std::optional<MoeLayer> moe;
  if (cfg.model.n_moe_layers() > 0) moe.emplace(cfg.model.moe_config());
  log(describe_kernels(cfg.model.precision));
  log(fmt::format("{}: {} training images, {} validation, {} parameters, {:.2f} MFLOPs per image "
                  "at inference",
                  cfg.name, data.train.n, data.val.n, cfg.model.total_params(),
                  2.0 * double(cfg.model.macs_per_image()) / 1e6));

  const int64_t n = data.train.n, B = t.batch, px = data.train.rows * data.train.cols;
  const Philox rng(t.seed, /*stream=*/0x1A6E);
  std::vector<int64_t> order(static_cast<size_t>(n));
  // The augmented batch, augmented in place and read by image_batch.
  ImageSet batch_set{.n = B, .rows = data.train.rows, .cols = data.train.cols,
                     .pixels = std::vector<uint8_t>(static_cast<size_t>(B * px)), .labels = {},
                     .n_classes = 0};
  std::vector<int64_t> all(static_cast<size_t>(B));
  std::iota(all.begin(), all.end(), 0);
  std::vector<int32_t> labels(static_cast<size_t>(B)), guide;
  Tensor images;
  VitCache cache;
  json history = detail::resumed_history(history_path, start);
  if (start > 0) log(fmt::format("resuming {} at step {} of {}", ck_path, start, t.steps));
  int64_t epoch = -1;
  double train_seconds = 0, loss_avg = 0, acc_avg = 0;
  int64_t avg_n = 0;
  auto save = [&](int64_t step) {
    save_vision_checkpoint(ck_path, cfg, run.params, step, &adam);
    history["train_seconds"] = train_seconds;
    write_file_atomic(history_path, history.dump(1));
  };
  const int64_t log_every = std::max<int64_t>(1, t.steps / 25);
  auto eval_val = [&](int64_t step) {
    const VisionEval ev = evaluate_vision(vit, run.params, data.val, 256, ctx);
    run.val_accuracy = ev.confusion.accuracy();
    history["evals"].push_back({{"step", step}, {"val_loss", ev.loss}, {"val_accuracy", run.val_accuracy}});
    log(fmt::format("step {:5d}  validation loss {:.4f}  accuracy {:.2f}%", step, ev.loss,
                    100 * run.val_accuracy));
  };
  for (int64_t step = start; step < t.steps; ++step) {
    const double t0 = wall_seconds();
    for (int64_t b = 0; b < B; ++b) {
      // A batch that straddles two epochs takes its last images from the new epoch's order.
      const int64_t pos = step * B + b;
      if (pos / n != epoch) {
        epoch = pos / n;
        detail::epoch_order(rng, epoch, order);
      }
      const int64_t img = order[size_t(pos % n)];
      augment_image(data.train.image(img), data.train.rows, data.train.cols, cfg.data.pad,
                    cfg.data.flip, rng, uint64_t(pos), {batch_set.pixels.data() + b * px, size_t(px)});
      labels[b] = data.train.labels[img];
    }
    image_batch(batch_set, all, images);
    guide.clear();
    for (int32_t y : labels)
      if (!data.superclass.empty()) guide.push_back(data.superclass[y]);
    ctx.training = true;
    ctx.seed = t.seed * 0x9E3779B97F4A7C15ull + uint64_t(step);
    const VitStep s = vit.forward(run.params, images, labels, guide, cache, ctx);
    zero(g);
    vit.backward(run.params, cache, g, ctx);
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
    loss_avg += s.loss;
    acc_avg += double(s.correct) / double(B);
    ++avg_n;
    json row = {{"step", step + 1}, {"loss", s.loss}, {"aux", s.aux}, {"lr", lr}, {"grad_norm", norm}};
    if (!data.superclass.empty()) row["loss_guide"] = s.loss_guide;
    history["steps"].push_back(row);
    if ((step + 1) % log_every == 0 || step + 1 == t.steps) {
      log(fmt::format("step {:5d}  loss {:.4f}  train accuracy {:.1f}%  aux {:.4f}  lr {:.2e}  "
                      "{:.0f} images/s",
                      step + 1, loss_avg / double(avg_n), 100 * acc_avg / double(avg_n), s.aux, lr,
                      double(B) / dt));
      loss_avg = acc_avg = 0;
      avg_n = 0;
    }
    if ((step + 1) % t.eval_interval == 0 && step + 1 < t.steps) eval_val(step + 1);
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
  run.train_images_per_s = double((t.steps - start) * B) / std::max(1e-9, train_seconds);
  eval_val(t.steps);
  history["train_images_per_s"] = run.train_images_per_s;
  save(t.steps);
  log(fmt::format("trained {} steps in {:.1f} s ({:.0f} images/s); validation accuracy {:.2f}%",
                  t.steps - start, train_seconds, run.train_images_per_s, 100 * run.val_accuracy));
  return run;
}

void save_vision_checkpoint(const std::string& path, const VisionRunConfig& cfg,
                            const VitParams& params, int64_t step, const VitAdamW* adam) {
  detail::save_params_checkpoint(path, kVisionCheckpointFormat, vision_config_json(cfg), params,
                                 step, adam);
}

bool is_vision_checkpoint(const std::string& path) {
  // A sharded checkpoint (an index.json and its shards) is a language model's.
  if (!std::filesystem::is_regular_file(path) || is_sharded_checkpoint(path)) return false;
  const MappedSafetensors f(path);
  const auto it = f.metadata().find("format");
  return it != f.metadata().end() && it->second == kVisionCheckpointFormat;
}

VisionCheckpoint load_vision_checkpoint(const std::string& path, bool with_optimizer) {
  SafetensorsFile f = read_safetensors(path);
  VisionCheckpoint ck;
  ck.step = detail::check_checkpoint_header(f, path, kVisionCheckpointFormat);
  try {
    ck.cfg = parse_vision_config(detail::checkpoint_meta(f, path, kVisionCheckpointFormat, "config"),
                                 path);
  } catch (const ConfigError& e) {
    throw IoError(fmt::format("{}: its config does not load: {}", path, e.what()));
  }
  ck.params = init_vit_params(ck.cfg.model, DType::kF32, 0);
  if (with_optimizer) ck.optimizer.emplace(ck.cfg.train, ck.params);
  detail::read_params_checkpoint(f, path, ck.params, with_optimizer ? &*ck.optimizer : nullptr);
  return ck;
}

}  // namespace sy
