// `switchyard bench serve`: throughput against latency of `switchyard serve`, driven over
// loopback by N concurrent streaming clients for each N, with continuous batching and, in the
// same run, with batching off (one sequence at a time); beside the weight-read ceiling of a
// batch-1 decode step (bytes of weights it reads / copy bandwidth measured in the same run).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sy::cli {

struct BenchServeOptions {
  std::string checkpoint;              // serve this; empty: random weights of --config
  std::string config = "austen-moe";   // built-in config or JSON file (without --checkpoint)
  std::vector<int64_t> clients = {1, 2, 4, 8, 16, 32, 64};
  int64_t requests = 4;                // per client, one after another
  int64_t max_tokens = 64;             // per request
  int64_t prompt_bytes = 32;
  double max_seconds = 60;             // per N: no new request after this
  bool batching_off = true;            // also run the server with max_batch 1
  int threads = 0;                     // the engine's compute threads (0: all cores)
  std::string precision;               // f32, bf16, auto; default: the model's
  std::string json_path;
  std::string svg_path;                // throughput against latency
};

int run_bench_serve(const BenchServeOptions& opt);

}  // namespace sy::cli
