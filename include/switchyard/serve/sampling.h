// Choosing the next token from a model's logits: temperature, top-k and top-p (nucleus), with
// draw i of a Philox stream so that a seed fixes a whole generation, whatever else runs beside
// it (the server's sequences share steps, never random numbers).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "switchyard/core/rng.h"

namespace sy {

struct Sampling {
  double temperature = 1.0;  // 0: greedy (the largest logit; ties to the lowest id)
  int64_t top_k = 0;         // keep the k most likely tokens; 0: all
  double top_p = 1.0;        // then the smallest set whose mass reaches top_p; 1: all
};

// Throws ConfigError naming the field: as a command-line flag ("--top-p") or as the API's
// JSON field ("top_p").
enum class FieldNames { kFlags, kJson };
void check_sampling(const Sampling& s, FieldNames names);

// The generation stream of a seed: draw i picks token i of the completion.
inline Philox sampling_stream(uint64_t seed) { return Philox(seed, 0x6E4); }

// Reusable buffers of sample_token (one per caller thread).
struct SamplerScratch {
  std::vector<int32_t> order;
  std::vector<double> prob;
};

// Softmax at the temperature, then top-k, then top-p, renormalised; draw i of rng.
int32_t sample_token(std::span<const float> logits, const Sampling& s, const Philox& rng, int64_t i,
                     SamplerScratch& scratch);

}  // namespace sy
