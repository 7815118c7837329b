// `switchyard train` and `eval` for vision configs and checkpoints ("task": "vision"); the
// language-model commands hand over to these.
#pragma once

#include <cstdint>
#include <string>

#include "cli/lm_commands.h"

namespace sy::cli {

int train_vision_cli(const TrainCliOptions& o);

struct SuperclassesCliOptions {
  std::string checkpoint;  // a trained (dense) vision model
  int64_t experts = 0;     // super-classes to make, one per expert
  std::string out;         // JSON; default: <checkpoint's directory>/superclasses.json
  int threads = 0;
};
int run_superclasses(const SuperclassesCliOptions& o);
int compare_vision_cli(const CompareCliOptions& o);
int vision_routes_cli(const RoutesCliOptions& o, const std::string& checkpoint);
int eval_vision_cli(const EvalCliOptions& o, const std::string& checkpoint);

}  // namespace sy::cli
