// Routing analytics of a trained model on text: for every MoE layer and expert, the load, the
// dropped fraction, the router's entropy, how often experts are chosen together, and what each
// expert specialises in (the bytes and words routed to it more than to the average expert).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "switchyard/nn/model.h"
#include "switchyard/train/data.h"

namespace sy {

struct ExpertProfile {
  int64_t slots = 0;          // slots that chose this expert
  int64_t kept = 0;           // of them, computed (not dropped)
  std::vector<std::pair<int, double>> top_bytes;          // byte, lift (share / average share)
  std::vector<std::pair<std::string, double>> top_words;  // word, lift
};

struct LayerRoutes {
  int64_t layer = 0;  // index in the model
  std::vector<ExpertProfile> experts;
  std::vector<std::vector<int64_t>> co_selected;  // [E][E]: tokens that chose both
  double entropy = 0;           // mean router entropy, nats
  double dropped_fraction = 0;  // dropped slots / all slots
  double load_cv = 0;           // coefficient of variation of slots per expert
};

struct RouteAnalysis {
  int64_t n_tokens = 0;
  std::vector<LayerRoutes> layers;
};

// Runs the model (eval mode) over the batches and gathers the statistics.
RouteAnalysis analyze_routes(const LanguageModel& model, const LmParams& p,
                             const std::vector<Batch>& batches, const ExecContext& ctx);

std::string render_routes_text(const RouteAnalysis& a);
std::string render_routes_html(const RouteAnalysis& a, const std::string& title);

// Coefficient of variation (std / mean) of a load vector; 0 for a perfectly even one.
double load_cv(const std::vector<double>& load);

}  // namespace sy
