// Fuzzes the IDX reader (Fashion-MNIST's image and label files): the input is the two files'
// bytes, the images file first, its length in the input's first two bytes (big-endian, capped
// at what follows). Every outcome must be an image set whose sizes agree with its header, or a
// sy::IoError naming the file; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/train/images.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t split = std::min<size_t>(size - 2, size_t(data[0]) << 8 | data[1]);
  const std::vector<uint8_t> images(data + 2, data + 2 + split), labels(data + 2 + split, data + size);
  sy::ImageSet set;
  try {
    set = sy::parse_idx(images, labels, "images.idx", "labels.idx");
  } catch (const sy::IoError&) {
    return 0;
  }
  if (set.n < 1 || set.rows < 1 || set.cols < 1 ||
      set.pixels.size() != size_t(set.n * set.rows * set.cols) || set.labels.size() != size_t(set.n))
    __builtin_trap();
  for (uint8_t y : set.labels)
    if (int(y) >= set.n_classes) __builtin_trap();
  return 0;
}
