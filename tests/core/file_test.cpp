// Atomic writes: the file appears whole or not at all, and a failed write keeps the old one.
#include "switchyard/core/file.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "switchyard/core/error.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

std::string read_all(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(WriteFileAtomic, WritesAndReplaces) {
  const fs::path dir = fs::temp_directory_path() / "sy_file_test";
  fs::create_directories(dir);
  const std::string path = (dir / "out.json").string();
  write_file_atomic(path, "first");
  write_file_atomic(path, "second");
  EXPECT_EQ(read_all(path), "second");
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  fs::remove_all(dir);
}

TEST(WriteFileAtomic, FailureKeepsExistingFileAndNamesPath) {
  const fs::path dir = fs::temp_directory_path() / "sy_file_test_fail";
  fs::create_directories(dir);
  const std::string path = (dir / "keep.txt").string();
  write_file_atomic(path, "precious");
  // A directory squatting on the temp name makes the write fail before the rename.
  fs::create_directories(path + ".tmp");
  try {
    write_file_atomic(path, "new");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("keep.txt.tmp"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_all(path), "precious");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sy
