// Fuzzes the run-config reader: the input is a config's JSON text, optionally preceded by
// lines of --set overrides ("key=value") up to a line holding only "---". Every outcome must be
// a parsed config or a sy::Error (ConfigError naming the key); anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/train/run_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  std::string text = input;
  if (const size_t sep = input.find("\n---\n"); sep != std::string::npos) {
    text = input.substr(sep + 5);
    size_t begin = 0;
    while (begin < sep) {
      const size_t end = std::min(input.find('\n', begin), sep);
      overrides.push_back(input.substr(begin, end - begin));
      begin = end + 1;
    }
  }
  sy::RunConfig cfg;
  try {
    cfg = sy::parse_run_config(text, "fuzz.json", overrides);
  } catch (const sy::Error&) {
    return 0;
  }
  // What a parsed config promises: it serialises, and what it wrote reads back as valid
  // (checkpoints store it so).
  try {
    (void)sy::parse_run_config(sy::run_config_json(cfg), "fuzz-roundtrip.json");
  } catch (const sy::Error&) {
    __builtin_trap();
  }
  return 0;
}
