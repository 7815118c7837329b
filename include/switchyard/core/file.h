// Writing files so that an interrupted or failed write never leaves a half-written file under
// the real name: write to `path.tmp`, flush, then rename over `path`.
//
// And progress output that never stalls the caller: write_log.
#pragma once

#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <string_view>

namespace sy {

// A file written under `path.tmp` and renamed over `path` by commit(), after its data and then
// the directory entry are flushed to the disk (fsync): a crash at any point leaves either the
// old file or the new one, whole. Destroyed uncommitted (an exception on the way), it removes
// the temporary. Errors throw IoError naming the file.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

// Throws IoError naming the path when the file cannot be written; `path` is then untouched.
void write_file_atomic(const std::string& path, std::string_view contents);

// fsync of a directory, so that a rename in it survives a crash.
void sync_directory(const std::string& dir);

// Best-effort progress output: writes `text` to `f` (flushing what stdio holds for it first)
// unless the reader has stopped reading, in which case what does not fit within about 200 ms
// is dropped. A training run must not hang on its log: mpirun, for one, stops draining its
// ranks' output while it tears a job down, which is exactly when a rank has a final checkpoint
// to write. Write errors are ignored likewise.
void write_log(std::FILE* f, std::string_view text);

template <class... Args>
void print_log(std::FILE* f, fmt::format_string<Args...> format, Args&&... args) {
  write_log(f, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace sy
