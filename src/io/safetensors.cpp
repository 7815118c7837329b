// safetensors read/write with nlohmann::json for the header. Dtypes: F32, F64, BF16.
#include "switchyard/io/safetensors.h"

#include <bit>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "switchyard/core/file.h"

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace sy {

namespace {

const char* st_dtype(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF64: return "F64";
    case DType::kBF16: return "BF16";
  }
  return "?";
}

}  // namespace

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    SY_CHECK(!header.contains(name), "tensor name {} twice", name);
    header[name] = {{"dtype", st_dtype(t->dtype())},
                    {"shape", t->shape()},
                    {"data_offsets", {offset, offset + t->nbytes()}}};
    offset += t->nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  std::string out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  out.append(reinterpret_cast<const char*>(&n), 8);
  out += text;
  for (const auto& [name, t] : tensors)
    out.append(reinterpret_cast<const char*>(t->bytes()), t->nbytes());
  write_file_atomic(path, out);
}

SafetensorsFile read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& what) {
    return IoError(fmt::format("{}: not a valid safetensors file: {}", path, what));
  };
  if (bytes.size() < 8) throw bad(fmt::format("{} bytes, expected at least 8", bytes.size()));
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8)
    throw bad(fmt::format("header length {} but only {} bytes follow (truncated?)", n,
                          bytes.size() - 8));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.data() + 8, bytes.data() + 8 + n);
  } catch (const nlohmann::json::exception& e) {
    throw bad(fmt::format("header is not JSON ({})", e.what()));
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  const size_t data_begin = 8 + n, data_size = bytes.size() - data_begin;
  SafetensorsFile file;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw bad(fmt::format("__metadata__.{} is not a string", k));
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets"))
      throw bad(fmt::format("tensor {}: expected dtype, shape and data_offsets", name));
    const std::string dt = entry["dtype"].is_string() ? entry["dtype"].get<std::string>() : "";
    DType dtype;
    if (dt == "F32") dtype = DType::kF32;
    else if (dt == "F64") dtype = DType::kF64;
    else if (dt == "BF16") dtype = DType::kBF16;
    else throw bad(fmt::format("tensor {}: dtype {}: expected F32, F64 or BF16", name, entry["dtype"].dump()));
    std::vector<int64_t> shape;
    const auto& offs = entry["data_offsets"];
    try {
      shape = entry["shape"].get<std::vector<int64_t>>();
      if (!offs.is_array() || offs.size() != 2) throw std::runtime_error("");
      (void)offs[0].get<uint64_t>();
    } catch (...) {
      throw bad(fmt::format("tensor {}: shape or data_offsets malformed", name));
    }
    const uint64_t b = offs[0].get<uint64_t>(), e = offs[1].get<uint64_t>();
    if (shape.size() > size_t(Tensor::kMaxRank))
      throw bad(fmt::format("tensor {}: rank {} above {}", name, shape.size(), Tensor::kMaxRank));
    for (int64_t s : shape)
      if (s < 0 || s > (int64_t(1) << 40)) throw bad(fmt::format("tensor {}: dim {}", name, s));
    Tensor t(shape, dtype);
    if (e < b || e > data_size || e - b != t.nbytes())
      throw bad(fmt::format("tensor {}: bytes [{}, {}) for a {} tensor of {} bytes, with {} data "
                            "bytes in the file (truncated?)",
                            name, b, e, t.shape_str(), t.nbytes(), data_size));
    std::memcpy(t.bytes(), bytes.data() + data_begin + b, t.nbytes());
    file.tensors.emplace(name, std::move(t));
  }
  return file;
}

}  // namespace sy
