// Atomic file writes: temp name, then rename.
#include "switchyard/core/file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "switchyard/core/error.h"

namespace sy {

void write_file_atomic(const std::string& path, std::string_view contents) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr)
    throw IoError(fmt::format("{}: cannot open for writing: {}", tmp, std::strerror(errno)));
  const bool wrote = std::fwrite(contents.data(), 1, contents.size(), f) == contents.size();
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed) {
    std::remove(tmp.c_str());
    throw IoError(fmt::format("{}: write failed: {}", tmp, std::strerror(errno)));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw IoError(fmt::format("{}: cannot rename to {}: {}", tmp, path, std::strerror(err)));
  }
}

}  // namespace sy
