// Hugging Face model directories: config.json, model.safetensors (or a sharded
// model.safetensors.index.json), tokenizer.json and generation_config.json. Architectures:
// mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, and the dense llama, qwen2, qwen3
// (docs/hf_models.md lists every option read and what is refused).
//
//   HfModel m = load_hf_model("Qwen3-30B-A3B/");   // throws ConfigError / IoError / ShapeError
//   DecoderModel model(m.config);
//   std::vector<int32_t> ids = m.tokenizer->encode("Hello");
//
// Loading maps each safetensors file and converts one tensor at a time into Switchyard's
// layout ([in, out] projections, stacked experts), keeping bf16 as bf16; the file's pages are
// dropped after each tensor, so resident memory ends near the weights' size. Every tensor the
// config implies must be present with its shape, and every tensor present must be used: a
// missing, extra or misshapen tensor, a shard named in the index but absent, or an option that
// is not implemented is an error naming it, and nothing is returned half-loaded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/io/tokenizer.h"
#include "switchyard/nn/decoder.h"

namespace sy {

struct HfModel {
  std::string dir;
  std::string model_type;  // "mixtral", ...
  DecoderConfig config;
  DecoderParams params;
  std::optional<Tokenizer> tokenizer;  // from tokenizer.json, when the directory has one
  std::vector<int32_t> eos_ids;        // generation_config.json, else config.json
  int32_t bos_id = -1;
  std::string weights_dtype;  // "bf16", "f32" or "mixed"
};

// The architectures load_hf_model reads, comma-separated, for messages and --help.
std::string supported_hf_architectures();

// Whether dir looks like a Hugging Face model directory (has a config.json).
bool is_hf_model_dir(const std::string& dir);

// config.json's text -> the decoder's config. `what` names the file in errors.
DecoderConfig parse_hf_config(const std::string& json_text, const std::string& what,
                              std::string* model_type = nullptr);

HfModel load_hf_model(const std::string& dir);

}  // namespace sy
