// Precision names, apart from the backends so that config parsing links without the kernels.
#include "switchyard/core/error.h"
#include "switchyard/kernels/backend.h"

namespace sy {

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::kF32:
      return "f32";
    case Precision::kBf16:
      return "bf16";
    case Precision::kAuto:
      return "auto";
  }
  return "?";
}

Precision parse_precision(std::string_view s, std::string_view what) {
  if (s == "f32") return Precision::kF32;
  if (s == "bf16") return Precision::kBf16;
  if (s == "auto") return Precision::kAuto;
  throw ConfigError(fmt::format("{} = '{}': expected f32, bf16 or auto", what, s));
}

}  // namespace sy
