// `switchyard train` and `eval` for vision configs and checkpoints ("task": "vision"); the
// language-model commands hand over to these.
#pragma once

#include "cli/lm_commands.h"

namespace sy::cli {

int train_vision_cli(const TrainCliOptions& o);
int eval_vision_cli(const EvalCliOptions& o, const std::string& checkpoint);

}  // namespace sy::cli
