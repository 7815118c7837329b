#include "switchyard/train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "switchyard/core/file.h"
#include "switchyard/core/parallel.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/parallel.h"

namespace sy {

namespace {

std::string format_seconds(double s) {
  const int64_t t = int64_t(std::max(0.0, s) + 0.5);
  return t >= 60 ? fmt::format("{}m{:02d}s", t / 60, t % 60) : fmt::format("{}s", t);
}

void zero(LmParams& g) {
  for (auto& [name, t] : g.named()) t->fill_zero();
}

// Sequences [first, first + n) of a batch.
Batch slice(const Batch& b, int64_t first, int64_t n) {
  Batch out;
  out.n_seq = n;
  out.seq_len = b.seq_len;
  const auto from = size_t(first * b.seq_len), to = size_t((first + n) * b.seq_len);
  out.tokens.assign(b.tokens.begin() + from, b.tokens.begin() + to);
  out.targets.assign(b.targets.begin() + from, b.targets.begin() + to);
  return out;
}

// This rank's sequences of a batch: an even split, the first ranks taking one more when it does
// not divide (a rank may get none).
Batch rank_share(const Batch& b, const ParallelGroup& g) {
  const int64_t W = g.world_size(), w = g.world_rank();
  const int64_t first = b.n_seq * w / W, last = b.n_seq * (w + 1) / W;
  return slice(b, first, last - first);
}

// One step's figures summed over ranks: losses, the stop request, the all-to-all time, each
// MoE layer's demand and drops, and the rows each rank's experts computed.
struct StepTotals {
  double loss = 0, aux = 0, exchange_seconds = 0;
  bool stop = false;
  std::vector<RoutingStats> routing;
  std::vector<double> rank_rows;  // [world]: rows computed, summed over MoE layers
};

StepTotals reduce_step(const LmStep& s, const LmCache& cache, const LmConfig& mc, bool stop,
                       const ParallelGroup* g) {
  StepTotals out;
  double exchange = 0, rows = 0;
  for (int64_t i = 0; i < mc.n_layers; ++i)
    if (mc.is_moe(i)) {
      const MoeTimes& t = cache.layers[size_t(i)].moe.times;
      exchange += t.exchange + t.backward_exchange;
      rows += double(cache.layers[size_t(i)].moe.ep.rows_computed);
    }
  if (g == nullptr) {
    out = {s.loss, s.aux, exchange, stop, s.routing, {rows}};
    return out;
  }
  const int64_t W = g->world_size(), E = mc.moe.n_experts;
  std::vector<double> v = {s.loss, s.aux, exchange, double(stop)};
  for (const RoutingStats& r : s.routing) {
    for (int64_t n : r.demand) v.push_back(double(n));
    int64_t slots = 0, kept = 0;
    for (int64_t e = 0; e < E; ++e) slots += r.demand[e], kept += r.rows[e];
    v.push_back(double(slots - kept));
  }
  const size_t at_rows = v.size();
  v.resize(v.size() + size_t(W), 0.0);
  v[at_rows + size_t(g->world_rank())] = rows;
  g->world_allreduce_sum(v);
  out.loss = v[0] / double(W);
  out.aux = v[1] / double(W);
  out.exchange_seconds = v[2] / double(W);
  out.stop = v[3] > 0;
  size_t at = 4;
  for (const RoutingStats& local : s.routing) {
    RoutingStats r;
    r.capacity = local.capacity;
    double slots = 0, mean = 0, top = 0;
    for (int64_t e = 0; e < E; ++e) {
      r.demand.push_back(int64_t(v[at++]));
      slots += double(r.demand.back());
      top = std::max(top, double(r.demand.back()));
    }
    mean = slots / double(E);
    const double dropped = v[at++];
    r.dropped_fraction = slots > 0 ? dropped / slots : 0.0;
    r.load_max_over_mean = mean > 0 ? top / mean : 0.0;
    out.routing.push_back(std::move(r));
  }
  out.rank_rows.assign(v.begin() + long(at_rows), v.end());
  return out;
}

}  // namespace

double evaluate(const LanguageModel& model, const LmParams& p, const std::vector<Batch>& batches,
                const ExecContext& ctx) {
  ExecContext eval = ctx;
  eval.training = false;
  LmCache cache;
  double sums[2] = {0, 0};  // loss x targets, targets
  for (const Batch& all : batches) {
    const Batch mine = ctx.parallel != nullptr ? rank_share(all, *ctx.parallel) : Batch{};
    const Batch& b = ctx.parallel != nullptr ? mine : all;
    const LmStep s = model.forward(p, b.tokens, b.targets, b.n_seq, cache, eval);
    sums[0] += s.loss * double(s.n_targets);
    sums[1] += double(s.n_targets);
  }
  if (ctx.parallel != nullptr) ctx.parallel->world_allreduce_sum(sums);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

double next_token_nats(std::span<const float> logits, int32_t target) {
  const float mx = *std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (float v : logits) z += std::exp(double(v) - mx);
  return std::log(z) + mx - logits[size_t(target)];
}

std::vector<DocLoss> evaluate_by_doc(const LanguageModel& model, const LmParams& p,
                                     const std::vector<Batch>& batches, int64_t n_docs,
                                     const ExecContext& ctx) {
  SY_CHECK(ctx.parallel == nullptr, "evaluate_by_doc runs in one process");
  ExecContext eval = ctx;
  eval.training = false;
  LmCache cache;
  std::vector<DocLoss> out(static_cast<size_t>(n_docs));
  const int64_t V = model.config().vocab;
  for (const Batch& b : batches) {
    if (b.doc.size() != b.tokens.size())
      throw ShapeError("evaluate_by_doc: a batch without document labels (expected the "
                       "validation batches of a labelled corpus)");
    model.forward(p, b.tokens, b.targets, b.n_seq, cache, eval);
    const auto logits = cache.logits.matrix<float>();
    for (size_t t = 0; t < b.tokens.size(); ++t) {
      const int32_t y = b.targets[t], d = b.doc[t];
      if (y < 0 || d < 0) continue;
      SY_CHECK(d < n_docs, "document {} of {}", d, n_docs);
      out[size_t(d)].nats += next_token_nats({&logits(int64_t(t), 0), size_t(V)}, y);
      ++out[size_t(d)].targets;
    }
  }
  return out;
}

TrainResult train(const RunConfig& cfg, const TrainOptions& opt) {
  namespace fs = std::filesystem;
  const TrainConfig& tc = cfg.train;
  const LmConfig& mc = cfg.model;
  TrainResult result;
  const ParallelGroup* grid = opt.parallel;
  const bool sharded = tc.checkpoint_format == "sharded" ||
                       (tc.checkpoint_format == "auto" && grid != nullptr && grid->ep_size() > 1);
  if (sharded && grid == nullptr)
    throw ConfigError("train.checkpoint_format = \"sharded\": a sharded checkpoint is written by "
                      "the ranks of an expert-parallel run (mpirun); one process writes a file");
  const std::string file_path = (fs::path(opt.out_dir) / "checkpoint.safetensors").string();
  const std::string dir_path = (fs::path(opt.out_dir) / "checkpoint").string();
  result.checkpoint = sharded ? dir_path : file_path;
  result.report = (fs::path(opt.out_dir) / "report.html").string();
  // Either format may be there (a run resumed on another layout): continue the later one.
  std::string existing;
  if (fs::exists(file_path) || fs::exists(fs::path(dir_path) / kShardIndex))
    existing = find_checkpoint(opt.out_dir);
  const bool have_checkpoint = !existing.empty();
  if (have_checkpoint && !opt.resume)
    throw ConfigError(fmt::format("{} exists: pass --resume to continue it, or --out to train "
                                  "into another directory (nothing was overwritten)",
                                  existing));
  if (!have_checkpoint && opt.resume)
    throw ConfigError(fmt::format("--resume: no checkpoint at {}", result.checkpoint));

  const bool lead = grid == nullptr || grid->world_rank() == 0;
  if (grid != nullptr) {
    if (tc.batch % grid->world_size() != 0)
      throw ConfigError(fmt::format("train.batch = {} over {} ranks: expected a multiple of the "
                                    "rank count (each rank trains batch / ranks sequences)",
                                    tc.batch, grid->world_size()));
    if (mc.n_moe_layers() > 0 && mc.moe.n_experts % grid->ep_size() != 0)
      throw ConfigError(fmt::format("model.moe.n_experts = {} over --expert-parallel {}: expected "
                                    "a rank count that divides the experts evenly",
                                    mc.moe.n_experts, grid->ep_size()));
  }

  if (mc.n_moe_layers() > 0) mc.moe.check_trainable(/*guided=*/false);
  // Everything that can fail on bad input fails here, before any file is written.
  const Corpus corpus = load_corpus(resolve_data_path(cfg.data.path), cfg.data.val_fraction, mc.context);
  const LanguageModel model(mc);
  LmParams params;
  std::optional<AdamW> adam;
  int64_t start = 0;
  TrainHistory history;
  if (opt.resume) {
    Checkpoint ck = load_checkpoint(existing, /*with_optimizer=*/true);
    if (model_config_hash(ck.cfg.model) != model_config_hash(mc))
      throw IoError(fmt::format("{} is of another model: its config {} vs this run's {}",
                                existing, model_config_json(ck.cfg.model),
                                model_config_json(mc)));
    params = std::move(ck.params);
    adam.emplace(tc, params);
    adam->m() = std::move(ck.optimizer->m());
    adam->v() = std::move(ck.optimizer->v());
    adam->set_n_steps(ck.optimizer->n_steps());
    start = ck.step;
    history = std::move(ck.history);
  } else {
    params = init_lm_params(mc, DType::kF32, tc.seed);
    if (opt.init != nullptr) {
      auto from = opt.init->named();
      auto to = params.named();
      if (from.size() != to.size())
        throw ShapeError(fmt::format("initial parameters: {} tensors, expected {}", from.size(),
                                     to.size()));
      for (size_t i = 0; i < to.size(); ++i) {
        expect_shape(*from[i].second, to[i].second->shape(), "initial " + to[i].first);
        expect_dtype(*from[i].second, DType::kF32, "initial " + to[i].first);
        *to[i].second = from[i].second->clone();
      }
    }
    adam.emplace(tc, params);
  }
  if (grid != nullptr) {
    // Every rank built or loaded the whole model; each keeps its experts.
    shard_experts(params, *grid);
    shard_experts(adam->m(), *grid);
    shard_experts(adam->v(), *grid);
  }
  if (lead) fs::create_directories(opt.out_dir);
  const std::vector<Batch> val = val_batches(corpus, tc.batch, mc.context, tc.eval_tokens);

  ExecContext ctx;
  ctx.n_threads = opt.n_threads;
  ctx.seed = tc.seed;
  ctx.parallel = grid;
  ctx.exchange_bf16 = grid != nullptr && opt.exchange_bf16;
  ctx.exchange_overlap = grid != nullptr && opt.exchange_overlap;
  ctx.backend = &pick_backend(cpu_features(), mc.precision);
  if (opt.log != nullptr && lead) fmt::print(opt.log, "{}\n", describe_kernels(mc.precision));
  LmParams grads = zeros_like(params);
  LmCache cache;
  const bool tty = opt.log != nullptr && isatty(fileno(opt.log));
  const int64_t tokens_per_step = tc.batch * mc.context;
  double train_seconds = 0, last_val = history.evals.empty() ? NAN : history.evals.back().val_loss;
  int64_t timed_steps = 0;
  const double t_run = wall_seconds();

  auto save = [&](int64_t steps_done) {
    if (grid == nullptr) {
      save_checkpoint(result.checkpoint, cfg, params, &*adam, steps_done, history);
      write_file_atomic(result.report, render_report(cfg, history));
      return;
    }
    if (sharded) {
      save_checkpoint_sharded(result.checkpoint, cfg, params, *adam, steps_done, history, *grid);
      if (lead) write_file_atomic(result.report, render_report(cfg, history));
      return;
    }
    // One file holding the whole model: gathered, written by rank 0.
    LmParams full = gather_experts(params, *grid);
    LmParams m = gather_experts(adam->m(), *grid), v = gather_experts(adam->v(), *grid);
    if (!lead) return;
    AdamW whole(tc, full);
    whole.m() = std::move(m);
    whole.v() = std::move(v);
    whole.set_n_steps(adam->n_steps());
    save_checkpoint(result.checkpoint, cfg, full, &whole, steps_done, history);
    write_file_atomic(result.report, render_report(cfg, history));
  };
  double exchange_seconds = 0;

  int64_t step = start;
  for (; step < tc.steps; ++step) {
    const double t0 = wall_seconds();
    Batch b = train_batch(corpus, tc.batch, mc.context, tc.seed, step);
    if (grid != nullptr) b = rank_share(b, *grid);
    zero(grads);
    ctx.seed = tc.seed * 0x100000001B3ull + uint64_t(step);  // fresh jitter / random routes per step
    if (grid != nullptr) ctx.seed ^= uint64_t(grid->world_rank()) * 0x9E3779B97F4A7C15ull;
    const LmStep local = model.forward(params, b.tokens, b.targets, b.n_seq, cache, ctx);
    model.backward(params, cache, grads, ctx);
    if (grid != nullptr) allreduce_gradients(grads, *grid);
    const bool stop_asked = (opt.stop != nullptr && opt.stop->load()) ||
                            (opt.stop_after >= 0 && step + 1 - start >= opt.stop_after);
    // Losses, routing and the stop request of the whole batch: every rank decides alike.
    const StepTotals s = reduce_step(local, cache, mc, stop_asked, grid);
    const double gnorm = clip_grad_norm(grads, tc.grad_clip, grid);
    const double lr = learning_rate(tc, step);
    adam->step(params, grads, lr);
    // Auxiliary-loss-free balancing moves the sigmoid-gating biases after each step.
    for (int64_t i = 0, m = 0; i < mc.n_layers; ++i)
      if (mc.is_moe(i)) {
        if (mc.moe.gating == Gating::kSigmoidBias)
          MoeLayer(mc.moe_config()).update_bias(params.layers[i].moe, s.routing[m]);
        ++m;
      }
    exchange_seconds += s.exchange_seconds;
    const double dt = wall_seconds() - t0;
    train_seconds += dt;
    ++timed_steps;

    TrainHistory::Step rec{step + 1, s.loss, s.aux, lr, gnorm, double(tokens_per_step) / dt, {}, {}};
    double load_max = 0, dropped = 0;
    for (const RoutingStats& r : s.routing) {
      double total = 0;
      for (int64_t v : r.demand) total += double(v);
      std::vector<double> share;
      for (int64_t v : r.demand) share.push_back(total > 0 ? double(v) / total : 0.0);
      rec.load.push_back(std::move(share));
      rec.dropped.push_back(r.dropped_fraction);
      load_max = std::max(load_max, r.load_max_over_mean);
      dropped += r.dropped_fraction / double(s.routing.size());
    }
    history.steps.push_back(std::move(rec));
    if (!std::isfinite(s.loss))
      throw Error(fmt::format("step {}: loss is {}; last checkpoint kept at {} (try a lower "
                              "train.lr)",
                              step + 1, s.loss, result.checkpoint));

    const bool last = step + 1 == tc.steps;
    const bool stopping = s.stop;
    if ((step + 1) % tc.eval_interval == 0 || last) {
      last_val = evaluate(model, params, val, ctx);
      history.evals.push_back({step + 1, last_val});
    }
    if (opt.log != nullptr && lead) {
      const double tps = double(tokens_per_step * timed_steps) / train_seconds;
      const double eta = double(tc.steps - step - 1) * train_seconds / double(timed_steps);
      std::string line = fmt::format(
          "step {:>{}}/{} | loss {:.4f} | val {} | {:.0f} tok/s | ETA {}", step + 1,
          int(std::to_string(tc.steps).size()), tc.steps, s.loss,
          std::isnan(last_val) ? std::string("-") : fmt::format("{:.4f}", last_val), tps,
          format_seconds(eta));
      if (!s.routing.empty())
        line += fmt::format(" | load max/mean {:.2f} | dropped {:.1f}%", load_max, 100 * dropped);
      if (grid != nullptr && !s.routing.empty()) {
        // Rows each rank's experts computed this step, as shares, and the all-to-all time.
        double rows = 0;
        for (double r : s.rank_rows) rows += r;
        line += " | expert rows/rank";
        for (double r : s.rank_rows) line += fmt::format(" {:.2f}", rows > 0 ? r / rows : 0.0);
        line += fmt::format(" | a2a {:.0f} ms ({:.0f}%)", 1e3 * s.exchange_seconds,
                            100 * s.exchange_seconds / dt);
      }
      if (tty) {
        write_log(opt.log, fmt::format("\r{}\x1b[K{}", line, last || stopping ? "\n" : ""));
      } else if ((step + 1) % 10 == 0 || last || stopping || step == start) {
        write_log(opt.log, line + "\n");
      }
    }
    if ((step + 1) % tc.checkpoint_interval == 0 || last) save(step + 1);
    if (stopping && !last) {
      save(step + 1);
      result.interrupted = true;
      ++step;
      break;
    }
  }
  if (step == start && start >= tc.steps && opt.log != nullptr)
    fmt::print(opt.log, "nothing to do: the checkpoint already has {} of {} steps\n", start, tc.steps);
  result.steps_done = step;
  result.final_val_loss = history.evals.empty() ? NAN : history.evals.back().val_loss;
  result.tokens_per_s = timed_steps > 0 ? double(tokens_per_step * timed_steps) / train_seconds : 0;
  result.seconds = wall_seconds() - t_run;
  result.exchange_seconds = timed_steps > 0 ? exchange_seconds / double(timed_steps) : 0;
  result.history = std::move(history);
  return result;
}

}  // namespace sy
