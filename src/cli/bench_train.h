// `switchyard bench train`: steady-state training throughput of a run config (default
// austen-moe), as tokens/s and as a fraction of the machine's dense sgemm FLOP rate measured
// in the same run. FLOPs per token: 6 x active parameters + 12 x n_layers x d x context
// (attention scores and values over the full square, the convention of PaLM's appendix B).
#pragma once

#include <cstdint>
#include <string>

namespace sy::cli {

struct BenchTrainOptions {
  std::string config = "austen-moe";
  int64_t steps = 8;   // timed steps
  int64_t warmup = 3;  // untimed steps first (allocation, page faults)
  int n_threads = 0;
  std::string precision;  // empty: the config's model.precision
  std::string json_path;
};

int run_bench_train(const BenchTrainOptions& opt);

}  // namespace sy::cli
