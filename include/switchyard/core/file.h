// Writing files so that an interrupted or failed write never leaves a half-written file under
// the real name: write to `path.tmp`, flush, then rename over `path`.
#pragma once

#include <string>
#include <string_view>

namespace sy {

// Throws IoError naming the path when the file cannot be written; `path` is then untouched.
void write_file_atomic(const std::string& path, std::string_view contents);

}  // namespace sy
