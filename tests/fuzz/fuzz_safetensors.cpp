// Fuzzes the safetensors reader with whole files: the header checks (sizes, overflow, ranges,
// checksum table) over bytes in memory, then the same bytes as a file through the mmap path
// and read_safetensors, then the checkpoint metadata a Switchyard file carries (its run config).
// Every outcome must be a value or a sy::Error; anything else (a crash, another exception, a
// leak, a sanitizer report, a hang) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "switchyard/core/error.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/train/run_config.h"

namespace {

void from_memory(std::span<const std::byte> file) {
  try {
    const sy::MappedSafetensors m(file, "fuzz.safetensors");
    const auto cfg = m.metadata().find("config");
    if (cfg != m.metadata().end()) {
      try {
        (void)sy::parse_run_config(cfg->second, "fuzz.safetensors");
      } catch (const sy::Error&) {
      }
    }
    for (const auto& [name, e] : m.entries()) {
      const auto raw = m.bytes(e);
      if (raw.size() != e.nbytes) __builtin_trap();
    }
  } catch (const sy::Error&) {
  }
}

void from_file(std::span<const std::byte> file) {
  // An anonymous in-memory file: the real open/fstat/mmap path without touching the disk.
  const int fd = ::memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  if (fd < 0) return;
  size_t done = 0;
  while (done < file.size()) {
    const ssize_t w = ::write(fd, file.data() + done, file.size() - done);
    if (w <= 0) break;
    done += size_t(w);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    (void)sy::read_safetensors(path);
  } catch (const sy::Error&) {
  }
  ::close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  from_memory(file);
  from_file(file);
  return 0;
}
