// safetensors files (the Hugging Face format): an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw little-endian data.
// String metadata rides in the header's "__metadata__" object. Written atomically (temp name,
// then rename); reading validates every field and throws IoError naming the file and what was
// expected, so a truncated or foreign file never yields garbage tensors.
//
//   MappedSafetensors f("model.safetensors");        // maps the file, checks the header
//   const auto& e = f.entry("lm_head.weight");       // dtype "BF16", shape, byte range
//   std::span<const std::byte> raw = f.bytes(e);     // read from the mapping: no copy
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
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

// Reads every tensor into memory. Dtypes F32, F64 and BF16 (what Switchyard writes).
SafetensorsFile read_safetensors(const std::string& path);

// A safetensors file mapped read-only into memory. The constructor checks the whole header
// before anything else happens: every dtype has a known size, every shape's element count fits
// (overflow-checked) and equals its byte range, every range lies inside the file. Tensor bytes
// are then read from the mapping on demand (page by page from the OS's cache), so a loader
// touches each weight byte once and never holds the whole file in its own memory.
class MappedSafetensors {
 public:
  struct Entry {
    std::string name;
    std::string dtype;  // as in the file: "F32", "BF16", "F16", "I64", ...
    std::vector<int64_t> shape;
    size_t offset = 0, nbytes = 0;  // within the data section
    int64_t numel() const;
  };

  explicit MappedSafetensors(const std::string& path);  // throws IoError
  ~MappedSafetensors();
  MappedSafetensors(MappedSafetensors&&) noexcept;
  MappedSafetensors& operator=(MappedSafetensors&&) noexcept;
  MappedSafetensors(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(const MappedSafetensors&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, Entry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  const Entry& entry(const std::string& name) const;  // throws IoError naming the file
  std::span<const std::byte> bytes(const Entry& e) const;
  // Tells the OS the mapped pages of e will not be read again (they stay in its file cache).
  void release(const Entry& e) const;

 private:
  std::string path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0, data_begin_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Bytes per element of a safetensors dtype name; 0 for a name the format does not define.
size_t safetensors_dtype_size(const std::string& dtype);

}  // namespace sy
