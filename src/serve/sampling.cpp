// Next-token sampling: see sampling.h.
#include "switchyard/serve/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "switchyard/core/error.h"

namespace sy {

void check_sampling(const Sampling& s, FieldNames names) {
  const bool flags = names == FieldNames::kFlags;
  if (!(s.temperature >= 0) || !std::isfinite(s.temperature))
    throw ConfigError(fmt::format("{} {}: expected >= 0", flags ? "--temperature" : "temperature",
                                  s.temperature));
  if (!(s.top_p > 0 && s.top_p <= 1))
    throw ConfigError(
        fmt::format("{} {}: expected in (0, 1]", flags ? "--top-p" : "top_p", s.top_p));
  if (s.top_k < 0)
    throw ConfigError(fmt::format("{} {}: expected >= 0", flags ? "--top-k" : "top_k", s.top_k));
}

int32_t sample_token(std::span<const float> logits, const Sampling& s, const Philox& rng, int64_t i,
                     SamplerScratch& scratch) {
  if (s.temperature == 0)
    return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<int32_t>& order = scratch.order;
  std::vector<double>& prob = scratch.prob;
  order.resize(logits.size());
  prob.resize(logits.size());
  const float mx = *std::max_element(logits.begin(), logits.end());
  for (size_t v = 0; v < logits.size(); ++v)
    prob[v] = std::exp((double(logits[v]) - mx) / s.temperature);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return prob[a] > prob[b]; });
  const double total = std::accumulate(prob.begin(), prob.end(), 0.0);
  size_t keep = s.top_k > 0 ? std::min<size_t>(size_t(s.top_k), order.size()) : order.size();
  double mass = 0;
  for (size_t j = 0; j < keep; ++j) {
    mass += prob[order[j]] / total;
    if (mass >= s.top_p) {
      keep = j + 1;
      break;
    }
  }
  double kept = 0;
  for (size_t j = 0; j < keep; ++j) kept += prob[order[j]];
  double u = double(rng.uniform(uint64_t(i))) * kept;
  for (size_t j = 0; j < keep; ++j) {
    u -= prob[order[j]];
    if (u < 0) return order[j];
  }
  return order[keep - 1];
}

}  // namespace sy
