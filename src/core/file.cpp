// Atomic file writes: temp name, then rename.
#include "switchyard/core/file.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "switchyard/core/error.h"

namespace sy {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (f_ == nullptr)
    throw IoError(fmt::format("{}: cannot open for writing: {}", tmp_, std::strerror(errno)));
}

AtomicFile::~AtomicFile() {
  if (f_ != nullptr) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  SY_CHECK(f_ != nullptr, "{}: write after commit", path_);
  if (n > 0 && std::fwrite(data, 1, n, f_) != n)
    throw IoError(fmt::format("{}: write failed: {}", tmp_, std::strerror(errno)));
}

void AtomicFile::commit() {
  SY_CHECK(f_ != nullptr, "{}: committed twice", path_);
  const bool flushed = std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0;
  const int err = errno;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  if (!flushed || !closed) {
    std::remove(tmp_.c_str());
    throw IoError(fmt::format("{}: write failed: {}", tmp_, std::strerror(flushed ? errno : err)));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp_.c_str());
    throw IoError(fmt::format("{}: cannot rename to {}: {}", tmp_, path_, std::strerror(e)));
  }
  const size_t slash = path_.find_last_of('/');
  sync_directory(slash == std::string::npos ? "." : path_.substr(0, slash + 1));
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: the rename itself has happened
  ::fsync(fd);
  ::close(fd);
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
