// Fuzzes the run-config readers (language model, vision, multimodal): the input is a config's
// JSON text, optionally preceded by lines of --set overrides ("key=value") up to a line holding
// only "---". Every outcome must be a parsed config or a sy::Error (ConfigError naming the key);
// anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/train/multimodal.h"
#include "switchyard/train/run_config.h"
#include "switchyard/train/vision.h"

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
  // What a parsed config promises: it serialises, and what it wrote reads back as valid
  // (checkpoints store it so).
  auto check = [&](auto parse, auto write) {
    decltype(parse(text, overrides)) cfg;
    try {
      cfg = parse(text, overrides);
    } catch (const sy::Error&) {
      return;
    }
    try {
      (void)parse(write(cfg), {});
    } catch (const sy::Error&) {
      __builtin_trap();
    }
  };
  check([](const std::string& t, const std::vector<std::string>& o) {
          return sy::parse_run_config(t, "fuzz.json", o);
        },
        [](const sy::RunConfig& c) { return sy::run_config_json(c); });
  check([](const std::string& t, const std::vector<std::string>& o) {
          return sy::parse_vision_config(t, "fuzz.json", o);
        },
        [](const sy::VisionRunConfig& c) { return sy::vision_config_json(c); });
  check([](const std::string& t, const std::vector<std::string>& o) {
          return sy::parse_multimodal_config(t, "fuzz.json", o);
        },
        [](const sy::MultimodalRunConfig& c) { return sy::multimodal_config_json(c); });
  return 0;
}
