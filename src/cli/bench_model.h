// `switchyard bench model --model DIR`: a Hugging Face model's prefill and decode speed, beside
// the weight-read ceiling measured in the same run. Prefill: tokens/s of one prompt of each
// length (last position's logits only, as generation needs), the faster of --iters runs after an
// untimed warm-up. Decode: --batch sequences, each holding --context tokens of the text, step
// together (forward_batch, greedy) for --steps steps; tokens/s is batch / median step. The
// ceiling: the bytes a step reads (every non-expert weight but the embedding, plus each MoE
// layer's experts that step's tokens chose, counted from its routing) over the copy bandwidth.
// Also printed: the resident memory after loading against the weights' bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sy::cli {

struct BenchModelOptions {
  std::string model;
  std::vector<int64_t> prefill = {512, 2048};
  std::vector<int64_t> batch = {1, 8};
  int64_t steps = 16;
  int64_t context = 128;
  int iters = 2;
  int n_threads = 0;
  std::string precision = "f32";  // f32, bf16 or auto
  std::string text;               // default: data/austen.txt.gz
  std::string json_path;
};

int run_bench_model(const BenchModelOptions& opt);

}  // namespace sy::cli
