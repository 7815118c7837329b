// `switchyard bench expert-parallel`: see bench_ep.h.
#include "cli/bench_ep.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli/bench_moe.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/core/rng.h"
#include "switchyard/dist/comm.h"
#include "switchyard/train/parallel.h"
#include "switchyard/train/run_config.h"
#include "switchyard/train/trainer.h"

namespace sy::cli {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct LayerFigures {
  double step_s = 0, exchange_s = 0;          // slowest rank's median, and its all-to-all part
  double wait_s = 0;                          // of exchange_s: waiting for the slowest rank
  double values_per_token = 0, theory = 0;    // forward, per token per layer
  double remote_slot_share = 0;               // slots whose expert lives on another rank
  // [P][P]: forward activation values rank r sent to rank q in one layer step (rows
  // dispatched to q's experts plus the outputs of q's rows sent back); the backward sends as
  // many again.
  std::vector<std::vector<double>> values_to;
};

LayerFigures bench_layer(const RunConfig& run, const MpiParallelGroup& grid,
                         const BenchEpOptions& opt) {
  MoeConfig cfg = run.model.moe_config();
  if (opt.capacity_factor > 0)
    cfg.capacity_factor_train = opt.capacity_factor;
  else
    cfg.dropless = true;
  const int64_t P = grid.ep_size(), d = cfg.d_model;
  const int64_t tokens = run.train.batch * run.model.context;  // the whole batch, all ranks
  const int64_t mine = tokens / grid.world_size();
  MoeLayer layer(cfg);
  MoeParams p = init_moe_params(cfg, DType::kF32, 1);
  for (Tensor* t : {&p.w1, &p.w3, &p.w2}) *t = expert_shard(*t, grid.ep_rank(), P);
  MoeParams g = zeros_like(p);
  Tensor x({mine, d}, DType::kF32), dy({mine, d}, DType::kF32), y, dx;
  fill_normal(x.span<float>(), Philox(11, uint64_t(grid.world_rank())), 1.0f);
  fill_normal(dy.span<float>(), Philox(12, uint64_t(grid.world_rank())), 1.0f);
  ExecContext ctx;
  ctx.parallel = &grid;
  ctx.exchange_bf16 = opt.exchange == "bf16";
  ctx.exchange_overlap = overlap_exchange(opt.overlap, grid);
  ctx.profile = opt.split_wait;
  ctx.n_threads = 1;
  MoeCache cache;
  std::vector<double> step, exchange, wait;
  for (int64_t i = 0; i < opt.iters + 1; ++i) {
    grid.world().barrier();
    const double t0 = wall_seconds();
    layer.forward(p, x, y, cache, ctx);
    layer.backward(p, cache, dy, g, dx, ctx);
    const double dt = wall_seconds() - t0;
    if (i == 0) continue;  // first touch of every buffer
    step.push_back(dt);
    exchange.push_back(cache.times.exchange + cache.times.backward_exchange);
    wait.push_back(cache.times.exchange_wait);
  }
  // Every iteration routes the same inputs alike: the volume of the last one stands for all.
  const double sent = double(cache.ep.values_sent);
  double remote = 0;
  const int64_t El = cfg.n_experts / P;
  for (int32_t e : cache.router.expert) remote += (e / El != grid.ep_rank());
  const double slots = double(cache.router.expert.size());
  // [step, exchange] of every rank; the slowest rank sets the pace.
  std::vector<double> all(size_t(3 * grid.world_size()), 0.0);
  all[size_t(3 * grid.world_rank())] = median(step);
  all[size_t(3 * grid.world_rank() + 1)] = median(exchange);
  all[size_t(3 * grid.world_rank() + 2)] = median(wait);
  std::vector<double> sums = {sent, remote, slots};
  std::vector<double> pairs(size_t(P * P), 0.0);
  for (int64_t q = 0; q < P; ++q)
    if (q != grid.ep_rank())
      pairs[size_t(grid.ep_rank() * P + q)] =
          double((cache.ep.send_rows[size_t(q)] + cache.ep.recv_rows[size_t(q)]) * d);
  grid.world_allreduce_sum(all);
  grid.world_allreduce_sum(sums);
  grid.world_allreduce_sum(pairs);
  LayerFigures f;
  for (int r = 0; r < grid.world_size(); ++r)
    if (all[size_t(3 * r)] > f.step_s)
      f.step_s = all[size_t(3 * r)], f.exchange_s = all[size_t(3 * r + 1)],
      f.wait_s = all[size_t(3 * r + 2)];
  f.values_per_token = sums[0] / double(mine * grid.world_size());
  f.theory = 2.0 * double(cfg.top_k) * double(d) * double(P - 1) / double(P);
  f.remote_slot_share = sums[2] > 0 ? sums[1] / sums[2] : 0.0;
  for (int64_t r = 0; r < P; ++r)
    f.values_to.emplace_back(pairs.begin() + r * P, pairs.begin() + (r + 1) * P);
  return f;
}

}  // namespace

int run_bench_ep(const BenchEpOptions& opt) {
  MpiSession mpi(nullptr, nullptr);
  const Comm world = Comm::world();
  const MpiParallelGroup grid(world, world.size());
  const bool lead = world.rank() == 0;
  if (opt.exchange != "f32" && opt.exchange != "bf16")
    throw ConfigError(fmt::format("--exchange {}: expected f32 or bf16", opt.exchange));
  RunConfig run = load_run_config(opt.config, {});
  const int64_t P = world.size();
  if (run.model.n_moe_layers() == 0)
    throw ConfigError(fmt::format("--config {}: a dense model has no experts to spread", opt.config));

  const LayerFigures f = bench_layer(run, grid, opt);
  if (lead) {
    fmt::print("MoE layer of {} (d {}, f {}, E {}, k {}), {} tokens over {} ranks, forward + "
               "backward, one thread per rank:\n",
               run.name, run.model.d_model, run.model.moe.d_ff, run.model.moe.n_experts,
               run.model.moe.top_k, run.train.batch * run.model.context, P);
    fmt::print("  step {:.2f} ms: all-to-all {:.2f} ms ({:.0f}%), compute {:.2f} ms\n",
               1e3 * f.step_s, 1e3 * f.exchange_s, 100 * f.exchange_s / f.step_s,
               1e3 * (f.step_s - f.exchange_s));
    if (opt.split_wait)
      fmt::print("  of the all-to-all: {:.2f} ms waiting for the slowest rank, {:.2f} ms moving rows\n",
                 1e3 * f.wait_s, 1e3 * (f.exchange_s - f.wait_s));
    fmt::print("  forward values sent per token per layer: {:.1f} measured, {:.1f} = 2 k d (P-1)/P "
               "({:.3f} of it; {:.3f} of slots went to another rank, (P-1)/P = {:.3f}); {:.1f} "
               "KiB per token per layer on the wire ({})\n",
               f.values_per_token, f.theory, f.theory > 0 ? f.values_per_token / f.theory : 0.0,
               f.remote_slot_share, double(P - 1) / double(P),
               f.values_per_token * (opt.exchange == "bf16" ? 2 : 4) / 1024, opt.exchange);
  }

  double alone_tps = 0, ep_tps = 0;
  if (opt.train_steps > 0) {
    namespace fs = std::filesystem;
    run.train.steps = opt.train_steps;
    run.train.eval_interval = opt.train_steps * 10;  // timing only: no evaluation
    run.train.checkpoint_interval = opt.train_steps * 10;
    // One run directory for every rank (each writes its shard of the checkpoint there): rank
    // 0's process id names it.
    int64_t id = ::getpid();
    world.broadcast(reinterpret_cast<std::byte*>(&id), sizeof(id), 0);
    const fs::path base = fs::temp_directory_path() / fmt::format("sy_bench_ep_{}", id);
    TrainOptions o;
    o.log = nullptr;
    if (lead) {
      // mpirun binds each rank to a core when ranks <= cores; the reference gets every core.
      cpu_set_t bound, every;
      sched_getaffinity(0, sizeof(bound), &bound);
      CPU_ZERO(&every);
      for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, &every);
      sched_setaffinity(0, sizeof(every), &every);
      o.out_dir = (base / "alone").string();
      fs::remove_all(o.out_dir);
      o.n_threads = int(P);
      alone_tps = train(run, o).tokens_per_s;
      sched_setaffinity(0, sizeof(bound), &bound);
    }
    world.barrier();
    o.out_dir = (base / "ep").string();
    if (lead) fs::remove_all(o.out_dir);
    world.barrier();
    o.n_threads = 1;
    o.parallel = &grid;
    o.exchange_bf16 = opt.exchange == "bf16";
    o.exchange_overlap = overlap_exchange(opt.overlap, grid);
    ep_tps = train(run, o).tokens_per_s;
    world.barrier();
    if (lead) {
      fs::remove_all(base);
      fmt::print("training {} for {} steps: {} ranks x 1 thread {:.0f} tokens/s, one process x {} "
                 "threads {:.0f} tokens/s: {:.2f} of it\n",
                 run.name, opt.train_steps, P, ep_tps, P, alone_tps, ep_tps / alone_tps);
    }
  }
  if (lead && !opt.json_path.empty()) {
    const nlohmann::json j = {{"config", run.name},
                              {"ranks", P},
                              {"layer_step_s", f.step_s},
                              {"layer_exchange_s", f.exchange_s},
                              {"layer_exchange_wait_s", opt.split_wait ? nlohmann::json(f.wait_s) : nlohmann::json()},
                              {"values_per_token_per_layer", f.values_per_token},
                              {"values_theory", f.theory},
                              {"remote_slot_share", f.remote_slot_share},
                              {"forward_values_sent", f.values_to},
                              {"timed_iters", opt.iters},
                              {"exchange", opt.exchange},
                              {"overlap", overlap_exchange(opt.overlap, grid)},
                              {"train_tokens_per_s", ep_tps},
                              {"train_alone_tokens_per_s", alone_tps}};
    write_json_output(j.dump(2) + "\n", opt.json_path);
  }
  return 0;
}

}  // namespace sy::cli
