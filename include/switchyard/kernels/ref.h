// Reference kernels: the plain-loop twins of kernels/cpu.h (same signatures, same
// semantics), accumulating in double, single threaded and written to be read. Tests and the
// benchmark's --check compare the fast kernels against these; no hot path calls them.
#pragma once

#include <cstdint>
#include <span>

#include "switchyard/core/dtype.h"
#include "switchyard/core/view.h"

namespace sy::ref {

#include "switchyard/kernels/detail/kernel_decls.inc"

}  // namespace sy::ref
