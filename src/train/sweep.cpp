#include "switchyard/train/sweep.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "switchyard/core/file.h"
#include "switchyard/kernels/backend.h"

namespace sy {

namespace fs = std::filesystem;

int64_t equal_flops_expert_width(const LmConfig& moe, int64_t dense_ff, int64_t experts) {
  if (experts < moe.moe.top_k)
    throw ConfigError(fmt::format("sweep: {} experts with moe.top_k = {}: expected at least "
                                  "top_k experts",
                                  experts, moe.moe.top_k));
  LmConfig c = moe;
  c.moe.n_experts = experts;
  const int64_t d = c.d_model, k = c.moe.top_k;
  const double shared = double(c.moe.n_shared_experts * 3 * d * c.moe.shared_width());
  const double exact = (3.0 * double(d * dense_ff) - double(c.router_params()) - shared) /
                       (3.0 * double(d * k));
  const int64_t width = int64_t(std::llround(exact / 8)) * 8;
  if (width < 8)
    throw ConfigError(fmt::format("sweep: {} experts of top-{} cannot match a dense FFN of width "
                                  "{} (router and shared experts take {:.0f} of its parameters)",
                                  experts, k, dense_ff, double(c.router_params()) + shared));
  return width;
}

std::vector<SweepRun> plan_sweep(const RunConfig& moe, const RunConfig& dense,
                                 const std::vector<int64_t>& experts,
                                 const std::vector<uint64_t>& seeds,
                                 const std::vector<uint64_t>& main_seeds) {
  const LmConfig &m = moe.model, &dn = dense.model;
  if (m.n_moe_layers() == 0)
    throw ConfigError(fmt::format("sweep: {} has no MoE layer (model.moe_every = 0): expected "
                                  "the MoE config",
                                  moe.name));
  if (dn.n_moe_layers() != 0)
    throw ConfigError(fmt::format("sweep: {} has MoE layers: expected a dense config "
                                  "(model.moe_every = 0)",
                                  dense.name));
  if (m.n_moe_layers() != m.n_layers)
    throw ConfigError(fmt::format("sweep: {} has dense layers too (model.moe_every = {}): "
                                  "expected an MoE feed-forward in every layer",
                                  moe.name, m.moe_every));
  auto same = [&](const char* what, auto a, auto b) {
    if (a != b)
      throw ConfigError(fmt::format("sweep: {} and {} differ in {} ({} vs {}): expected the same",
                                    moe.name, dense.name, what, a, b));
  };
  same("model.vocab", m.vocab, dn.vocab);
  same("model.context", m.context, dn.context);
  same("model.d_model", m.d_model, dn.d_model);
  same("model.n_layers", m.n_layers, dn.n_layers);
  same("model.n_heads", m.n_heads, dn.n_heads);
  same("train.steps", moe.train.steps, dense.train.steps);
  same("train.batch", moe.train.batch, dense.train.batch);
  same("train.eval_interval", moe.train.eval_interval, dense.train.eval_interval);
  same("train.eval_tokens", moe.train.eval_tokens, dense.train.eval_tokens);
  same("data.path", moe.data.path, dense.data.path);
  same("data.val_fraction", moe.data.val_fraction, dense.data.val_fraction);
  if (experts.empty()) throw ConfigError("sweep: --experts is empty: expected expert counts");
  if (seeds.empty()) throw ConfigError("sweep: --seeds is empty: expected seeds");

  std::vector<SweepRun> runs;
  auto add_dense = [&](uint64_t seed) {
    SweepRun r{fmt::format("{}-s{}", fs::path(dense.name).stem().string(), seed), 0, seed, dense};
    r.cfg.train.seed = seed;
    r.cfg.name = r.name;
    runs.push_back(std::move(r));
  };
  auto add_moe = [&](int64_t e, uint64_t seed) {
    SweepRun r{fmt::format("{}-e{}-s{}", fs::path(moe.name).stem().string(), e, seed), e, seed, moe};
    r.cfg.model.moe.n_experts = e;
    r.cfg.model.moe.d_ff = equal_flops_expert_width(m, dn.d_ff, e);
    r.cfg.train.seed = seed;
    r.cfg.name = r.name;
    r.cfg.model.validate();
    runs.push_back(std::move(r));
  };
  for (uint64_t seed : seeds) {
    add_dense(seed);
    for (int64_t e : experts) add_moe(e, seed);
  }
  for (uint64_t seed : main_seeds)
    if (std::find(seeds.begin(), seeds.end(), seed) == seeds.end()) {
      add_dense(seed);
      add_moe(m.moe.n_experts, seed);
    }
  return runs;
}

int64_t steps_to_reach(const TrainHistory& h, double target) {
  for (const auto& e : h.evals)
    if (e.val_loss <= target) return e.step;
  return -1;
}

namespace {

// Training seconds up to and including `step`, from the history's per-step rates.
double seconds_to(const TrainHistory& h, int64_t step, int64_t tokens_per_step) {
  double s = 0;
  for (const auto& st : h.steps)
    if (st.step <= step && st.tokens_per_s > 0) s += double(tokens_per_step) / st.tokens_per_s;
  return s;
}

double mean_tokens_per_s(const TrainHistory& h, int64_t tokens_per_step) {
  const double s = seconds_to(h, INT64_MAX, tokens_per_step);
  return s > 0 ? double(tokens_per_step) * double(h.steps.size()) / s : 0;
}

std::vector<DocLoss> read_doc_loss(const fs::path& path, int64_t step, size_t n_docs) {
  std::ifstream in(path);
  if (!in) return {};
  try {
    const auto j = nlohmann::json::parse(in);
    if (j.at("step").get<int64_t>() != step || j.at("nats").size() != n_docs) return {};
    std::vector<DocLoss> out(n_docs);
    for (size_t i = 0; i < n_docs; ++i)
      out[i] = {j["nats"][i].get<double>(), j["targets"][i].get<int64_t>()};
    return out;
  } catch (const std::exception&) {
    return {};  // a stale or damaged cache is recomputed
  }
}

const SweepResult* find_result(const std::vector<SweepResult>& results, int64_t experts,
                               uint64_t seed) {
  for (const SweepResult& r : results)
    if (r.run.experts == experts && r.run.seed == seed) return &r;
  return nullptr;
}

}  // namespace

SweepReport run_sweep(const std::vector<SweepRun>& runs, const SweepOptions& opt) {
  SweepReport report;
  if (runs.empty()) return report;
  const RunConfig& first = runs.front().cfg;
  const Corpus corpus = load_corpus(resolve_data_path(first.data.path), first.data.val_fraction,
                                    first.model.context);
  const std::vector<Batch> all_val =
      corpus.labelled() ? val_batches(corpus, first.train.batch, first.model.context, 0)
                        : std::vector<Batch>{};
  for (const SweepRun& run : runs) {
    const fs::path dir = fs::path(opt.out_dir) / run.name;
    const fs::path ck_path = dir / "checkpoint.safetensors";
    SweepResult res;
    res.run = run;
    // A finished run's checkpoint, kept for scoring; empty when this sweep trains the run.
    std::optional<Checkpoint> finished;
    if (fs::exists(ck_path)) {
      Checkpoint ck = load_checkpoint(ck_path.string(), /*with_optimizer=*/false);
      if (run_config_json(ck.cfg) != run_config_json(run.cfg))
        throw ConfigError(fmt::format("{} holds another run than the sweep's {}: its config {} "
                                      "vs {} (pass --out to sweep into another directory; "
                                      "nothing was overwritten)",
                                      ck_path.string(), run.name, run_config_json(ck.cfg),
                                      run_config_json(run.cfg)));
      if (ck.step >= run.cfg.train.steps) {
        res.history = std::move(ck.history);
        if (opt.log != nullptr)
          fmt::print(opt.log, "== {}: finished earlier ({} steps), reused\n", run.name, ck.step);
        finished = std::move(ck);
      }
    }
    if (!finished) {
      TrainOptions t;
      t.out_dir = dir.string();
      t.resume = fs::exists(ck_path);
      t.n_threads = opt.n_threads;
      t.log = opt.log;
      t.stop = opt.stop;
      if (opt.log != nullptr)
        fmt::print(opt.log, "== {}: E = {}, expert width {}, {:.2f} M active / {:.2f} M total "
                            "parameters{}\n",
                   run.name, run.experts, run.experts > 0 ? run.cfg.model.moe.d_ff : run.cfg.model.d_ff,
                   double(run.cfg.model.active_params()) / 1e6,
                   double(run.cfg.model.total_params()) / 1e6, t.resume ? ", resumed" : "");
      TrainResult tr = train(run.cfg, t);
      res.history = std::move(tr.history);
      if (tr.interrupted) {
        report.interrupted = true;
        break;
      }
    }
    const int64_t tokens_per_step = run.cfg.train.batch * run.cfg.model.context;
    res.final_val_loss = res.history.evals.empty() ? NAN : res.history.evals.back().val_loss;
    res.tokens_per_s = mean_tokens_per_s(res.history, tokens_per_step);
    if (corpus.labelled()) {
      const fs::path cache = dir / "doc_loss.json";
      res.doc_loss = read_doc_loss(cache, run.cfg.train.steps, corpus.docs.size());
      if (res.doc_loss.empty()) {
        if (!finished) finished = load_checkpoint(ck_path.string(), /*with_optimizer=*/false);
        const Checkpoint& ck = *finished;
        const LanguageModel model(ck.cfg.model);
        ExecContext ctx;
        ctx.n_threads = opt.n_threads;
        ctx.backend = &pick_backend(cpu_features(), ck.cfg.model.precision);
        const double t0 = wall_seconds();
        res.doc_loss = evaluate_by_doc(model, ck.params, all_val, int64_t(corpus.docs.size()), ctx);
        nlohmann::json j = {{"step", ck.step}, {"nats", nlohmann::json::array()},
                            {"targets", nlohmann::json::array()}};
        for (const DocLoss& l : res.doc_loss) j["nats"].push_back(l.nats), j["targets"].push_back(l.targets);
        write_file_atomic(cache.string(), j.dump() + "\n");
        if (opt.log != nullptr)
          fmt::print(opt.log, "{}: whole validation split scored per document in {:.0f} s\n",
                     run.name, wall_seconds() - t0);
      }
      double nats = 0, n = 0;
      for (const DocLoss& l : res.doc_loss) nats += l.nats, n += double(l.targets);
      res.val_loss_all = n > 0 ? nats / n : NAN;
    }
    report.results.push_back(std::move(res));
  }
  report.markdown = render_sweep_markdown(report.results, corpus.docs);
  std::vector<std::string> names;
  std::vector<const TrainHistory*> hs;
  const uint64_t seed0 = runs.front().seed;
  for (const SweepResult& r : report.results)
    if (r.run.seed == seed0) names.push_back(r.run.name), hs.push_back(&r.history);
  report.svg = render_loss_svg(names, hs, fmt::format("Validation loss, seed {}", seed0));
  fs::create_directories(opt.out_dir);
  write_file_atomic((fs::path(opt.out_dir) / "sweep.md").string(), report.markdown);
  write_file_atomic((fs::path(opt.out_dir) / "sweep.svg").string(), report.svg);
  return report;
}

std::string render_sweep_markdown(const std::vector<SweepResult>& results,
                                  const std::vector<CorpusDoc>& docs) {
  if (results.empty()) return "no finished runs\n";
  const RunConfig& c0 = results.front().run.cfg;
  const int64_t tokens_per_step = c0.train.batch * c0.model.context;
  std::string md = fmt::format(
      "Sweep on {}: {} steps of {} x {} tokens ({:.2f} M tokens), evaluated every {} steps on "
      "{} validation tokens; {}.\n\n",
      c0.data.path, c0.train.steps, c0.train.batch, c0.model.context,
      double(c0.train.steps * tokens_per_step) / 1e6, c0.train.eval_interval, c0.train.eval_tokens,
      describe_kernels(c0.model.precision));
  md += "| run | E | expert width | active params (vs dense) | total params | final val loss | "
        "whole-split loss | steps to dense's final loss | speed-up in steps | training s to it "
        "(dense's) | tokens/s | languages better than dense |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const SweepResult& r : results) {
    const SweepResult* d = find_result(results, 0, r.run.seed);
    const LmConfig& m = r.run.cfg.model;
    std::string reach = "-", speedup = "-", secs = "-", better = "-", ratio = "-";
    if (d != nullptr) {
      ratio = fmt::format("{:.4f}", double(m.active_params()) / double(d->run.cfg.model.active_params()));
      const int64_t s = steps_to_reach(r.history, d->final_val_loss);
      const int64_t dense_steps = d->history.evals.empty() ? d->run.cfg.train.steps : d->history.evals.back().step;
      const double dense_s = seconds_to(d->history, dense_steps, tokens_per_step);
      if (s > 0) {
        reach = std::to_string(s);
        speedup = fmt::format("{:.2f}x", double(dense_steps) / double(s));
        secs = fmt::format("{:.0f} ({:.0f})", seconds_to(r.history, s, tokens_per_step), dense_s);
      } else {
        reach = "not reached";
      }
      if (r.run.experts > 0 && !r.doc_loss.empty() && d->doc_loss.size() == r.doc_loss.size()) {
        int64_t n = 0;
        for (size_t i = 0; i < r.doc_loss.size(); ++i) n += r.doc_loss[i].mean() < d->doc_loss[i].mean();
        better = fmt::format("{} of {} ({:.0f}%)", n, r.doc_loss.size(), 100.0 * double(n) / double(r.doc_loss.size()));
      }
    }
    md += fmt::format("| {} | {} | {} | {:.3f} M ({}) | {:.2f} M | {:.4f} | {} | {} | {} | {} | {:.0f} | {} |\n",
                      r.run.name, r.run.experts, r.run.experts > 0 ? m.moe.d_ff : m.d_ff,
                      double(m.active_params()) / 1e6, ratio, double(m.total_params()) / 1e6,
                      r.final_val_loss, r.doc_loss.empty() ? std::string("-") : fmt::format("{:.4f}", r.val_loss_all),
                      reach, speedup, secs, r.tokens_per_s, better);
  }

  // Seeds: mean and range of the final loss per configuration run with more than one seed.
  std::map<int64_t, std::vector<double>> by_e;
  for (const SweepResult& r : results) by_e[r.run.experts].push_back(r.final_val_loss);
  std::string seeds;
  for (const auto& [e, v] : by_e)
    if (v.size() > 1) {
      double mean = 0;
      for (double x : v) mean += x / double(v.size());
      seeds += fmt::format("| {} | {} | {:.4f} | {:.4f} .. {:.4f} |\n", e == 0 ? std::string("dense") : fmt::format("E = {}", e),
                           v.size(), mean, *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()));
    }
  if (!seeds.empty())
    md += "\nFinal validation loss over seeds:\n\n| config | seeds | mean | range |\n|---|---:|---:|---:|\n" + seeds;

  // Per language: the MoE run with the lowest whole-split loss against the dense run of its seed.
  const SweepResult* best = nullptr;
  for (const SweepResult& r : results)
    if (r.run.experts > 0 && !r.doc_loss.empty() && find_result(results, 0, r.run.seed) != nullptr &&
        (best == nullptr || r.val_loss_all < best->val_loss_all))
      best = &r;
  if (best != nullptr && !docs.empty()) {
    const SweepResult& d = *find_result(results, 0, best->run.seed);
    struct Gap {
      size_t doc;
      double gap;  // dense - MoE, nats per byte: positive where MoE helps
    };
    std::vector<Gap> gaps;
    std::map<std::string, std::pair<double, int64_t>> by_script;
    for (size_t i = 0; i < docs.size() && i < best->doc_loss.size(); ++i) {
      if (best->doc_loss[i].targets == 0) continue;
      const double g = d.doc_loss[i].mean() - best->doc_loss[i].mean();
      gaps.push_back({i, g});
      auto& s = by_script[docs[i].script];
      s.first += g, ++s.second;
    }
    std::sort(gaps.begin(), gaps.end(), [](const Gap& a, const Gap& b) { return a.gap > b.gap; });
    auto row = [&](const Gap& g) {
      return fmt::format("| {} | {} | {} | {:.4f} | {:.4f} | {:+.4f} |\n", docs[g.doc].id,
                         docs[g.doc].name, docs[g.doc].script, d.doc_loss[g.doc].mean(),
                         best->doc_loss[g.doc].mean(), g.gap);
    };
    const std::string head = fmt::format("| id | language | script | {} | {} | gain |\n|---|---|---|---:|---:|---:|\n",
                                         d.run.name, best->run.name);
    md += fmt::format("\nPer language, {} against {} (whole validation split, nats per byte; gain = "
                      "dense - MoE). Helped most:\n\n{}",
                      best->run.name, d.run.name, head);
    for (size_t i = 0; i < std::min<size_t>(10, gaps.size()); ++i) md += row(gaps[i]);
    md += "\nHelped least (or hurt):\n\n" + head;
    for (size_t i = gaps.size() > 5 ? gaps.size() - 5 : 0; i < gaps.size(); ++i) md += row(gaps[i]);
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> scripts(by_script.begin(), by_script.end());
    std::sort(scripts.begin(), scripts.end(), [](const auto& a, const auto& b) {
      return a.second.second != b.second.second ? a.second.second > b.second.second : a.first < b.first;
    });
    md += "\nMean gain by script:\n\n| script | languages | mean gain | \n|---|---:|---:|\n";
    for (const auto& [s, v] : scripts)
      md += fmt::format("| {} | {} | {:+.4f} |\n", s, v.second, v.first / double(v.second));
  }

  // Validation loss at every evaluation, seed by seed.
  md += "\nValidation loss by step:\n\n| step |";
  std::string rule = "|---:|";
  for (const SweepResult& r : results) md += " " + r.run.name + " |", rule += "---:|";
  md += "\n" + rule + "\n";
  size_t n_evals = 0;
  for (const SweepResult& r : results) n_evals = std::max(n_evals, r.history.evals.size());
  for (size_t i = 0; i < n_evals; ++i) {
    int64_t step = 0;
    for (const SweepResult& r : results)
      if (i < r.history.evals.size()) step = r.history.evals[i].step;
    md += fmt::format("| {} |", step);
    for (const SweepResult& r : results)
      md += i < r.history.evals.size() ? fmt::format(" {:.4f} |", r.history.evals[i].val_loss) : std::string(" - |");
    md += "\n";
  }
  return md;
}

}  // namespace sy
