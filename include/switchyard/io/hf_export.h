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

// The way back, for fine-tuning (`train --init-from DIR`): a `mixtral` or `llama` directory whose
// architecture Switchyard's language model expresses (byte vocabulary with id b = byte b,
// multi-head attention with head_dim = d / H and default RoPE, no biases, q/k norms, sliding
// window or tied embeddings; every layer MoE with softmax top-k, or none) as the shape fields of
// an LmConfig (the others, and the training context, from `base`) and f32 parameters.
// Anything else is a ConfigError naming the field and what Switchyard's model would need.
struct ImportedLm {
  LmConfig cfg;
  LmParams params;
};
ImportedLm import_hf_lm(const std::string& dir, const LmConfig& base);

// The tokenizer.json of Switchyard's byte vocabulary: id b is byte b.
std::string byte_tokenizer_json();

}  // namespace sy
