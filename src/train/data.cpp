// Corpus loading through zlib's gz* interface, which reads gzip'd and plain files alike.
#include "switchyard/train/data.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"

namespace sy {

Corpus load_corpus(const std::string& path, double val_fraction, int64_t context) {
  if (!std::filesystem::is_regular_file(path))
    throw IoError(fmt::format("data file {}: not found (expected a text or .gz text file)", path));
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw IoError(fmt::format("data file {}: cannot open: {}", path, std::strerror(errno)));
  std::vector<uint8_t> bytes;
  std::vector<uint8_t> chunk(1 << 20);
  while (true) {
    const int got = gzread(f, chunk.data(), unsigned(chunk.size()));
    if (got < 0) {
      int code = 0;
      const std::string msg = gzerror(f, &code);
      gzclose(f);
      throw IoError(fmt::format("data file {}: read failed (corrupt gzip?): {}", path, msg));
    }
    if (got == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  gzclose(f);
  if (bytes.empty()) throw IoError(fmt::format("data file {}: empty, expected text", path));
  const int64_t n = int64_t(bytes.size());
  const int64_t n_val = int64_t(double(n) * val_fraction);
  if (n - n_val < context + 1 || n_val < context + 1)
    throw IoError(fmt::format(
        "data file {}: {} bytes, too short for train and validation splits ({} of them "
        "validation) of at least {} bytes each (model.context + 1)",
        path, n, n_val, context + 1));
  Corpus c;
  c.path = path;
  c.train.assign(bytes.begin(), bytes.end() - n_val);
  c.val.assign(bytes.end() - n_val, bytes.end());
  return c;
}

namespace {
void window(const std::vector<uint8_t>& src, int64_t at, int64_t len, Batch& b, int64_t row) {
  for (int64_t t = 0; t < len; ++t) {
    b.tokens[row * len + t] = src[at + t];
    b.targets[row * len + t] = src[at + t + 1];
  }
}
}  // namespace

Batch train_batch(const Corpus& c, int64_t n_seq, int64_t seq_len, uint64_t seed, int64_t step) {
  Batch b{n_seq, seq_len, std::vector<int32_t>(size_t(n_seq * seq_len)),
          std::vector<int32_t>(size_t(n_seq * seq_len))};
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
  int64_t n_windows = (int64_t(c.val.size()) - 1) / seq_len;
  if (max_tokens > 0) n_windows = std::min(n_windows, std::max<int64_t>(1, max_tokens / seq_len));
  std::vector<Batch> out;
  for (int64_t w0 = 0; w0 < n_windows; w0 += n_seq) {
    const int64_t rows = std::min(n_seq, n_windows - w0);
    Batch b{rows, seq_len, std::vector<int32_t>(size_t(rows * seq_len)),
            std::vector<int32_t>(size_t(rows * seq_len))};
    for (int64_t i = 0; i < rows; ++i) window(c.val, (w0 + i) * seq_len, seq_len, b, i);
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace sy
