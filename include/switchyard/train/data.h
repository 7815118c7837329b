// A byte-level corpus (vocab 256: one token per byte) split into train and validation, and the
// batches drawn from it. The batch of step s is a pure function of (seed, s), so a resumed run
// sees exactly the data an uninterrupted one would.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sy {

struct Corpus {
  std::string path;
  std::vector<uint8_t> train, val;
};

// Reads a text file, gzip'd or plain. Throws IoError naming the file when it is missing,
// unreadable, corrupt, empty, or too short to give both splits a sequence of `context` tokens.
Corpus load_corpus(const std::string& path, double val_fraction, int64_t context);

struct Batch {
  int64_t n_seq = 0, seq_len = 0;
  std::vector<int32_t> tokens, targets;  // [n_seq * seq_len]; targets are tokens shifted by one
};

// n_seq random windows of the training split for one step.
Batch train_batch(const Corpus& c, int64_t n_seq, int64_t seq_len, uint64_t seed, int64_t step);
// Consecutive windows of the validation split, up to max_tokens tokens (0: all of it), grouped
// into batches of at most n_seq sequences.
std::vector<Batch> val_batches(const Corpus& c, int64_t n_seq, int64_t seq_len,
                               int64_t max_tokens);

}  // namespace sy
