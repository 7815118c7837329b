// Paths into tests/fixtures/hf (SY_FIXTURES, set by CMake) and whole-file reads for the tests.
#pragma once

#include <fstream>
#include <sstream>
#include <string>

namespace sy::testing {

inline std::string fixture(const std::string& rel) { return std::string(SY_FIXTURES) + "/" + rel; }

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace sy::testing
