// Writes a model Switchyard trained as a Hugging Face model directory that transformers loads
// with AutoModelForCausalLM.from_pretrained: a softmax top-k MoE model as `mixtral`, a dense
// one as `llama`, with a byte-level tokenizer.json whose ids are the byte values.
//
//   std::vector<std::string> notes = export_hf_model(cfg, params, "out/");  // throws ConfigError
//
// What transformers cannot express is refused with a ConfigError naming the option (other
// routers, unnormalised top-k weights, group-limited routing, shared experts, dense layers
// between MoE layers); what only changes behaviour at the edges is returned as notes (mixtral
// never drops tokens, so its logits are Switchyard's dropless evaluation).
#pragma once

#include <string>
#include <vector>

#include "switchyard/nn/model.h"

namespace sy {

std::vector<std::string> export_hf_model(const LmConfig& cfg, const LmParams& params,
                                         const std::string& out_dir);

// The tokenizer.json of Switchyard's byte vocabulary: id b is byte b.
std::string byte_tokenizer_json();

}  // namespace sy
