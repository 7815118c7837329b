// Tokenizers: Switchyard's own byte vocabulary (id = byte), and Hugging Face tokenizer.json
// files of the two kinds published MoE models ship:
//   byte-level BPE with a split regex (Qwen, OLMoE, DeepSeek): text -> split by regexes ->
//     bytes as printable characters (GPT-2's table) -> BPE merges;
//   SentencePiece-style BPE (Llama, Mixtral): '▁' for spaces (Prepend/Replace normalizers or a
//     Metaspace pre-tokenizer) -> BPE over characters -> <0xNN> byte tokens for characters
//     outside the vocabulary (byte_fallback).
// Added and special tokens are cut out of the text first (longest match), the post-processor's
// template adds BOS, and decode runs the file's decoder chain. The results equal the
// `tokenizers` library's (tests/io/tokenizer_test.cpp compares on many scripts, emoji and
// invalid UTF-8; invalid bytes are first replaced by U+FFFD as Python's
// bytes.decode(errors="replace") does). A component or option not implemented is refused with
// a ConfigError naming it, never approximated.
//
//   Tokenizer t = Tokenizer::from_file("tokenizer.json");
//   std::vector<int32_t> ids = t.encode("Hello world");   // with the template's BOS
//   std::string text = t.decode(ids);
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sy {

class Tokenizer {
 public:
  static Tokenizer bytes();  // id = byte value, 256 ids, no special tokens
  static Tokenizer from_file(const std::string& path);  // throws IoError / ConfigError
  static Tokenizer from_json(const std::string& text, const std::string& what);

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const;  // one past the largest id
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;  // "" for an unknown id
  bool is_special(int32_t id) const;
  bool is_bytes() const;
  const std::string& kind() const;  // "bytes", "byte-level BPE", "BPE with byte fallback", ...

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Valid UTF-8 with every invalid sequence replaced by U+FFFD, maximal subpart by maximal
// subpart (as Python's errors="replace" and Rust's from_utf8_lossy do).
std::string sanitize_utf8(std::string_view s);

}  // namespace sy
