// safetensors files (the Hugging Face format): an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw little-endian data.
// String metadata rides in the header's "__metadata__" object. Written atomically (temp name,
// then rename); reading validates every field and throws IoError naming the file and what was
// expected, so a truncated or foreign file never yields garbage tensors.
//
// Integrity: every file Switchyard writes carries, in the metadata key kChecksumKey, a JSON
// object of XXH3-64 checksums: one per tensor (of its dtype, shape and data bytes) and one under "__metadata__"
// (of the other metadata entries). A reader checks the metadata one when the header is read
// and a tensor's before it hands out its bytes, so a flipped bit names the tensor and the file
// instead of giving wrong numbers. Files without the key (Hugging Face's own) load unchecked;
// tools that ignore the key (transformers, the safetensors library) read ours as usual.
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

// Adds kChecksumKey to the metadata (replacing one passed in, as from a file read back).
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
  // The same checks over a file's bytes already in memory (not owned: they must outlive this);
  // `name` stands for the file in errors.
  MappedSafetensors(std::span<const std::byte> file, const std::string& name);
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
  // The tensor's data, its checksum verified first where the file has them (throws IoError
  // naming the tensor and the file on a mismatch).
  std::span<const std::byte> bytes(const Entry& e) const;
  bool has_checksums() const { return checked_; }
  // The checksum the file stores for a tensor (0 where it has none).
  uint64_t stored_checksum(const std::string& name) const {
    const auto it = checksums_.find(name);
    return it == checksums_.end() ? 0 : it->second;
  }
  // Tells the OS the mapped pages of e will not be read again (they stay in its file cache).
  void release(const Entry& e) const;

 private:
  void parse();  // the header of map_[0, map_size_)

  std::string path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0, data_begin_ = 0;
  bool owned_ = false;    // map_ is our mmap
  bool checked_ = false;  // the file carries kChecksumKey
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, uint64_t> checksums_;  // tensor name -> XXH3-64 of its bytes
};

// XXH3-64 of a tensor: its dtype name, rank, shape and data bytes, so a damaged dtype or
// shape that still fits the byte range is caught as well as damaged data.
uint64_t safetensors_tensor_checksum(const std::string& dtype, std::span<const int64_t> shape,
                                     std::span<const std::byte> data);
// XXH3-64 of the metadata entries other than kChecksumKey, in key order, each as
// key '\0' value '\0': what the "__metadata__" checksum covers.
uint64_t safetensors_metadata_checksum(const std::map<std::string, std::string>& metadata);

inline constexpr const char* kChecksumKey = "switchyard.xxh3_64";

// The Switchyard dtype of an entry: F32, F64 or BF16; other dtypes throw IoError naming the
// file, the tensor and what was expected.
DType tensor_dtype(const MappedSafetensors& file, const MappedSafetensors::Entry& e);

// Bytes per element of a safetensors dtype name; 0 for a name the format does not define.
size_t safetensors_dtype_size(const std::string& dtype);

}  // namespace sy
