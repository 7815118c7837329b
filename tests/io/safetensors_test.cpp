// safetensors integrity: the checksums Switchyard writes catch every flipped bit in a tensor's
// data and in the metadata, name the tensor and the file, and hand out nothing; files without
// checksums (other tools') still load; damaged headers are named errors before any allocation.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "switchyard/core/error.h"
#include "switchyard/io/safetensors.h"
#include "testing/testing.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

fs::path temp_path(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / "sy_safetensors_test";
  fs::create_directories(dir);
  return dir / name;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Odd sizes and all three dtypes, plus an empty tensor.
std::string small_file(const fs::path& path) {
  const Tensor a = testing::random_tensor({3, 5}, DType::kF32, 1);
  const Tensor b = testing::random_tensor({7}, DType::kF64, 2);
  const Tensor c = testing::random_tensor({2, 3, 3}, DType::kBF16, 3);
  const Tensor empty({0, 4}, DType::kF32);
  write_safetensors(path.string(), {{"a", &a}, {"b", &b}, {"c", &c}, {"empty", &empty}},
                    {{"note", "hello"}, {"step", "12"}});
  return slurp(path);
}

// The message of the IoError that reading every tensor of `file` throws, or "" if none.
std::string read_error(const std::string& file) {
  try {
    const MappedSafetensors m(as_bytes(file), "f.st");
    for (const auto& [name, e] : m.entries()) (void)m.bytes(e);
  } catch (const IoError& e) {
    return e.what();
  }
  return "";
}

size_t header_end(const std::string& file) {
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  return 8 + size_t(n);
}

TEST(SafetensorsIntegrity, RoundTripCarriesAndVerifiesChecksums) {
  const fs::path p = temp_path("round.st");
  small_file(p);
  const MappedSafetensors m(p.string());
  EXPECT_TRUE(m.has_checksums());
  EXPECT_EQ(m.metadata().at("note"), "hello");
  const SafetensorsFile f = read_safetensors(p.string());
  EXPECT_EQ(f.tensors.at("c").shape(), (std::vector<int64_t>{2, 3, 3}));
  const Tensor a = testing::random_tensor({3, 5}, DType::kF32, 1);
  EXPECT_EQ(std::memcmp(f.tensors.at("a").bytes(), a.bytes(), a.nbytes()), 0);
}

TEST(SafetensorsIntegrity, EveryFlippedDataBitNamesItsTensor) {
  const std::string good = small_file(temp_path("flip.st"));
  const MappedSafetensors m(as_bytes(good), "f.st");
  const size_t data = header_end(good);
  ASSERT_GT(good.size(), data);
  for (const auto& [name, e] : m.entries()) {
    for (size_t i = 0; i < e.nbytes; ++i)
      for (int bit = 0; bit < 8; ++bit) {
        std::string bad = good;
        bad[data + e.offset + i] ^= char(1 << bit);
        const std::string err = read_error(bad);
        ASSERT_NE(err.find("tensor " + name + " fails its checksum"), std::string::npos)
            << name << " byte " << i << " bit " << bit << ": " << err;
        ASSERT_NE(err.find("f.st"), std::string::npos) << err;
      }
  }
}

TEST(SafetensorsIntegrity, EveryFlippedHeaderBitIsAnErrorOrHarmless) {
  // A flip in the header either breaks its JSON, changes a name, a shape, an offset or the
  // metadata (each a named error), or lands in padding spaces or JSON syntax that parses to
  // the same thing; whichever, the tensors read back are the ones written.
  const fs::path p = temp_path("hdr.st");
  const std::string good = small_file(p);
  const SafetensorsFile want = read_safetensors(p.string());
  const size_t end = header_end(good);
  int errors = 0, harmless = 0;
  for (size_t i = 8; i < end; ++i)
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = good;
      bad[i] ^= char(1 << bit);
      try {
        const MappedSafetensors m(as_bytes(bad), "f.st");
        ASSERT_EQ(m.entries().size(), want.tensors.size()) << "byte " << i << " bit " << bit;
        for (const auto& [name, e] : m.entries()) {
          const auto raw = m.bytes(e);
          const Tensor& t = want.tensors.at(name);
          ASSERT_EQ(raw.size(), t.nbytes());
          ASSERT_EQ(std::memcmp(raw.data(), t.bytes(), raw.size()), 0);
        }
        ASSERT_EQ(m.metadata().at("note"), "hello") << "byte " << i << " bit " << bit;
        ++harmless;
      } catch (const IoError& e) {
        ASSERT_NE(std::string(e.what()).find("f.st"), std::string::npos) << e.what();
        ++errors;
      }
    }
  EXPECT_GT(errors, harmless);  // most flips matter; every one that matters is caught
}

TEST(SafetensorsIntegrity, FilesWithoutChecksumsStillLoad) {
  // What the safetensors library writes: no kChecksumKey.
  const Tensor a = testing::random_tensor({2, 3}, DType::kF32, 4);
  const std::string header = R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  std::string file(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  file += header;
  file.append(reinterpret_cast<const char*>(a.bytes()), a.nbytes());
  const MappedSafetensors m(as_bytes(file), "hf.st");
  EXPECT_FALSE(m.has_checksums());
  EXPECT_EQ(std::memcmp(m.bytes(m.entry("a")).data(), a.bytes(), 24), 0);
}

TEST(SafetensorsIntegrity, ChecksumTableDamageIsNamed) {
  const fs::path p = temp_path("table.st");
  small_file(p);
  const SafetensorsFile f = read_safetensors(p.string());
  // Rebuild the header by hand with the table edited.
  auto with_table = [&](const std::function<void(nlohmann::json&)>& edit) {
    const std::string good = slurp(p);
    nlohmann::json header = nlohmann::json::parse(good.substr(8, header_end(good) - 8));
    nlohmann::json table = nlohmann::json::parse(header["__metadata__"][kChecksumKey].get<std::string>());
    edit(table);
    if (table.is_null())
      header["__metadata__"].erase(kChecksumKey);
    else
      header["__metadata__"][kChecksumKey] = table.dump();
    const std::string h = header.dump();
    std::string out(8, '\0');
    const uint64_t n = h.size();
    std::memcpy(out.data(), &n, 8);
    return out + h + good.substr(header_end(good));
  };
  EXPECT_NE(read_error(with_table([](nlohmann::json& t) { t.erase("b"); }))
                .find("has no checksum for b"),
            std::string::npos);
  EXPECT_NE(read_error(with_table([](nlohmann::json& t) { t["zzz"] = "0000000000000000"; }))
                .find("checksum for zzz, which is not in the file"),
            std::string::npos);
  EXPECT_NE(read_error(with_table([](nlohmann::json& t) { t["a"] = "12"; }))
                .find("expected 16 hex digits"),
            std::string::npos);
  EXPECT_NE(read_error(with_table([](nlohmann::json& t) { t["__metadata__"] = "0123456789abcdef"; }))
                .find("metadata fails its checksum"),
            std::string::npos);
  // Without the table the file is one of another tool's: it loads unchecked (a checkpoint
  // then refuses it by its version: see the checkpoint tests).
  EXPECT_EQ(read_error(with_table([](nlohmann::json& t) { t = nullptr; })), "");
}

TEST(SafetensorsIntegrity, HugeAndOverlappingDeclarationsFailBeforeAllocating) {
  auto file_with = [](const std::string& header, size_t data_bytes) {
    std::string out(8, '\0');
    const uint64_t n = header.size();
    std::memcpy(out.data(), &n, 8);
    return out + header + std::string(data_bytes, '\x01');
  };
  // 2^42 elements: the range check refuses it; nothing of that size is ever allocated.
  EXPECT_NE(read_error(file_with(
                R"({"a":{"dtype":"F32","shape":[4194304,1048576],"data_offsets":[0,16]}})", 16))
                .find("truncated?"),
            std::string::npos);
  EXPECT_NE(read_error(file_with(
                R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                8))
                .find("overflows 64 bits"),
            std::string::npos);
  EXPECT_NE(read_error(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                 12))
                .find("overlap"),
            std::string::npos);
  // Header length past the end of the file.
  std::string big(16, '\0');
  const uint64_t n = uint64_t(1) << 62;
  std::memcpy(big.data(), &n, 8);
  EXPECT_NE(read_error(big).find("header length"), std::string::npos);
}

}  // namespace
}  // namespace sy
