// Atomic file writes: temp name, then rename.
#include "switchyard/core/file.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
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

void write_log(std::FILE* f, std::string_view text) {
  if (f == nullptr) return;
  std::fflush(f);
  std::clearerr(f);
  const int fd = fileno(f);
  size_t done = 0;
  while (done < text.size()) {
    pollfd p{fd, POLLOUT, 0};
    const int ready = ::poll(&p, 1, 200);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0 || (p.revents & (POLLERR | POLLHUP | POLLNVAL))) return;
    // At most a pipe's atomic unit: POLLOUT promises room for that much, so this never blocks.
    const size_t n = std::min<size_t>(text.size() - done, 4096);
    const ssize_t w = ::write(fd, text.data() + done, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    done += size_t(w);
  }
}

}  // namespace sy
