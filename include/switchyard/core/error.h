// Errors. Two tiers: sy::Error subclasses for bad user input (a config, file, flag or shape),
// thrown at the public boundary with a message that names the thing, the value and what was
// expected; and SY_CHECK for broken internal invariants, which aborts with file:line.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace sy {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class ConfigError : public Error {
 public:
  using Error::Error;
};
class ShapeError : public Error {
 public:
  using Error::Error;
};
class IoError : public Error {
 public:
  using Error::Error;
};
class DistError : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void check_fail(const char* file, int line, const char* cond, const std::string& msg);
}  // namespace detail

}  // namespace sy

// Always on, also in release builds: a failed check is a bug, and continuing would hide it.
#define SY_CHECK(cond, ...)                                                            \
  do {                                                                                 \
    if (!(cond)) [[unlikely]]                                                          \
      ::sy::detail::check_fail(__FILE__, __LINE__, #cond, ::fmt::format(__VA_ARGS__)); \
  } while (0)

#ifdef NDEBUG
#define SY_DCHECK(cond, ...) \
  do {                       \
  } while (0)
#else
#define SY_DCHECK(cond, ...) SY_CHECK(cond, __VA_ARGS__)
#endif
