// `switchyard bench expert-parallel`, run under mpirun -np P: what expert parallelism costs on
// this machine.
//   layer: the MoE layer of a config (default austen-moe's) on a batch split over the P ranks,
//          forward + backward: step time, all-to-all time against compute, and the activation
//          values sent per token per layer (forward, measured) against 2 k d (P-1) / P.
//   train: tokens/s of training the config on all P ranks (one thread each unless --threads)
//          against rank 0 training alone with P threads, measured in the same job.
#pragma once

#include <cstdint>
#include <string>

namespace sy::cli {

struct BenchEpOptions {
  std::string config = "austen-moe";
  int64_t iters = 7;          // timed layer steps (median)
  int64_t train_steps = 12;   // training steps per run (0: skip the training comparison)
  double capacity_factor = 0; // 0: dropless (the volume then depends on routing alone)
  std::string exchange = "f32";  // dtype of the rows crossing ranks: f32 or bf16
  std::string overlap = "auto";  // the exchanges overlap expert compute: on, off, auto
  bool split_wait = false;       // time the wait for the slowest rank apart (MoeTimes)
  std::string json_path;
};

int run_bench_ep(const BenchEpOptions& opt);

}  // namespace sy::cli
