// ArmConfig's checks: config logic only, so the config reader can be built alone (tests/fuzz).
#include <cmath>

#include "switchyard/core/error.h"
#include "switchyard/train/arm.h"

namespace sy {

void ArmConfig::validate() const {
  auto positive = [](double v, const char* name) {
    if (!(v > 0) || !std::isfinite(v))
      throw ConfigError(fmt::format("data.arm.{} = {}: expected a positive number", name, v));
  };
  positive(l1, "l1");
  positive(l2, "l2");
  positive(m1, "m1");
  positive(m2, "m2");
  positive(dt, "dt");
  positive(tau_max, "tau_max");
  if (!(damping >= 0) || !(kp >= 0) || !(kd >= 0))
    throw ConfigError("data.arm.damping, kp and kd: expected numbers >= 0");
  if (substeps < 1 || substeps > 1000)
    throw ConfigError(fmt::format("data.arm.substeps = {}: expected 1..1000", substeps));
}

}  // namespace sy
