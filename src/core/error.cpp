// Failure path of SY_CHECK: print where and why, then abort so a debugger or core dump
// stops at the broken invariant.
#include "switchyard/core/error.h"

#include <cstdio>
#include <cstdlib>

namespace sy::detail {

void check_fail(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "%s:%d: check failed: %s: %s\n", file, line, cond, msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace sy::detail
