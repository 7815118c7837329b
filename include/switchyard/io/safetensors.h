// safetensors files (the Hugging Face format): an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw little-endian data.
// String metadata rides in the header's "__metadata__" object. Written atomically (temp name,
// then rename); reading validates every field and throws IoError naming the file and what was
// expected, so a truncated or foreign file never yields garbage tensors.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/tensor.h"

namespace sy {

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                       const std::map<std::string, std::string>& metadata);

SafetensorsFile read_safetensors(const std::string& path);

}  // namespace sy
