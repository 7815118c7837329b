// Training with expert parallelism against one process: the same losses step by step, the same
// validation loss, checkpoints of the whole model that load on any number of ranks, and the
// configurations it refuses. Runs under mpirun -np 2 and -np 4.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "switchyard/dist/comm.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/parallel.h"
#include "switchyard/train/trainer.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

// The default model's shape of routing (8 experts, top-2, capacity 1.25 in training, 2.0 in
// evaluation, balance and z losses) at a size that trains 20 steps in seconds.
RunConfig small_moe(int64_t steps) {
  return parse_run_config(R"({
    "model": {"vocab": 256, "context": 32, "d_model": 32, "n_layers": 2, "n_heads": 2,
              "moe_every": 1,
              "moe": {"n_experts": 8, "top_k": 2, "d_ff": 48, "router": "softmax_topk",
                      "capacity_factor_train": 1.25, "capacity_factor_eval": 2.0,
                      "loss_balance_weight": 0.01, "loss_z_weight": 0.001}},
    "train": {"steps": )" + std::to_string(steps) + R"(, "batch": 8, "lr": 0.003, "min_lr": 0.0003,
              "warmup": 4, "eval_interval": 10, "eval_tokens": 2048, "checkpoint_interval": 10,
              "seed": 3},
    "data": {"path": ")" SY_SOURCE_DIR R"(/data/austen.txt.gz", "val_fraction": 0.05}
  })",
                          "small-moe");
}

// A run directory every rank agrees on (rank 0 clears it).
fs::path run_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() /
                     fmt::format("sy_ep_train_{}_np{}", name, Comm::world().size());
  if (Comm::world().rank() == 0) fs::remove_all(p);
  Comm::world().barrier();
  return p;
}

TrainOptions quiet(const fs::path& out, const ParallelGroup* grid, int threads = 1) {
  TrainOptions o;
  o.out_dir = out.string();
  o.log = nullptr;
  o.parallel = grid;
  o.n_threads = threads;
  return o;
}

void expect_same_run(const TrainResult& got, const TrainResult& want, const std::string& what) {
  ASSERT_EQ(got.history.steps.size(), want.history.steps.size()) << what;
  for (size_t i = 0; i < want.history.steps.size(); ++i) {
    const double a = got.history.steps[i].loss, b = want.history.steps[i].loss;
    EXPECT_LE(std::abs(a - b), 1e-4 * std::abs(b)) << what << ": step " << i + 1 << " loss " << a
                                                   << " vs one process " << b;
  }
  EXPECT_LE(std::abs(got.final_val_loss - want.final_val_loss), 1e-4 * want.final_val_loss)
      << what;
}

TEST(ExpertParallelTraining, TwentyStepsEqualOneProcess) {
  const RunConfig cfg = small_moe(20);
  const fs::path one = run_dir("one"), ep = run_dir("ep");
  // Rank 0 also trains alone (the others wait for it at the next collective).
  TrainResult alone;
  if (Comm::world().rank() == 0) alone = train(cfg, quiet(one, nullptr, 1));
  const MpiParallelGroup grid(Comm::world(), Comm::world().size());
  const TrainResult got = train(cfg, quiet(ep, &grid));
  if (Comm::world().rank() == 0) {
    expect_same_run(got, alone, fmt::format("--expert-parallel {}", grid.ep_size()));
    // Loads into one process as the whole model.
    Checkpoint ck = load_checkpoint(got.checkpoint, /*with_optimizer=*/true);
    EXPECT_EQ(ck.params.layers[0].moe.w1.dim(0), 8);
    EXPECT_EQ(ck.optimizer->m().layers[0].moe.w1.dim(0), 8);
  }
}

TEST(ExpertParallelTraining, OverlappedExchangeEqualsOneProcess) {
  // Each owner computes a source's rows as they arrive, per (source, expert) piece: the same
  // losses to rounding.
  const RunConfig cfg = small_moe(20);
  const fs::path one = run_dir("one_ov"), ep = run_dir("ep_ov");
  TrainResult alone;
  if (Comm::world().rank() == 0) alone = train(cfg, quiet(one, nullptr, 1));
  const MpiParallelGroup grid(Comm::world(), Comm::world().size());
  TrainOptions o = quiet(ep, &grid);
  o.exchange_overlap = true;
  const TrainResult got = train(cfg, o);
  if (Comm::world().rank() == 0) expect_same_run(got, alone, "--overlap");
}

TEST(ExpertParallelTraining, ReplicasOfExpertGroupsMatchWhenDropless) {
  // 2 expert groups x W/2 replicas: capacity is each group's own, so dropless compares exactly.
  const int W = Comm::world().size();
  if (W < 4) GTEST_SKIP() << "needs 4 ranks";
  RunConfig cfg = small_moe(12);
  cfg.model.moe.dropless = true;
  const fs::path one = run_dir("one_dropless"), ep = run_dir("ep_dp");
  TrainResult alone;
  if (Comm::world().rank() == 0) alone = train(cfg, quiet(one, nullptr, 1));
  const MpiParallelGroup grid(Comm::world(), W / 2);
  const TrainResult got = train(cfg, quiet(ep, &grid));
  if (Comm::world().rank() == 0) expect_same_run(got, alone, "expert groups x replicas");
}

TEST(ExpertParallelTraining, ResumesAcrossRankCounts) {
  // One run of 30 steps in three legs: 10 alone, 10 on every rank from that checkpoint, 10 alone
  // again from the parallel run's checkpoint. The losses are those of 30 steps alone.
  const RunConfig cfg = small_moe(30);
  const fs::path dir = run_dir("reshard"), whole = run_dir("reshard_whole");
  const MpiParallelGroup grid(Comm::world(), Comm::world().size());
  TrainResult reference;
  if (Comm::world().rank() == 0) {
    TrainOptions first = quiet(dir, nullptr, 1);
    first.stop_after = 10;
    train(cfg, first);
    reference = train(cfg, quiet(whole, nullptr, 1));
  }
  Comm::world().barrier();
  TrainOptions resume = quiet(dir, &grid);
  resume.resume = true;
  resume.stop_after = 10;
  const TrainResult second = train(cfg, resume);
  EXPECT_EQ(second.steps_done, 20);
  if (Comm::world().rank() == 0) {
    TrainOptions back = quiet(dir, nullptr, 1);
    back.resume = true;
    const TrainResult third = train(cfg, back);
    ASSERT_EQ(third.history.steps.size(), 30u);
    for (size_t i = 0; i < 30; ++i)
      EXPECT_LE(std::abs(third.history.steps[i].loss - reference.history.steps[i].loss),
                1e-4 * reference.history.steps[i].loss)
          << "step " << i + 1 << " after one process -> " << grid.ep_size()
          << " ranks -> one process";
  }
}

TEST(ExpertParallelTraining, BfloatExchangeTracksFloat) {
  // Rows rounded to bf16 on the wire, the exchange overlapped or not: the losses follow the f32
  // run's closely but not exactly (f32's last-bit differences between the two schedules move
  // values across bf16 roundings, so they do not equal each other either).
  const RunConfig cfg = small_moe(20);
  const MpiParallelGroup grid(Comm::world(), Comm::world().size());
  const TrainResult f32 = train(cfg, quiet(run_dir("x_f32"), &grid));
  for (const bool overlap : {false, true}) {
    TrainOptions o = quiet(run_dir(overlap ? "x_bf16_overlap" : "x_bf16"), &grid);
    o.exchange_bf16 = true;
    o.exchange_overlap = overlap;
    const TrainResult b16 = train(cfg, o);
    ASSERT_EQ(b16.history.steps.size(), f32.history.steps.size());
    double max_rel = 0;
    for (size_t i = 0; i < f32.history.steps.size(); ++i) {
      const double a = b16.history.steps[i].loss, b = f32.history.steps[i].loss;
      max_rel = std::max(max_rel, std::abs(a - b) / b);
    }
    EXPECT_LE(max_rel, 1e-2) << "overlap " << overlap;
    if (grid.ep_size() > 1) {
      EXPECT_GT(max_rel, 0.0) << "overlap " << overlap;  // the rounding happened
    }
    EXPECT_LE(std::abs(b16.final_val_loss - f32.final_val_loss), 1e-2 * f32.final_val_loss)
        << "overlap " << overlap;
  }
}

// File size less the safetensors header: the tensor bytes a shard holds.
int64_t data_bytes(const fs::path& p) {
  const MappedSafetensors f(p.string());
  int64_t n = 0;
  for (const auto& [name, e] : f.entries()) n += int64_t(e.nbytes);
  return n;
}

TEST(ShardedCheckpoint, EachRankWritesItsShareAndAnyLayoutLoadsIt) {
  const int P = Comm::world().size();
  RunConfig cfg = small_moe(10);
  const MpiParallelGroup grid(Comm::world(), P);
  const fs::path sharded = run_dir("sharded"), whole = run_dir("sharded_as_file");
  const TrainResult a = train(cfg, quiet(sharded, &grid));
  RunConfig as_file = cfg;
  as_file.train.checkpoint_format = "file";
  const TrainResult b = train(as_file, quiet(whole, &grid));
  EXPECT_EQ(a.checkpoint, (sharded / "checkpoint").string());
  if (Comm::world().rank() == 0) {
    // The same model, optimizer and history either way.
    const Checkpoint x = load_checkpoint(a.checkpoint, true), y = load_checkpoint(b.checkpoint, true);
    EXPECT_EQ(x.step, 10);
    EXPECT_EQ(x.step, y.step);
    EXPECT_EQ(x.history.steps.size(), y.history.steps.size());
    auto same = [](LmParams& p, LmParams& q, const std::string& what) {
      auto pn = p.named(), qn = q.named();
      ASSERT_EQ(pn.size(), qn.size());
      for (size_t i = 0; i < pn.size(); ++i) {
        ASSERT_EQ(pn[i].second->shape(), qn[i].second->shape()) << what << pn[i].first;
        EXPECT_EQ(std::memcmp(pn[i].second->bytes(), qn[i].second->bytes(), pn[i].second->nbytes()), 0)
            << what << pn[i].first;
      }
    };
    Checkpoint xs = load_checkpoint(a.checkpoint, true), ys = load_checkpoint(b.checkpoint, true);
    same(xs.params, ys.params, "model.");
    same(xs.optimizer->m(), ys.optimizer->m(), "adam.m.");
    same(xs.optimizer->v(), ys.optimizer->v(), "adam.v.");

    // Each rank wrote its share: its experts' rows (model and both moments); rank 0 also the
    // rest. Exactly, in tensor bytes.
    int64_t expert_bytes = 0, other_bytes = 0;
    for (auto& [name, t] : xs.params.named())
      (is_expert_weight(name) ? expert_bytes : other_bytes) += 3 * int64_t(t->nbytes());
    const fs::path dir = a.checkpoint;
    for (int r = 0; r < P; ++r)
      EXPECT_EQ(data_bytes(dir / fmt::format("experts.{}-of-{}.s00000010.safetensors", r, P)),
                expert_bytes / P)
          << "rank " << r;
    EXPECT_EQ(data_bytes(dir / "shared.s00000010.safetensors"), other_bytes);

    // A save that died before its index: the previous checkpoint is what loads.
    const fs::path s10 = dir / "shared.s00000010.safetensors";
    fs::copy_file(s10, dir / "shared.s00000020.safetensors");
    { std::ofstream(dir / "experts.0-of-2.s00000020.safetensors.tmp") << "half a file"; }
    EXPECT_EQ(load_checkpoint(a.checkpoint, true).step, 10);

    // Files of two saves mixed: named.
    const std::string index = [&] {
      std::ifstream in(dir / kShardIndex);
      return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    }();
    auto with_index = [&](const std::string& text) {
      std::ofstream(dir / kShardIndex) << text;
      try {
        load_checkpoint(a.checkpoint, true);
      } catch (const IoError& e) {
        return std::string(e.what());
      }
      return std::string("(loaded)");
    };
    std::string mixed = index;
    const std::string step10 = "\"step\": 10";
    mixed.replace(mixed.find(step10), step10.size(), "\"step\": 20");
    const std::string mixed_error = with_index(mixed);
    EXPECT_NE(mixed_error.find("files of two saves are mixed"), std::string::npos) << mixed_error;
    if (P > 1) {
      // Rank 1's experts under rank 0's name: the same shapes, other bytes.
      std::string swapped = index;
      const std::string f0 = fmt::format("\"experts.0-of-{}.s00000010.safetensors\"", P);
      const std::string f1 = fmt::format("\"experts.1-of-{}.s00000010.safetensors\"", P);
      for (size_t at = swapped.find(f0); at != std::string::npos; at = swapped.find(f0, at))
        swapped.replace(at, f0.size(), f1);
      EXPECT_NE(with_index(swapped).find("the shard is from another save"), std::string::npos);
    }
    std::string no_tensor = index;
    const size_t at = no_tensor.find("\"model.lm_head\"");
    ASSERT_NE(at, std::string::npos);
    no_tensor.replace(at, std::string("\"model.lm_head\"").size(), "\"model.lm_hexd\"");
    EXPECT_NE(with_index(no_tensor).find("tensor model.lm_head missing"), std::string::npos);
    std::ofstream(dir / kShardIndex) << index;
  }
  Comm::world().barrier();
  // The next save replaces every file and leaves no orphan.
  cfg.train.steps = 20;
  TrainOptions more = quiet(sharded, &grid);
  more.resume = true;
  const TrainResult c = train(cfg, more);
  EXPECT_EQ(c.steps_done, 20);
  if (Comm::world().rank() == 0) {
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(c.checkpoint)) files.push_back(e.path().filename());
    std::sort(files.begin(), files.end());
    std::vector<std::string> want = {kShardIndex, "shared.s00000020.safetensors"};
    for (int r = 0; r < P; ++r)
      want.push_back(fmt::format("experts.{}-of-{}.s00000020.safetensors", r, P));
    std::sort(want.begin(), want.end());
    EXPECT_EQ(files, want);
  }
}

TEST(ExpertParallelTraining, BatchNotDividedByRanksIsAClearError) {
  RunConfig cfg = small_moe(2);
  cfg.train.batch = Comm::world().size() * 2 + 1;
  const MpiParallelGroup grid(Comm::world(), Comm::world().size());
  try {
    train(cfg, quiet(run_dir("bad_batch"), &grid));
    FAIL() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("train.batch ="), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sy
