// safetensors read/write with nlohmann::json for the header; reading maps the file (mmap).
#include "switchyard/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>

#include "switchyard/core/file.h"

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace sy {

namespace {

const char* st_dtype(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
      {"U64", 8}, {"I32", 4}, {"U32", 4},  {"I16", 2},     {"U16", 2},
      {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

int64_t MappedSafetensors::Entry::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;  // checked against overflow when the header was read
  return n;
}

MappedSafetensors::MappedSafetensors(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(fmt::format("{}: not a regular file", path));
  }
  const size_t size = size_t(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw IoError(
        fmt::format("{}: not a valid safetensors file: {} bytes, expected at least 8", path, size));
  }
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw IoError(fmt::format("{}: cannot map: {}", path, std::strerror(errno)));
  map_ = static_cast<const std::byte*>(m);
  map_size_ = size;
  owned_ = true;
  try {
    parse();
  } catch (...) {
    ::munmap(const_cast<std::byte*>(map_), map_size_);
    map_ = nullptr;
    throw;
  }
}

MappedSafetensors::MappedSafetensors(std::span<const std::byte> file, const std::string& name)
    : path_(name), map_(file.data()), map_size_(file.size()) {
  if (map_size_ < 8)
    throw IoError(fmt::format("{}: not a valid safetensors file: {} bytes, expected at least 8",
                              name, map_size_));
  parse();
}

void MappedSafetensors::parse() {
  auto bad = [&](const std::string& what) {
    return IoError(fmt::format("{}: not a valid safetensors file: {}", path_, what));
  };
  const size_t size = map_size_;
  uint64_t n = 0;
  std::memcpy(&n, map_, 8);
  if (n > size - 8)
    throw bad(fmt::format("header length {} but only {} bytes follow (truncated?)", n, size - 8));
  nlohmann::json header;
  try {
    const char* h = reinterpret_cast<const char*>(map_) + 8;
    header = nlohmann::json::parse(h, h + n);
  } catch (const nlohmann::json::exception& e) {
    throw bad(fmt::format("header is not JSON ({})", e.what()));
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  data_begin_ = 8 + size_t(n);
  const size_t data_size = size - data_begin_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [begin, end) of every tensor
  for (const auto& [name, item] : header.items()) {
    if (name == "__metadata__") {
      if (!item.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& [k, v] : item.items()) {
        if (!v.is_string()) throw bad(fmt::format("__metadata__.{} is not a string", k));
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    if (!item.is_object() || !item.contains("dtype") || !item.contains("shape") ||
        !item.contains("data_offsets"))
      throw bad(fmt::format("tensor {}: expected dtype, shape and data_offsets", name));
    Entry e;
    e.name = name;
    e.dtype = item["dtype"].is_string() ? item["dtype"].get<std::string>() : "";
    const size_t esize = safetensors_dtype_size(e.dtype);
    if (esize == 0)
      throw bad(fmt::format("tensor {}: dtype {} is not a safetensors dtype", name,
                            item["dtype"].dump()));
    const auto& offs = item["data_offsets"];
    uint64_t b = 0, end = 0;
    // Integers only: nlohmann converts a float to an integer type without a range check.
    const auto& shape = item["shape"];
    auto whole = [](const nlohmann::json& v) { return v.is_number_integer(); };
    if (!shape.is_array() || !std::all_of(shape.begin(), shape.end(), whole) ||
        !offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() ||
        !offs[1].is_number_unsigned())
      throw bad(fmt::format("tensor {}: shape or data_offsets malformed (expected arrays of "
                            "non-negative integers)",
                            name));
    for (const auto& v : shape) {
      if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
        throw bad(fmt::format("tensor {}: dim {} overflows 64 bits", name, v.dump()));
      e.shape.push_back(v.get<int64_t>());
    }
    b = offs[0].get<uint64_t>();
    end = offs[1].get<uint64_t>();
    if (e.shape.size() > size_t(Tensor::kMaxRank))
      throw bad(fmt::format("tensor {}: rank {} above {}", name, e.shape.size(), Tensor::kMaxRank));
    uint64_t bytes = esize;
    for (int64_t s : e.shape) {
      if (s < 0) throw bad(fmt::format("tensor {}: dim {}", name, s));
      if (__builtin_mul_overflow(bytes, uint64_t(s), &bytes))
        throw bad(fmt::format("tensor {}: shape {} overflows 64 bits", name, item["shape"].dump()));
    }
    if (end < b || end > data_size || end - b != bytes)
      throw bad(
          fmt::format("tensor {}: bytes [{}, {}) for a {} tensor of shape {} ({} bytes), "
                      "with {} data bytes in the file (truncated?)",
                      name, b, end, e.dtype, item["shape"].dump(), bytes, data_size));
    e.offset = size_t(b);
    e.nbytes = size_t(bytes);
    if (bytes > 0) ranges.emplace_back(b, end);
    entries_.emplace(name, std::move(e));
  }
  // Two tensors sharing bytes means at least one of them is not what its writer stored.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      throw bad(fmt::format("tensor data ranges [{}, {}) and [{}, {}) overlap",
                            ranges[i - 1].first, ranges[i - 1].second, ranges[i].first,
                            ranges[i].second));

  const auto sums = metadata_.find(kChecksumKey);
  if (sums == metadata_.end()) return;
  checked_ = true;
  nlohmann::json table;
  try {
    table = nlohmann::json::parse(sums->second);
  } catch (const nlohmann::json::exception&) {
    throw bad(fmt::format("__metadata__.{} is not JSON", kChecksumKey));
  }
  if (!table.is_object())
    throw bad(fmt::format("__metadata__.{}: expected an object of checksums", kChecksumKey));
  auto hex = [&](const std::string& key) -> uint64_t {
    const auto it = table.find(key);
    if (it == table.end())
      throw bad(fmt::format("__metadata__.{} has no checksum for {}", kChecksumKey, key));
    const std::string text = it->is_string() ? it->get<std::string>() : "";
    uint64_t v = 0;
    const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v, 16);
    if (text.size() != 16 || ec != std::errc() || p != text.data() + text.size())
      throw bad(fmt::format("__metadata__.{}: checksum of {} is {}: expected 16 hex digits",
                            kChecksumKey, key, it->dump()));
    return v;
  };
  const uint64_t meta_want = hex("__metadata__");
  const uint64_t meta_got = safetensors_metadata_checksum(metadata_);
  if (meta_got != meta_want)
    throw IoError(fmt::format("{}: the header's metadata fails its checksum (stored {:016x}, "
                              "computed {:016x}): the file is damaged",
                              path_, meta_want, meta_got));
  for (const auto& [name, e] : entries_) checksums_[name] = hex(name);
  for (const auto& [key, v] : table.items())
    if (key != "__metadata__" && !entries_.count(key))
      throw bad(fmt::format("__metadata__.{} has a checksum for {}, which is not in the file",
                            kChecksumKey, key));
}

uint64_t safetensors_tensor_checksum(const std::string& dtype, std::span<const int64_t> shape,
                                     std::span<const std::byte> data) {
  XXH3_state_t* st = XXH3_createState();
  SY_CHECK(st != nullptr, "XXH3_createState");
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, dtype.data(), dtype.size() + 1);  // with its '\0'
  const uint64_t rank = shape.size();
  XXH3_64bits_update(st, &rank, sizeof rank);
  XXH3_64bits_update(st, shape.data(), shape.size_bytes());
  XXH3_64bits_update(st, data.data(), data.size());
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return h;
}

uint64_t safetensors_metadata_checksum(const std::map<std::string, std::string>& metadata) {
  XXH3_state_t* st = XXH3_createState();
  SY_CHECK(st != nullptr, "XXH3_createState");
  XXH3_64bits_reset(st);
  const char zero = 0;
  for (const auto& [k, v] : metadata) {
    if (k == kChecksumKey) continue;
    XXH3_64bits_update(st, k.data(), k.size());
    XXH3_64bits_update(st, &zero, 1);
    XXH3_64bits_update(st, v.data(), v.size());
    XXH3_64bits_update(st, &zero, 1);
  }
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return h;
}

MappedSafetensors::~MappedSafetensors() {
  if (map_ && owned_) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

MappedSafetensors::MappedSafetensors(MappedSafetensors&& o) noexcept
    : path_(std::move(o.path_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(o.map_size_),
      data_begin_(o.data_begin_),
      owned_(o.owned_),
      checked_(o.checked_),
      entries_(std::move(o.entries_)),
      metadata_(std::move(o.metadata_)),
      checksums_(std::move(o.checksums_)) {}

MappedSafetensors& MappedSafetensors::operator=(MappedSafetensors&& o) noexcept {
  if (this != &o) {
    if (map_ && owned_) ::munmap(const_cast<std::byte*>(map_), map_size_);
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = o.map_size_;
    data_begin_ = o.data_begin_;
    owned_ = o.owned_;
    checked_ = o.checked_;
    entries_ = std::move(o.entries_);
    metadata_ = std::move(o.metadata_);
    checksums_ = std::move(o.checksums_);
  }
  return *this;
}

const MappedSafetensors::Entry& MappedSafetensors::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) throw IoError(fmt::format("{}: no tensor named {}", path_, name));
  return it->second;
}

std::span<const std::byte> MappedSafetensors::bytes(const Entry& e) const {
  const std::span<const std::byte> data{map_ + data_begin_ + e.offset, e.nbytes};
  if (checked_) {
    const uint64_t want = checksums_.at(e.name);
    const uint64_t got = safetensors_tensor_checksum(e.dtype, e.shape, data);
    if (got != want)
      throw IoError(fmt::format("{}: tensor {} fails its checksum (stored {:016x}, computed "
                                "{:016x}): the file is damaged; nothing was loaded",
                                path_, e.name, want, got));
  }
  return data;
}

void MappedSafetensors::release(const Entry& e) const {
  if (!owned_) return;
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const size_t begin = (data_begin_ + e.offset + page - 1) / page * page;
  const size_t end = (data_begin_ + e.offset + e.nbytes) / page * page;
  if (end > begin) ::madvise(const_cast<std::byte*>(map_) + begin, end - begin, MADV_DONTNEED);
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json sums = nlohmann::json::object();
  sums["__metadata__"] = fmt::format("{:016x}", safetensors_metadata_checksum(metadata));
  for (const auto& [name, t] : tensors)
    sums[name] = fmt::format(
        "{:016x}", safetensors_tensor_checksum(st_dtype(t->dtype()), t->shape(),
                                               {t->bytes(), t->nbytes()}));
  std::map<std::string, std::string> meta = metadata;
  meta[kChecksumKey] = sums.dump();
  nlohmann::ordered_json header;
  header["__metadata__"] = meta;
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
  // Streamed: the writer holds no copy of the tensors, only the header.
  AtomicFile out(path);
  const uint64_t n = text.size();
  out.write(&n, 8);
  out.write(text.data(), text.size());
  for (const auto& [name, t] : tensors) out.write(t->bytes(), t->nbytes());
  out.commit();
}

DType tensor_dtype(const MappedSafetensors& file, const MappedSafetensors::Entry& e) {
  for (DType t : {DType::kF32, DType::kF64, DType::kBF16})
    if (e.dtype == st_dtype(t)) return t;
  throw IoError(fmt::format("{}: not a valid safetensors file: tensor {}: dtype \"{}\": "
                            "expected F32, F64 or BF16",
                            file.path(), e.name, e.dtype));
}

SafetensorsFile read_safetensors(const std::string& path) {
  const MappedSafetensors mapped(path);
  SafetensorsFile file;
  file.metadata = mapped.metadata();
  for (const auto& [name, e] : mapped.entries()) {
    const DType dtype = tensor_dtype(mapped, e);
    const auto raw = mapped.bytes(e);  // checksum first: nothing allocated for a damaged one
    Tensor t(e.shape, dtype);
    if (!raw.empty()) std::memcpy(t.bytes(), raw.data(), raw.size());
    file.tensors.emplace(name, std::move(t));
  }
  return file;
}

}  // namespace sy
