// A byte-level corpus (vocab 256: one token per byte) split into train and validation, and the
// batches drawn from it. The batch of step s is a pure function of (seed, s), so a resumed run
// sees exactly the data an uninterrupted one would.
//
// Two file kinds: plain text (gzip'd or not), whose last val_fraction is the validation split;
// and a labelled corpus (`.jsonl` or `.jsonl.gz`: one JSON object per line, a document with its
// "text" and labels "id", "language", "script", "name"), where every document gives the same
// fraction of itself (its end, from a line start) to validation, so loss per language is
// measurable. Documents follow each other in each split in file order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sy {

struct CorpusDoc {
  std::string id, language, script, name;  // language and script default to id, "unknown"
  int64_t train_begin = 0, train_end = 0;  // [begin, end) of Corpus::train
  int64_t val_begin = 0, val_end = 0;      // [begin, end) of Corpus::val
};

struct Corpus {
  std::string path;
  std::vector<uint8_t> train, val;
  std::vector<CorpusDoc> docs;  // empty: a plain text
  bool labelled() const { return !docs.empty(); }
  // The distinct scripts of the documents, most documents first (ties by name), and each
  // document's index into that list.
  std::vector<std::string> scripts() const;
  std::vector<int32_t> doc_scripts() const;
};

// The bytes of a file, gunzipped when it is gzip'd (zlib reads plain files alike). Throws
// IoError "<what> file <path>: ..." for a missing, unreadable or corrupt file; `expected` says
// what the file should be.
std::vector<uint8_t> read_maybe_gzip(const std::string& path, std::string_view what,
                                     std::string_view expected);

// Reads a text file or a labelled corpus (by the suffix .jsonl / .jsonl.gz). Throws IoError
// naming the file (and the line, for a labelled corpus) when it is missing, unreadable,
// corrupt, empty, not the JSON expected, or too short to give both splits a sequence of
// `context` tokens.
Corpus load_corpus(const std::string& path, double val_fraction, int64_t context);

struct Batch {
  int64_t n_seq = 0, seq_len = 0;
  std::vector<int32_t> tokens, targets;  // [n_seq * seq_len]; targets are tokens shifted by one
  // Validation batches of a labelled corpus: the document of each position; -1 and target -1
  // mark padding after a document's last byte. Empty otherwise.
  std::vector<int32_t> doc;
};

// n_seq random windows of the training split for one step.
Batch train_batch(const Corpus& c, int64_t n_seq, int64_t seq_len, uint64_t seed, int64_t step);
// Windows of the validation split, grouped into batches of at most n_seq sequences, holding up
// to max_tokens tokens (0: all of it). Plain text: consecutive windows from the start. A
// labelled corpus: windows that stay inside one document, each document's held-out part
// covered whole (its last window padded); with max_tokens, windows spread evenly over all of
// them, so every part of the corpus is sampled.
std::vector<Batch> val_batches(const Corpus& c, int64_t n_seq, int64_t seq_len, int64_t max_tokens);

}  // namespace sy
