// IDX files, gzip'd or not (read_maybe_gzip).
#include "switchyard/train/images.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <numeric>

#include "switchyard/core/error.h"
#include "switchyard/train/data.h"

namespace sy {

namespace {

std::vector<uint8_t> read_all(const std::string& path, const char* what) {
  return read_maybe_gzip(path, what,
                         "an IDX file, gzip'd or not; Fashion-MNIST: apt-get install "
                         "dataset-fashion-mnist");
}

uint32_t big_endian(const std::vector<uint8_t>& b, size_t at) {
  return uint32_t(b[at]) << 24 | uint32_t(b[at + 1]) << 16 | uint32_t(b[at + 2]) << 8 | b[at + 3];
}

// The header's dimensions after checking the magic; throws naming the file.
std::vector<int64_t> idx_dims(const std::vector<uint8_t>& b, uint32_t magic, int rank,
                              const std::string& path, const char* what) {
  const size_t header = 4 + 4 * size_t(rank);
  if (b.size() < header)
    throw IoError(fmt::format("{} file {}: {} bytes, shorter than its IDX header ({} bytes)", what,
                              path, b.size(), header));
  if (big_endian(b, 0) != magic)
    throw IoError(fmt::format("{} file {}: magic {:#x}, expected {:#x} (IDX {} of uint8)", what,
                              path, big_endian(b, 0), magic, rank == 3 ? "images" : "labels"));
  std::vector<int64_t> dims;
  // The product in double: dimensions of up to 2^32 each would overflow an int64 (they are
  // checked against the bytes present, which bound any real file).
  double count = 1;
  for (int i = 0; i < rank; ++i) {
    dims.push_back(int64_t(big_endian(b, 4 + 4 * size_t(i))));
    count *= double(dims.back());
  }
  if (double(b.size() - header) != count)
    throw IoError(
        fmt::format("{} file {}: {} data bytes after the header, expected {:.0f} for "
                    "dimensions {}",
                    what, path, b.size() - header, count, fmt::join(dims, " x ")));
  return dims;
}

ImageSet subset(const ImageSet& set, std::span<const int64_t> keep) {
  ImageSet out;
  out.n = int64_t(keep.size());
  out.rows = set.rows;
  out.cols = set.cols;
  out.n_classes = set.n_classes;
  const size_t px = size_t(set.rows * set.cols);
  out.pixels.resize(size_t(out.n) * px);
  out.labels.resize(size_t(out.n));
  for (size_t i = 0; i < keep.size(); ++i) {
    std::copy_n(set.pixels.data() + size_t(keep[i]) * px, px, out.pixels.data() + i * px);
    out.labels[i] = set.labels[size_t(keep[i])];
  }
  return out;
}

}  // namespace

ImageSet read_idx(const std::string& images_path, const std::string& labels_path) {
  return parse_idx(read_all(images_path, "IDX images"), read_all(labels_path, "IDX labels"),
                   images_path, labels_path);
}

ImageSet parse_idx(const std::vector<uint8_t>& im, const std::vector<uint8_t>& lb,
                   const std::string& images_path, const std::string& labels_path) {
  const std::vector<int64_t> d = idx_dims(im, 0x803, 3, images_path, "IDX images");
  const std::vector<int64_t> l = idx_dims(lb, 0x801, 1, labels_path, "IDX labels");
  if (d[0] != l[0])
    throw IoError(fmt::format("IDX files {} and {}: {} images but {} labels, expected as many",
                              images_path, labels_path, d[0], l[0]));
  if (d[0] == 0 || d[1] == 0 || d[2] == 0)
    throw IoError(fmt::format("IDX images file {}: {} x {} x {}, expected at least one image",
                              images_path, d[0], d[1], d[2]));
  ImageSet set;
  set.n = d[0];
  set.rows = d[1];
  set.cols = d[2];
  set.pixels.assign(im.begin() + 16, im.end());
  set.labels.assign(lb.begin() + 8, lb.end());
  set.n_classes = 1 + *std::max_element(set.labels.begin(), set.labels.end());
  return set;
}

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                 "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                                 "Bag",         "Ankle boot"};
  return names;
}

std::string image_class_name(int64_t label, int64_t n_classes) {
  const std::vector<std::string>& names = fashion_mnist_classes();
  return n_classes == int64_t(names.size()) ? names[size_t(label)] : fmt::format("class {}", label);
}

std::string fashion_mnist_path(const std::string& file) {
  return "/usr/share/datasets/fashion-mnist/" + file;
}

std::pair<ImageSet, ImageSet> split_images(const ImageSet& set, int64_t val_images, uint64_t seed) {
  if (val_images < 0 || val_images >= set.n)
    throw ConfigError(
        fmt::format("validation images = {}: expected 0 to {} (one less than the "
                    "{} images)",
                    val_images, set.n - 1, set.n));
  // Fisher-Yates over the indices, then each side sorted back to file order.
  std::vector<int64_t> order(static_cast<size_t>(set.n));
  std::iota(order.begin(), order.end(), 0);
  const Philox rng(seed, 0x5711);
  for (int64_t i = set.n - 1; i > 0; --i) {
    const auto b = rng.bits(uint64_t(i));
    const uint64_t r = (uint64_t(b[0]) << 32 | b[1]) % uint64_t(i + 1);
    std::swap(order[size_t(i)], order[size_t(r)]);
  }
  std::vector<int64_t> val(order.begin(), order.begin() + val_images),
      fit(order.begin() + val_images, order.end());
  std::sort(val.begin(), val.end());
  std::sort(fit.begin(), fit.end());
  return {subset(set, fit), subset(set, val)};
}

void augment_image(std::span<const uint8_t> image, int64_t rows, int64_t cols, int64_t pad,
                   bool flip, const Philox& rng, uint64_t draw, std::span<uint8_t> out) {
  SY_CHECK(int64_t(image.size()) == rows * cols && out.size() == image.size() && pad >= 0,
           "augment_image: {} pixels for {} x {}, out {}, pad {}", image.size(), rows, cols,
           out.size(), pad);
  const auto b = rng.bits(draw);
  const int64_t span = 2 * pad + 1;
  const int64_t dy = int64_t(b[0] % uint32_t(span)) - pad,
                dx = int64_t(b[1] % uint32_t(span)) - pad;
  const bool mirror = flip && (b[2] & 1u);
  for (int64_t y = 0; y < rows; ++y)
    for (int64_t x = 0; x < cols; ++x) {
      // out(y, x) = padded(y + pad + dy, x + pad + dx) of the image, mirrored first.
      const int64_t sy = y + dy, sx0 = x + dx;
      const int64_t sx = mirror ? cols - 1 - sx0 : sx0;
      const bool inside = sy >= 0 && sy < rows && sx0 >= 0 && sx0 < cols;
      out[size_t(y * cols + x)] = inside ? image[size_t(sy * cols + sx)] : uint8_t(0);
    }
}

}  // namespace sy
