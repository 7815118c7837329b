#include "switchyard/train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "switchyard/core/file.h"
#include "switchyard/train/optimizer.h"

namespace sy {

namespace {

std::string format_seconds(double s) {
  const int64_t t = int64_t(std::max(0.0, s) + 0.5);
  return t >= 60 ? fmt::format("{}m{:02d}s", t / 60, t % 60) : fmt::format("{}s", t);
}

void zero(LmParams& g) {
  for (auto& [name, t] : g.named()) t->fill_zero();
}

}  // namespace

double evaluate(const LanguageModel& model, const LmParams& p, const std::vector<Batch>& batches,
                const ExecContext& ctx) {
  ExecContext eval = ctx;
  eval.training = false;
  LmCache cache;
  double total = 0;
  int64_t n = 0;
  for (const Batch& b : batches) {
    const LmStep s = model.forward(p, b.tokens, b.targets, b.n_seq, cache, eval);
    total += s.loss * double(s.n_targets);
    n += s.n_targets;
  }
  return n > 0 ? total / double(n) : 0.0;
}

TrainResult train(const RunConfig& cfg, const TrainOptions& opt) {
  namespace fs = std::filesystem;
  const TrainConfig& tc = cfg.train;
  const LmConfig& mc = cfg.model;
  TrainResult result;
  result.checkpoint = (fs::path(opt.out_dir) / "checkpoint.safetensors").string();
  result.report = (fs::path(opt.out_dir) / "report.html").string();
  const bool have_checkpoint = fs::exists(result.checkpoint);
  if (have_checkpoint && !opt.resume)
    throw ConfigError(fmt::format("{} exists: pass --resume to continue it, or --out to train "
                                  "into another directory (nothing was overwritten)",
                                  result.checkpoint));
  if (!have_checkpoint && opt.resume)
    throw ConfigError(fmt::format("--resume: no checkpoint at {}", result.checkpoint));

  // Everything that can fail on bad input fails here, before any file is written.
  const Corpus corpus = load_corpus(resolve_data_path(cfg.data.path), cfg.data.val_fraction, mc.context);
  const LanguageModel model(mc);
  LmParams params;
  std::optional<AdamW> adam;
  int64_t start = 0;
  TrainHistory history;
  if (opt.resume) {
    Checkpoint ck = load_checkpoint(result.checkpoint, /*with_optimizer=*/true);
    if (model_config_hash(ck.cfg.model) != model_config_hash(mc))
      throw IoError(fmt::format("{} is of another model: its config {} vs this run's {}",
                                result.checkpoint, model_config_json(ck.cfg.model),
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
    adam.emplace(tc, params);
  }
  fs::create_directories(opt.out_dir);
  const std::vector<Batch> val = val_batches(corpus, tc.batch, mc.context, tc.eval_tokens);

  ExecContext ctx;
  ctx.n_threads = opt.n_threads;
  ctx.seed = tc.seed;
  LmParams grads = zeros_like(params);
  LmCache cache;
  const bool tty = opt.log != nullptr && isatty(fileno(opt.log));
  const int64_t tokens_per_step = tc.batch * mc.context;
  double train_seconds = 0, last_val = history.evals.empty() ? NAN : history.evals.back().val_loss;
  int64_t timed_steps = 0;
  const double t_run = wall_seconds();

  auto save = [&](int64_t steps_done) {
    save_checkpoint(result.checkpoint, cfg, params, &*adam, steps_done, history);
    write_file_atomic(result.report, render_report(cfg, history));
  };

  int64_t step = start;
  for (; step < tc.steps; ++step) {
    const double t0 = wall_seconds();
    const Batch b = train_batch(corpus, tc.batch, mc.context, tc.seed, step);
    zero(grads);
    ctx.seed = tc.seed * 0x100000001B3ull + uint64_t(step);  // fresh jitter / random routes per step
    const LmStep s = model.forward(params, b.tokens, b.targets, b.n_seq, cache, ctx);
    model.backward(params, cache, grads, ctx);
    const double gnorm = clip_grad_norm(grads, tc.grad_clip);
    const double lr = learning_rate(tc, step);
    adam->step(params, grads, lr);
    // Auxiliary-loss-free balancing moves the sigmoid-gating biases after each step.
    for (int64_t i = 0, m = 0; i < mc.n_layers; ++i)
      if (mc.is_moe(i)) {
        if (mc.moe.gating == Gating::kSigmoidBias)
          MoeLayer(mc.moe_config()).update_bias(params.layers[i].moe, s.routing[m]);
        ++m;
      }
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
    const bool stopping = (opt.stop != nullptr && opt.stop->load()) ||
                          (opt.stop_after >= 0 && step + 1 - start >= opt.stop_after);
    if ((step + 1) % tc.eval_interval == 0 || last) {
      last_val = evaluate(model, params, val, ctx);
      history.evals.push_back({step + 1, last_val});
    }
    if (opt.log != nullptr) {
      const double tps = double(tokens_per_step * timed_steps) / train_seconds;
      const double eta = double(tc.steps - step - 1) * train_seconds / double(timed_steps);
      std::string line = fmt::format(
          "step {:>{}}/{} | loss {:.4f} | val {} | {:.0f} tok/s | ETA {}", step + 1,
          int(std::to_string(tc.steps).size()), tc.steps, s.loss,
          std::isnan(last_val) ? std::string("-") : fmt::format("{:.4f}", last_val), tps,
          format_seconds(eta));
      if (!s.routing.empty())
        line += fmt::format(" | load max/mean {:.2f} | dropped {:.1f}%", load_max, 100 * dropped);
      if (tty) {
        fmt::print(opt.log, "\r{}\x1b[K", line);
        if (last || stopping) fmt::print(opt.log, "\n");
      } else if ((step + 1) % 10 == 0 || last || stopping || step == start) {
        fmt::print(opt.log, "{}\n", line);
      }
      std::fflush(opt.log);
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
  result.history = std::move(history);
  return result;
}

}  // namespace sy
