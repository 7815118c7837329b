// tokenizer.json: normalizers (utf8proc), pre-tokenizers (PCRE2 regexes), BPE, templates and
// decoders, each following the `tokenizers` library's definition of the component.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "switchyard/io/tokenizer.h"

#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "switchyard/core/error.h"

namespace sy {

using nlohmann::json;

namespace {

void append_utf8(std::string& out, uint32_t cp) {
  char buf[4];
  const auto n =
      utf8proc_encode_char(utf8proc_int32_t(cp), reinterpret_cast<utf8proc_uint8_t*>(buf));
  out.append(buf, size_t(n));
}

// Code points of valid UTF-8.
std::vector<uint32_t> code_points(std::string_view s) {
  std::vector<uint32_t> cps;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t i = 0, n = utf8proc_ssize_t(s.size());
  while (i < n) {
    utf8proc_int32_t cp;
    const auto len = utf8proc_iterate(p + i, n - i, &cp);
    SY_CHECK(len > 0, "invalid UTF-8 after sanitize_utf8");
    cps.push_back(uint32_t(cp));
    i += len;
  }
  return cps;
}

// UTF-8 pieces, one per character.
std::vector<std::string> chars_of(std::string_view s) {
  std::vector<std::string> out;
  for (uint32_t cp : code_points(s)) {
    out.emplace_back();
    append_utf8(out.back(), cp);
  }
  return out;
}

// GPT-2's reversible map of the 256 bytes onto printable characters.
const std::vector<std::string>& byte_to_char() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      append_utf8(t[b], printable ? uint32_t(b) : uint32_t(256 + extra++));
    }
    return t;
  }();
  return table;
}
const std::unordered_map<std::string, uint8_t>& char_to_byte() {
  static const std::unordered_map<std::string, uint8_t> table = [] {
    std::unordered_map<std::string, uint8_t> t;
    for (int b = 0; b < 256; ++b) t[byte_to_char()[b]] = uint8_t(b);
    return t;
  }();
  return table;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t i = 0;
  while (true) {
    const size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    out += to;
    i = j + from.size();
  }
  out.append(s, i);
  s = std::move(out);
}

// A compiled PCRE2 pattern with UTF and Unicode properties on.
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& what) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw ConfigError(fmt::format("{}: regex {} does not compile at offset {}: {}", what,
                                    json(pattern).dump(), off, reinterpret_cast<char*>(msg)));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // [begin, end) byte ranges of every non-overlapping match, left to right.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t at = 0;
    while (at <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at,
                                 PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match: step over one character
        if (b >= s.size()) break;
        size_t next = b + 1;
        while (next < s.size() && (uint8_t(s[next]) & 0xC0) == 0x80) ++next;
        at = next;
        continue;
      }
      out.emplace_back(b, e);
      at = e;
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

using Pieces = std::vector<std::string>;

struct Normalizer {
  std::function<void(std::string&)> apply;
};

struct PreTokenizer {
  // Splits each piece further; `first` is whether the piece begins the text.
  std::function<Pieces(const std::string&, bool first)> split;
};

struct DecodeStep {
  std::function<std::vector<std::string>(std::vector<std::string>)> apply;
};

std::string where(const std::string& what, const std::string& part) {
  return fmt::format("{}: {}", what, part);
}

[[noreturn]] void unsupported(const std::string& what, const std::string& part,
                              const std::string& value, const std::string& supported) {
  throw ConfigError(
      fmt::format("{}: {} {} is not implemented (supported: {})", what, part, value, supported));
}

std::string pattern_of(const json& p, const std::string& what, bool* is_regex) {
  if (p.contains("String")) {
    *is_regex = false;
    return p["String"].get<std::string>();
  }
  if (p.contains("Regex")) {
    *is_regex = true;
    return p["Regex"].get<std::string>();
  }
  throw ConfigError(fmt::format("{}: pattern {}: expected String or Regex", what, p.dump()));
}

Normalizer make_normalizer(const json& n, const std::string& what) {
  const std::string type = n.value("type", "");
  auto unicode = [](utf8proc_option_t opts) {
    return Normalizer{[opts](std::string& s) {
      utf8proc_uint8_t* out = nullptr;
      const auto len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    utf8proc_ssize_t(s.size()), &out, opts);
      SY_CHECK(len >= 0, "utf8proc_map: {}", utf8proc_errmsg(len));
      s.assign(reinterpret_cast<char*>(out), size_t(len));
      std::free(out);
    }};
  };
  if (type == "NFC") return unicode(utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (type == "NFD") return unicode(utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE));
  if (type == "NFKC")
    return unicode(utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
  if (type == "NFKD")
    return unicode(utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  if (type == "Lowercase")
    return {[](std::string& s) {
      std::string out;
      for (uint32_t cp : code_points(s))
        append_utf8(out, uint32_t(utf8proc_tolower(utf8proc_int32_t(cp))));
      s = std::move(out);
    }};
  if (type == "Prepend") {
    const std::string pre = n.at("prepend").get<std::string>();
    return {[pre](std::string& s) {
      if (!s.empty()) s = pre + s;
    }};
  }
  if (type == "Replace") {
    bool regex = false;
    const std::string pat = pattern_of(n.at("pattern"), where(what, "normalizer Replace"), &regex);
    const std::string content = n.at("content").get<std::string>();
    if (!regex) return {[pat, content](std::string& s) { replace_all(s, pat, content); }};
    auto re = std::make_shared<Regex>(pat, where(what, "normalizer Replace"));
    return {[re, content](std::string& s) {
      std::string out;
      size_t at = 0;
      for (auto [b, e] : re->find_all(s)) {
        out.append(s, at, b - at);
        out += content;
        at = e;
      }
      out.append(s, at);
      s = std::move(out);
    }};
  }
  if (type == "Strip") {
    const bool left = n.value("strip_left", true), right = n.value("strip_right", true);
    return {[left, right](std::string& s) {
      auto cps = code_points(s);
      size_t b = 0, e = cps.size();
      auto space = [](uint32_t c) {
        const auto cat = utf8proc_category(utf8proc_int32_t(c));
        return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c ||
               cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL ||
               cat == UTF8PROC_CATEGORY_ZP;
      };
      if (left)
        while (b < e && space(cps[b])) ++b;
      if (right)
        while (e > b && space(cps[e - 1])) --e;
      std::string out;
      for (size_t i = b; i < e; ++i) append_utf8(out, cps[i]);
      s = std::move(out);
    }};
  }
  if (type == "Sequence") {
    std::vector<Normalizer> parts;
    for (const json& x : n.at("normalizers")) parts.push_back(make_normalizer(x, what));
    return {[parts](std::string& s) {
      for (const auto& p : parts) p.apply(s);
    }};
  }
  unsupported(what, "normalizer", json(type).dump(),
              "NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip, Sequence");
}

// Cuts s by the matches of re, as the `tokenizers` SplitDelimiterBehavior says.
Pieces split_by(const Regex& re, const std::string& s, const std::string& behavior) {
  Pieces out;
  size_t at = 0;
  const auto matches = re.find_all(s);
  std::string pending;  // MergedWithNext: a match waiting for the text after it
  for (size_t i = 0; i < matches.size(); ++i) {
    const auto [b, e] = matches[i];
    std::string gap = s.substr(at, b - at), m = s.substr(b, e - b);
    if (behavior == "Isolated") {
      if (!gap.empty()) out.push_back(gap);
      out.push_back(m);
    } else if (behavior == "Removed") {
      if (!gap.empty()) out.push_back(gap);
    } else if (behavior == "MergedWithPrevious") {
      if (!gap.empty())
        out.push_back(gap + m);
      else if (!out.empty() && b == at && i > 0 && matches[i - 1].second == b)
        out.back() += m;
      else
        out.push_back(m);
    } else if (behavior == "MergedWithNext") {
      if (!gap.empty()) {
        out.push_back(pending + gap);
        pending.clear();
      }
      pending += m;
    } else {  // Contiguous
      if (!gap.empty()) out.push_back(gap);
      if (!out.empty() && gap.empty() && i > 0 && matches[i - 1].second == b)
        out.back() += m;
      else
        out.push_back(m);
    }
    at = e;
  }
  std::string tail = s.substr(at);
  if (behavior == "MergedWithNext") tail = pending + tail;
  if (!tail.empty()) out.push_back(tail);
  return out;
}

std::string byte_level_chars(const std::string& s) {
  std::string out;
  for (unsigned char b : s) out += byte_to_char()[b];
  return out;
}

PreTokenizer make_pre_tokenizer(const json& p, const std::string& what, bool* byte_level) {
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    std::vector<PreTokenizer> parts;
    for (const json& x : p.at("pretokenizers"))
      parts.push_back(make_pre_tokenizer(x, what, byte_level));
    return {[parts](const std::string& s, bool first) {
      Pieces cur{s};
      for (const auto& part : parts) {
        Pieces next;
        for (size_t i = 0; i < cur.size(); ++i) {
          Pieces sub = part.split(cur[i], first && i == 0);
          next.insert(next.end(), sub.begin(), sub.end());
        }
        cur = std::move(next);
      }
      return cur;
    }};
  }
  if (type == "Split") {
    bool regex = false;
    std::string pat = pattern_of(p.at("pattern"), where(what, "pre_tokenizer Split"), &regex);
    if (!regex) {
      std::string quoted;  // a literal string as a regex
      for (char ch : pat) {
        if (std::strchr("\\^$.|?*+()[]{}", ch)) quoted += '\\';
        quoted += ch;
      }
      pat = quoted;
    }
    if (p.value("invert", false))
      unsupported(what, "pre_tokenizer Split", "with invert = true", "invert = false");
    const std::string behavior = p.value("behavior", "Isolated");
    if (behavior != "Isolated" && behavior != "Removed" && behavior != "MergedWithPrevious" &&
        behavior != "MergedWithNext" && behavior != "Contiguous")
      unsupported(what, "pre_tokenizer Split behavior", behavior,
                  "Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous");
    auto re = std::make_shared<Regex>(pat, where(what, "pre_tokenizer Split"));
    return {[re, behavior](const std::string& s, bool) { return split_by(*re, s, behavior); }};
  }
  if (type == "ByteLevel") {
    *byte_level = true;
    const bool prefix = p.value("add_prefix_space", false), use_regex = p.value("use_regex", true);
    std::shared_ptr<Regex> re;
    if (use_regex) re = std::make_shared<Regex>(kGpt2Pattern, where(what, "ByteLevel"));
    return {[prefix, re](const std::string& s, bool first) {
      std::string text = s;
      if (prefix && first && !text.starts_with(' ')) text = " " + text;
      Pieces parts = re ? split_by(*re, text, "Isolated") : Pieces{text};
      for (std::string& x : parts) x = byte_level_chars(x);
      return parts;
    }};
  }
  if (type == "Metaspace") {
    const std::string rep = p.value("replacement", "\xe2\x96\x81");
    const std::string scheme =
        p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    const bool split = p.value("split", true);
    return {[rep, scheme, split](const std::string& s, bool first) {
      std::string text = s;
      replace_all(text, " ", rep);
      if ((scheme == "always" || (scheme == "first" && first)) && !text.starts_with(rep))
        text = rep + text;
      if (!split) return Pieces{text};
      Pieces out;  // a piece starts at each replacement character (MergedWithNext)
      size_t begin = 0;
      for (size_t j = text.find(rep, 1); j != std::string::npos; j = text.find(rep, j + 1)) {
        out.push_back(text.substr(begin, j - begin));
        begin = j;
      }
      if (begin < text.size()) out.push_back(text.substr(begin));
      return out;
    }};
  }
  if (type == "Digits") {
    const bool individual = p.value("individual_digits", false);
    auto re = std::make_shared<Regex>(individual ? "\\p{N}" : "\\p{N}+", where(what, "Digits"));
    return {[re](const std::string& s, bool) { return split_by(*re, s, "Isolated"); }};
  }
  unsupported(what, "pre_tokenizer", json(type).dump(),
              "Split, ByteLevel, Metaspace, Digits, Sequence");
}

DecodeStep make_decoder(const json& d, const std::string& what) {
  const std::string type = d.value("type", "");
  if (type == "Sequence") {
    std::vector<DecodeStep> parts;
    for (const json& x : d.at("decoders")) parts.push_back(make_decoder(x, what));
    return {[parts](std::vector<std::string> t) {
      for (const auto& p : parts) t = p.apply(std::move(t));
      return t;
    }};
  }
  if (type == "ByteLevel")
    return {[](std::vector<std::string> toks) {
      std::string bytes;
      for (const std::string& t : toks) {
        std::string b;
        bool ok = true;
        for (const std::string& ch : chars_of(t)) {
          const auto it = char_to_byte().find(ch);
          if (it == char_to_byte().end()) {
            ok = false;
            break;
          }
          b += char(it->second);
        }
        bytes += ok ? b : t;
      }
      return std::vector<std::string>{sanitize_utf8(bytes)};
    }};
  if (type == "Replace") {
    bool regex = false;
    const std::string pat = pattern_of(d.at("pattern"), where(what, "decoder Replace"), &regex);
    if (regex) unsupported(what, "decoder Replace", "with a Regex pattern", "String patterns");
    const std::string content = d.at("content").get<std::string>();
    return {[pat, content](std::vector<std::string> t) {
      for (std::string& s : t) replace_all(s, pat, content);
      return t;
    }};
  }
  if (type == "ByteFallback")
    return {[](std::vector<std::string> toks) {
      std::vector<std::string> out;
      std::string pending;
      auto flush = [&] {
        if (pending.empty()) return;
        if (sanitize_utf8(pending) == pending)
          out.push_back(pending);
        else
          for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xef\xbf\xbd");
        pending.clear();
      };
      for (std::string& t : toks) {
        if (t.size() == 6 && t.starts_with("<0x") && t.ends_with(">") &&
            std::isxdigit(uint8_t(t[3])) && std::isxdigit(uint8_t(t[4]))) {
          pending += char(std::stoi(t.substr(3, 2), nullptr, 16));
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      return out;
    }};
  if (type == "Fuse")
    return {[](std::vector<std::string> t) {
      std::string all;
      for (const std::string& s : t) all += s;
      return std::vector<std::string>{all};
    }};
  if (type == "Strip") {
    const std::string content = d.at("content").get<std::string>();
    const int start = d.value("start", 0), stop = d.value("stop", 0);
    return {[content, start, stop](std::vector<std::string> t) {
      for (std::string& s : t) {
        auto cs = chars_of(s);
        size_t b = 0, e = cs.size();
        for (int i = 0; i < start && b < e && cs[b] == content; ++i) ++b;
        for (int i = 0; i < stop && e > b && cs[e - 1] == content; ++i) --e;
        std::string out;
        for (size_t i = b; i < e; ++i) out += cs[i];
        s = std::move(out);
      }
      return t;
    }};
  }
  if (type == "Metaspace") {
    const std::string rep = d.value("replacement", "\xe2\x96\x81");
    const std::string scheme =
        d.value("prepend_scheme", d.value("add_prefix_space", true) ? "always" : "never");
    return {[rep, scheme](std::vector<std::string> t) {
      for (size_t i = 0; i < t.size(); ++i) {
        replace_all(t[i], rep, " ");
        if (i == 0 && scheme != "never" && t[i].starts_with(' ')) t[i].erase(0, 1);
      }
      return t;
    }};
  }
  unsupported(what, "decoder", json(type).dump(),
              "ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence");
}

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
};

}  // namespace

struct Tokenizer::Impl {
  std::string kind;
  bool bytes = false;  // Switchyard's own: id = byte
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> tokens;  // id -> token string (vocab and added)
  std::map<std::pair<int32_t, int32_t>, std::pair<int32_t, int32_t>> merges;  // -> (rank, id)
  std::vector<AddedToken> added;                                              // longest first
  std::vector<char> special;                                                  // [vocab_size]
  std::optional<Normalizer> normalizer;
  std::optional<PreTokenizer> pre_tokenizer;
  std::optional<DecodeStep> decoder;
  bool byte_level = false, byte_fallback = false, fuse_unk = false, ignore_merges = false;
  int32_t unk = -1;
  std::vector<int32_t> prefix_ids, suffix_ids;  // the single-sequence template around $A

  void bpe(const std::string& word, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::bpe(const std::string& word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    const auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> syms;
  for (const std::string& ch : chars_of(word)) {
    const auto it = vocab.find(ch);
    if (it != vocab.end()) {
      syms.push_back(it->second);
      continue;
    }
    if (byte_fallback) {
      std::vector<int32_t> bs;
      for (unsigned char b : ch) {
        const auto bt = vocab.find(fmt::format("<0x{:02X}>", b));
        if (bt == vocab.end()) break;
        bs.push_back(bt->second);
      }
      if (bs.size() == ch.size()) {
        syms.insert(syms.end(), bs.begin(), bs.end());
        continue;
      }
    }
    if (unk < 0)
      throw ConfigError(
          fmt::format("tokenizer: character {} is not in the vocabulary and the "
                      "model has no unk_token",
                      json(ch).dump()));
    if (fuse_unk && !syms.empty() && syms.back() == unk) continue;
    syms.push_back(unk);
  }
  while (syms.size() > 1) {
    int32_t best_rank = INT32_MAX, best_id = -1;
    size_t best_at = 0;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      const auto it = merges.find({syms[i], syms[i + 1]});
      if (it != merges.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best_at = i;
      }
    }
    if (best_id < 0) break;
    syms[best_at] = best_id;
    syms.erase(syms.begin() + ptrdiff_t(best_at) + 1);
  }
  out.insert(out.end(), syms.begin(), syms.end());
}

std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    if (b < 0x80) {
      out += char(b);
      ++i;
      continue;
    }
    int len = 0;
    uint8_t lo = 0x80, hi = 0xBF;  // the valid range of the second byte
    if (b >= 0xC2 && b <= 0xDF)
      len = 2;
    else if (b == 0xE0)
      len = 3, lo = 0xA0;
    else if (b >= 0xE1 && b <= 0xEC)
      len = 3;
    else if (b == 0xED)
      len = 3, hi = 0x9F;
    else if (b >= 0xEE && b <= 0xEF)
      len = 3;
    else if (b == 0xF0)
      len = 4, lo = 0x90;
    else if (b >= 0xF1 && b <= 0xF3)
      len = 4;
    else if (b == 0xF4)
      len = 4, hi = 0x8F;
    if (len == 0) {
      out += "\xef\xbf\xbd";
      ++i;
      continue;
    }
    size_t j = i + 1;
    int k = 1;
    for (; k < len && j < n; ++k, ++j) {
      const uint8_t c = p[j];
      const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (c < l || c > h) break;
    }
    if (k == len)
      out.append(s.substr(i, size_t(len)));
    else
      out += "\xef\xbf\xbd";
    i = j;
  }
  return out;
}

Tokenizer Tokenizer::bytes() {
  auto impl = std::make_shared<Impl>();
  impl->kind = "bytes";
  impl->bytes = true;
  impl->special.assign(256, 0);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json(ss.str(), path);
}

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw IoError(fmt::format("{}: not valid JSON ({})", what, e.what()));
  }
  auto impl = std::make_shared<Impl>();
  Impl& t = *impl;
  try {
    const json& model = j.at("model");
    const std::string mtype = model.value("type", "BPE");
    if (mtype != "BPE") unsupported(what, "model", json(mtype).dump(), "BPE");
    if (model.contains("dropout") && !model["dropout"].is_null() &&
        model["dropout"].get<double>() > 0)
      unsupported(what, "BPE", "dropout", "dropout null");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(k) && !model[k].is_null() && !model[k].get<std::string>().empty())
        unsupported(what, "BPE", k, "null");
    t.byte_fallback = model.value("byte_fallback", false);
    t.fuse_unk = model.value("fuse_unk", false);
    t.ignore_merges = model.value("ignore_merges", false);
    int32_t max_id = -1;
    for (const auto& [tok, id] : model.at("vocab").items()) {
      t.vocab[tok] = id.get<int32_t>();
      max_id = std::max(max_id, id.get<int32_t>());
    }
    std::vector<AddedToken> added;
    for (const json& a : j.value("added_tokens", json::array())) {
      AddedToken at{a.at("id").get<int32_t>(), a.at("content").get<std::string>(),
                    a.value("special", false)};
      for (const char* k : {"lstrip", "rstrip", "single_word"})
        if (a.value(k, false))
          unsupported(what, fmt::format("added token {}", json(at.content).dump()),
                      fmt::format("with {} = true", k), "lstrip, rstrip, single_word false");
      if (a.value("normalized", false) && !at.special)
        unsupported(what, fmt::format("added token {}", json(at.content).dump()),
                    "with normalized = true", "tokens matched on the raw text");
      max_id = std::max(max_id, at.id);
      added.push_back(at);
    }
    t.tokens.assign(size_t(max_id + 1), "");
    t.special.assign(size_t(max_id + 1), 0);
    for (const auto& [tok, id] : t.vocab) t.tokens[id] = tok;
    for (const AddedToken& a : added) {
      t.tokens[a.id] = a.content;
      t.special[a.id] = a.special;
    }
    std::sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
    t.added = std::move(added);
    if (model.contains("unk_token") && !model["unk_token"].is_null()) {
      const auto it = t.vocab.find(model["unk_token"].get<std::string>());
      if (it == t.vocab.end())
        throw ConfigError(fmt::format("{}: unk_token {} is not in the vocabulary", what,
                                      model["unk_token"].dump()));
      t.unk = it->second;
    }
    int32_t rank = 0;
    for (const json& m : model.at("merges")) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos)
          throw ConfigError(fmt::format("{}: merge {} is not \"a b\"", what, m.dump()));
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        a = m.at(0).get<std::string>(), b = m.at(1).get<std::string>();
      }
      const auto ia = t.vocab.find(a), ib = t.vocab.find(b), iab = t.vocab.find(a + b);
      if (ia == t.vocab.end() || ib == t.vocab.end() || iab == t.vocab.end())
        throw ConfigError(
            fmt::format("{}: merge {} names a token outside the vocabulary", what, m.dump()));
      t.merges.emplace(std::pair{ia->second, ib->second}, std::pair{rank++, iab->second});
    }
    if (j.contains("normalizer") && !j["normalizer"].is_null())
      t.normalizer = make_normalizer(j["normalizer"], what);
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null())
      t.pre_tokenizer = make_pre_tokenizer(j["pre_tokenizer"], what, &t.byte_level);
    if (j.contains("decoder") && !j["decoder"].is_null())
      t.decoder = make_decoder(j["decoder"], what);
    if (j.contains("post_processor") && !j["post_processor"].is_null()) {
      std::function<void(const json&)> post = [&](const json& p) {
        const std::string type = p.value("type", "");
        if (type == "ByteLevel") return;  // offsets only
        if (type == "Sequence") {
          for (const json& x : p.at("processors")) post(x);
          return;
        }
        if (type != "TemplateProcessing")
          unsupported(what, "post_processor", json(type).dump(),
                      "TemplateProcessing, ByteLevel, Sequence");
        const json& specials = p.value("special_tokens", json::object());
        bool after = false;
        for (const json& item : p.at("single")) {
          if (item.contains("Sequence")) {
            after = true;
            continue;
          }
          const std::string name = item.at("SpecialToken").at("id").get<std::string>();
          if (!specials.contains(name))
            throw ConfigError(
                fmt::format("{}: post_processor names special token {} it does "
                            "not define",
                            what, json(name).dump()));
          for (const json& id : specials[name].at("ids"))
            (after ? t.suffix_ids : t.prefix_ids).push_back(id.get<int32_t>());
        }
      };
      post(j["post_processor"]);
    }
    if (j.contains("truncation") && !j["truncation"].is_null())
      unsupported(what, "truncation", j["truncation"].dump(), "null");
  } catch (const json::exception& e) {
    throw ConfigError(fmt::format("{}: malformed tokenizer.json ({})", what, e.what()));
  }
  t.kind = t.byte_level ? "byte-level BPE" : t.byte_fallback ? "BPE with byte fallback" : "BPE";
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view raw, bool add_special_tokens) const {
  const Impl& t = *impl_;
  std::vector<int32_t> ids;
  if (t.bytes) {
    for (unsigned char b : raw) ids.push_back(int32_t(b));
    return ids;
  }
  const std::string text = sanitize_utf8(raw);
  if (add_special_tokens) ids = t.prefix_ids;
  // Cut out added tokens (longest match at the earliest position), then the rest piece by
  // piece: normalize, pre-tokenize, BPE.
  auto run = [&](const std::string& piece, bool first) {
    std::string s = piece;
    if (t.normalizer) t.normalizer->apply(s);
    if (s.empty()) return;
    const Pieces words = t.pre_tokenizer ? t.pre_tokenizer->split(s, first) : Pieces{s};
    for (const std::string& w : words)
      if (!w.empty()) t.bpe(w, ids);
  };
  size_t at = 0, piece_begin = 0;
  while (at < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& a : t.added)
      if (!a.content.empty() && text.compare(at, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    if (!hit) {
      ++at;
      continue;
    }
    if (at > piece_begin) run(text.substr(piece_begin, at - piece_begin), piece_begin == 0);
    ids.push_back(hit->id);
    at += hit->content.size();
    piece_begin = at;
  }
  if (text.size() > piece_begin) run(text.substr(piece_begin), piece_begin == 0);
  if (add_special_tokens) ids.insert(ids.end(), t.suffix_ids.begin(), t.suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& t = *impl_;
  if (t.bytes) {
    std::string s;
    for (int32_t id : ids)
      if (id >= 0 && id < 256) s += char(id);
    return s;
  }
  std::vector<std::string> toks;
  for (int32_t id : ids) {
    if (id < 0 || id >= int32_t(t.tokens.size())) continue;
    if (skip_special_tokens && t.special[id]) continue;
    toks.push_back(t.tokens[id]);
  }
  if (!t.decoder) {
    std::string s;
    for (size_t i = 0; i < toks.size(); ++i) s += (i ? " " : "") + toks[i];
    return s;
  }
  std::string s;
  for (const std::string& x : t.decoder->apply(std::move(toks))) s += x;
  return s;
}

int64_t Tokenizer::vocab_size() const { return impl_->bytes ? 256 : int64_t(impl_->tokens.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const Impl& t = *impl_;
  for (const AddedToken& a : t.added)
    if (a.content == token) return a.id;
  const auto it = t.vocab.find(std::string(token));
  if (it == t.vocab.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const Impl& t = *impl_;
  if (t.bytes) return id >= 0 && id < 256 ? std::string(1, char(id)) : "";
  return id >= 0 && id < int32_t(t.tokens.size()) ? t.tokens[id] : "";
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < int32_t(impl_->special.size()) && impl_->special[id];
}
bool Tokenizer::is_bytes() const { return impl_->bytes; }
const std::string& Tokenizer::kind() const { return impl_->kind; }

}  // namespace sy
