// Labelled images for vision models: Fashion-MNIST's IDX files (gzip'd or not), a deterministic
// train/validation split of a training set, and the light augmentation ViT training uses
// (random crop after zero padding, horizontal flip).
//
//   ImageSet train = read_idx(fashion_mnist_path("train-images-idx3-ubyte.gz"),
//                             fashion_mnist_path("train-labels-idx1-ubyte.gz"));
//   auto [fit, val] = split_images(train, /*val_images=*/5000, /*seed=*/1);
//   augment_image(fit.image(i), fit.rows, fit.cols, /*pad=*/2, /*flip=*/true, rng, draw, out);
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/rng.h"

namespace sy {

struct ImageSet {
  int64_t n = 0, rows = 0, cols = 0;
  std::vector<uint8_t> pixels;  // [n, rows, cols], 0..255, row-major
  std::vector<uint8_t> labels;  // [n]
  int n_classes = 0;            // one past the largest label
  std::span<const uint8_t> image(int64_t i) const {
    return {pixels.data() + i * rows * cols, size_t(rows * cols)};
  }
};

// Reads an IDX image file (magic 0x803: count, rows, cols, then uint8 pixels) and its IDX label
// file (magic 0x801: count, then uint8 labels). Throws IoError naming the file and what was
// expected for a missing file, a wrong magic, dimensions that do not match the bytes, or
// counts that differ between the two files.
ImageSet read_idx(const std::string& images_path, const std::string& labels_path);
// The same from the files' bytes (already gunzipped); the paths name them in errors.
ImageSet parse_idx(const std::vector<uint8_t>& images, const std::vector<uint8_t>& labels,
                   const std::string& images_path, const std::string& labels_path);

// Where Debian's dataset-fashion-mnist puts a file (installed by scripts/setup.sh).
std::string fashion_mnist_path(const std::string& file);
// Fashion-MNIST's ten class names, by label.
const std::vector<std::string>& fashion_mnist_classes();
// A label's name in reports: Fashion-MNIST's when there are ten classes, else "class <label>".
std::string image_class_name(int64_t label, int64_t n_classes);

// A random split (Philox(seed), the same for the same seed): val_images images to the second
// set, the rest to the first, each keeping the original order. Throws ConfigError unless
// 0 <= val_images < set.n.
std::pair<ImageSet, ImageSet> split_images(const ImageSet& set, int64_t val_images, uint64_t seed);

// out[rows * cols] = the image mirrored left-right with probability 1/2 when flip, then shifted
// by a random offset in [-pad, pad] on each axis (the pixels shifted in are 0: a crop of the
// zero-padded image). The randomness is rng's draw `draw` alone (say epoch * n + image),
// so a run repeats exactly. pad = 0 and !flip copy the image.
void augment_image(std::span<const uint8_t> image, int64_t rows, int64_t cols, int64_t pad,
                   bool flip, const Philox& rng, uint64_t draw, std::span<uint8_t> out);

}  // namespace sy
