// `switchyard train`, `eval`, `routes` and `compare` for multimodal configs and checkpoints
// ("task": "multimodal"); the language-model commands hand over to these.
#pragma once

#include <string>

#include "cli/lm_commands.h"

namespace sy::cli {

int train_multimodal_cli(const TrainCliOptions& o);
int eval_multimodal_cli(const EvalCliOptions& o, const std::string& checkpoint);
int multimodal_routes_cli(const RoutesCliOptions& o, const std::string& checkpoint);
int compare_multimodal_cli(const CompareCliOptions& o);

}  // namespace sy::cli
