// Training with expert parallelism against one process: the same losses step by step, the same
// validation loss, checkpoints of the whole model that load on any number of ranks, and the
// configurations it refuses. Runs under mpirun -np 2 and -np 4.
#include <gtest/gtest.h>

#include <filesystem>

#include "switchyard/dist/comm.h"
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
