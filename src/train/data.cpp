// Corpus loading through zlib's gz* interface, which reads gzip'd and plain files alike.
#include "switchyard/train/data.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"

namespace sy {

std::vector<uint8_t> read_maybe_gzip(const std::string& path, std::string_view what,
                                     std::string_view expected) {
  if (!std::filesystem::is_regular_file(path))
    throw IoError(fmt::format("{} file {}: not found (expected {})", what, path, expected));
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr)
    throw IoError(fmt::format("{} file {}: cannot open: {}", what, path, std::strerror(errno)));
  std::vector<uint8_t> bytes;
  std::vector<uint8_t> chunk(1 << 20);
  while (true) {
    const int got = gzread(f, chunk.data(), unsigned(chunk.size()));
    if (got < 0) {
      int code = 0;
      const std::string msg = gzerror(f, &code);
      gzclose(f);
      throw IoError(fmt::format("{} file {}: read failed (corrupt gzip?): {}", what, path, msg));
    }
    if (got == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  gzclose(f);
  return bytes;
}

namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::vector<uint8_t> bytes = read_maybe_gzip(
      path, "data", "a text or .gz text file, or a .jsonl(.gz) labelled corpus");
  if (bytes.empty()) throw IoError(fmt::format("data file {}: empty, expected text", path));
  return bytes;
}

bool is_labelled_path(const std::string& path) {
  return path.ends_with(".jsonl") || path.ends_with(".jsonl.gz");
}

std::string json_string(const nlohmann::json& doc, const char* key, const std::string& fallback,
                        const std::string& where) {
  const auto it = doc.find(key);
  if (it == doc.end()) return fallback;
  if (!it->is_string())
    throw IoError(fmt::format("{}: \"{}\" is {}, expected a string", where, key, it->type_name()));
  return it->get<std::string>();
}

// Where a document of n bytes hands over to validation: val_fraction of it from the end, moved
// to the start of the next line (or, if no line starts after it, of the previous one), else to a
// UTF-8 character boundary.
int64_t split_point(const std::string& text, double val_fraction) {
  const int64_t n = int64_t(text.size());
  const int64_t want = n - int64_t(double(n) * val_fraction + 0.5);
  if (want <= 0 || want >= n) return want;
  for (int64_t i = want; i < n - 1; ++i)
    if (text[size_t(i - 1)] == '\n') return i;
  for (int64_t i = want; i > 1; --i)
    if (text[size_t(i - 1)] == '\n') return i;
  int64_t i = want;
  while (i < n && (uint8_t(text[size_t(i)]) & 0xC0) == 0x80) ++i;
  return i;
}

Corpus load_documents(const std::string& path, const std::vector<uint8_t>& bytes,
                      double val_fraction) {
  Corpus c;
  c.path = path;
  std::map<std::string, int64_t> seen;  // id -> line
  size_t at = 0;
  int64_t line_no = 0;
  while (at < bytes.size()) {
    const auto nl = std::find(bytes.begin() + long(at), bytes.end(), uint8_t('\n'));
    const std::string line(bytes.begin() + long(at), nl);
    at = size_t(nl - bytes.begin()) + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("data file {}, line {}", path, line_no);
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw IoError(fmt::format("{}: not JSON ({}); expected one document object per line",
                                where, e.what()));
    }
    if (!doc.is_object())
      throw IoError(fmt::format("{}: {} where a document object was expected", where, doc.type_name()));
    const auto text_it = doc.find("text");
    if (text_it == doc.end() || !text_it->is_string() || text_it->get_ref<const std::string&>().empty())
      throw IoError(fmt::format("{}: expected a non-empty string \"text\"", where));
    const std::string& text = text_it->get_ref<const std::string&>();
    CorpusDoc d;
    d.id = json_string(doc, "id", fmt::format("line{}", line_no), where);
    d.language = json_string(doc, "language", d.id, where);
    d.script = json_string(doc, "script", "unknown", where);
    d.name = json_string(doc, "name", d.id, where);
    if (const auto [it, fresh] = seen.emplace(d.id, line_no); !fresh)
      throw IoError(fmt::format("{}: document id \"{}\" again (first on line {}); expected "
                                "unique ids",
                                where, d.id, it->second));
    const int64_t cut = split_point(text, val_fraction);
    if (cut < 2 || int64_t(text.size()) - cut < 2)
      throw IoError(fmt::format("{}: document \"{}\" of {} bytes is too short to give {} of it "
                                "to validation and keep some for training (data.val_fraction)",
                                where, d.id, text.size(), val_fraction));
    d.train_begin = int64_t(c.train.size());
    c.train.insert(c.train.end(), text.begin(), text.begin() + cut);
    d.train_end = int64_t(c.train.size());
    d.val_begin = int64_t(c.val.size());
    c.val.insert(c.val.end(), text.begin() + cut, text.end());
    d.val_end = int64_t(c.val.size());
    c.docs.push_back(std::move(d));
  }
  if (c.docs.empty()) throw IoError(fmt::format("data file {}: no documents", path));
  return c;
}

}  // namespace

std::vector<std::string> Corpus::scripts() const {
  std::map<std::string, int64_t> count;
  for (const CorpusDoc& d : docs) ++count[d.script];
  std::vector<std::string> out;
  for (const auto& [s, n] : count) out.push_back(s);
  std::stable_sort(out.begin(), out.end(),
                   [&](const std::string& a, const std::string& b) { return count[a] > count[b]; });
  return out;
}

std::vector<int32_t> Corpus::doc_scripts() const {
  const std::vector<std::string> all = scripts();
  std::vector<int32_t> out;
  for (const CorpusDoc& d : docs)
    out.push_back(int32_t(std::find(all.begin(), all.end(), d.script) - all.begin()));
  return out;
}

Corpus load_corpus(const std::string& path, double val_fraction, int64_t context) {
  const std::vector<uint8_t> bytes = read_bytes(path);
  Corpus c;
  if (is_labelled_path(path)) {
    c = load_documents(path, bytes, val_fraction);
  } else {
    const int64_t n = int64_t(bytes.size());
    const int64_t n_val = int64_t(double(n) * val_fraction);
    c.path = path;
    c.train.assign(bytes.begin(), bytes.end() - n_val);
    c.val.assign(bytes.end() - n_val, bytes.end());
  }
  const int64_t n_train = int64_t(c.train.size()), n_val = int64_t(c.val.size());
  if (n_train < context + 1 || n_val < context + 1)
    throw IoError(fmt::format(
        "data file {}: {} bytes, too short for train and validation splits ({} of them "
        "validation) of at least {} bytes each (model.context + 1)",
        path, n_train + n_val, n_val, context + 1));
  return c;
}

namespace {
void window(const std::vector<uint8_t>& src, int64_t at, int64_t len, Batch& b, int64_t row) {
  for (int64_t t = 0; t < len; ++t) {
    b.tokens[row * len + t] = src[at + t];
    b.targets[row * len + t] = src[at + t + 1];
  }
}

Batch make_batch(int64_t rows, int64_t seq_len) {
  return Batch{rows, seq_len, std::vector<int32_t>(size_t(rows * seq_len)),
               std::vector<int32_t>(size_t(rows * seq_len)), {}};
}

// A labelled corpus's validation windows: each inside one document, starting every seq_len
// bytes of its held-out part, so each byte after the part's first is a target exactly once.
std::vector<Batch> document_val_batches(const Corpus& c, int64_t n_seq, int64_t seq_len,
                                        int64_t max_tokens) {
  struct Window {
    int32_t doc;
    int64_t at, n_targets;
  };
  std::vector<Window> all;
  for (size_t d = 0; d < c.docs.size(); ++d) {
    const CorpusDoc& doc = c.docs[d];
    for (int64_t at = doc.val_begin; at + 1 < doc.val_end; at += seq_len)
      all.push_back({int32_t(d), at, std::min(seq_len, doc.val_end - 1 - at)});
  }
  std::vector<Window> chosen = all;
  if (max_tokens > 0) {
    const size_t m = size_t(std::max<int64_t>(1, max_tokens / seq_len));
    if (m < all.size()) {
      chosen.clear();
      for (size_t i = 0; i < m; ++i) chosen.push_back(all[i * all.size() / m]);
    }
  }
  std::vector<Batch> out;
  for (size_t w0 = 0; w0 < chosen.size(); w0 += size_t(n_seq)) {
    const int64_t rows = std::min<int64_t>(n_seq, int64_t(chosen.size() - w0));
    Batch b = make_batch(rows, seq_len);
    b.doc.assign(b.tokens.size(), -1);
    for (int64_t r = 0; r < rows; ++r) {
      const Window& w = chosen[w0 + size_t(r)];
      for (int64_t t = 0; t < seq_len; ++t) {
        const size_t i = size_t(r * seq_len + t);
        if (t < w.n_targets) {
          b.tokens[i] = c.val[size_t(w.at + t)];
          b.targets[i] = c.val[size_t(w.at + t + 1)];
          b.doc[i] = w.doc;
        } else {
          b.tokens[i] = '\n';
          b.targets[i] = -1;
        }
      }
    }
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace

Batch train_batch(const Corpus& c, int64_t n_seq, int64_t seq_len, uint64_t seed, int64_t step) {
  Batch b = make_batch(n_seq, seq_len);
  const uint64_t range = c.train.size() - uint64_t(seq_len);  // starts 0..range-1
  const Philox rng(seed, /*stream=*/0xDA7A);
  for (int64_t i = 0; i < n_seq; ++i) {
    const auto w = rng.bits(uint64_t(step) * uint64_t(n_seq) + uint64_t(i));
    const uint64_t r = (uint64_t(w[0]) << 32 | w[1]) % range;
    window(c.train, int64_t(r), seq_len, b, i);
  }
  return b;
}

std::vector<Batch> val_batches(const Corpus& c, int64_t n_seq, int64_t seq_len,
                               int64_t max_tokens) {
  if (c.labelled()) return document_val_batches(c, n_seq, seq_len, max_tokens);
  int64_t n_windows = (int64_t(c.val.size()) - 1) / seq_len;
  if (max_tokens > 0) n_windows = std::min(n_windows, std::max<int64_t>(1, max_tokens / seq_len));
  std::vector<Batch> out;
  for (int64_t w0 = 0; w0 < n_windows; w0 += n_seq) {
    const int64_t rows = std::min(n_seq, n_windows - w0);
    Batch b = make_batch(rows, seq_len);
    for (int64_t i = 0; i < rows; ++i) window(c.val, (w0 + i) * seq_len, seq_len, b, i);
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace sy
