// tokenizer.json against the `tokenizers` library: every case of tests/fixtures/hf/tokenizers/*
// (many scripts, emoji, combining and compatibility characters, invalid UTF-8, special tokens)
// must give the same ids, and decode those ids to the same text.
#include "switchyard/io/tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/fixtures.h"

namespace sy {
namespace {

using testing::fixture;
std::string read(const std::string& path) { return testing::read_file(path); }

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += char(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

class TokenizerFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerFixture, IdsAndDecodeEqualTokenizers) {
  const std::string dir = fixture("tokenizers/" + GetParam());
  const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
  const auto cases = nlohmann::json::parse(read(dir + "/cases.json"));
  ASSERT_GT(cases.size(), 20u);
  for (const auto& c : cases) {
    const std::string text = unhex(c["hex"].get<std::string>());
    const auto want = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), want)
        << GetParam() << ": " << nlohmann::json(sanitize_utf8(text)).dump();
    EXPECT_EQ(tok.decode(want), c["decoded"].get<std::string>())
        << GetParam() << ": ids of " << nlohmann::json(sanitize_utf8(text)).dump();
  }
}

INSTANTIATE_TEST_SUITE_P(Families, TokenizerFixture,
                         ::testing::Values("sp", "qwen", "gpt2", "deepseek"));

TEST(Utf8, InvalidSequencesBecomeReplacementCharacters) {
  EXPECT_EQ(sanitize_utf8("a\xff"
                          "b"),
            "a\xef\xbf\xbd"
            "b");
  EXPECT_EQ(sanitize_utf8("\xe2\x82"), "\xef\xbf\xbd");  // one maximal subpart
  EXPECT_EQ(sanitize_utf8("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // surrogate
  EXPECT_EQ(sanitize_utf8("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");                  // overlong
  EXPECT_EQ(sanitize_utf8("caf\xc3\xa9 \xf0\x9f\x98\x80"), "caf\xc3\xa9 \xf0\x9f\x98\x80");
}

TEST(Tokenizer, BytesAreTheirOwnIds) {
  const Tokenizer t = Tokenizer::bytes();
  const std::string s = "h\xc3\xa9\xff";
  const auto ids = t.encode(s);
  EXPECT_EQ(ids, (std::vector<int32_t>{'h', 0xc3, 0xa9, 0xff}));
  EXPECT_EQ(t.decode(ids), s);
  EXPECT_EQ(t.vocab_size(), 256);
}

std::string error_of(const std::string& json_text) {
  try {
    Tokenizer::from_json(json_text, "t.json");
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(Tokenizer, UnimplementedFeaturesAreNamed) {
  const std::string base = read(fixture("tokenizers/qwen/tokenizer.json"));
  auto with = [&](const char* key, const nlohmann::json& v) {
    auto j = nlohmann::json::parse(base);
    j[key] = v;
    return j.dump();
  };
  EXPECT_NE(error_of(with("normalizer", {{"type", "BertNormalizer"}}))
                .find("normalizer \"BertNormalizer\" is not implemented"),
            std::string::npos);
  EXPECT_NE(error_of(with("pre_tokenizer", {{"type", "Whitespace"}}))
                .find("pre_tokenizer \"Whitespace\""),
            std::string::npos);
  EXPECT_NE(error_of(with("post_processor", {{"type", "BertProcessing"}}))
                .find("post_processor \"BertProcessing\""),
            std::string::npos);
  auto j = nlohmann::json::parse(base);
  j["model"]["type"] = "Unigram";
  EXPECT_NE(error_of(j.dump()).find("model \"Unigram\" is not implemented"), std::string::npos);
  j = nlohmann::json::parse(base);
  j["added_tokens"][0]["lstrip"] = true;
  EXPECT_NE(error_of(j.dump()).find("lstrip = true"), std::string::npos);
  EXPECT_NE(error_of("{").find("t.json: not valid JSON"), std::string::npos);
}

}  // namespace
}  // namespace sy
