// Fashion-MNIST IDX reading (the slice in data/ and damaged files), the train/validation split
// and the augmentation, against what each must do by construction.
#include "switchyard/train/images.h"

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <unordered_set>

#include "switchyard/core/error.h"

namespace sy {
namespace {

const std::string kImages =
    std::string(SY_SOURCE_DIR) + "/data/fashion-mnist-t10k-1000-images-idx3-ubyte.gz";
const std::string kLabels =
    std::string(SY_SOURCE_DIR) + "/data/fashion-mnist-t10k-1000-labels-idx1-ubyte.gz";

TEST(Images, ReadsTheCommittedSlice) {
  const ImageSet s = read_idx(kImages, kLabels);
  EXPECT_EQ(s.n, 1000);
  EXPECT_EQ(s.rows, 28);
  EXPECT_EQ(s.cols, 28);
  EXPECT_EQ(s.n_classes, 10);
  ASSERT_EQ(s.pixels.size(), 1000u * 784u);
  // Class counts of the first 1000 test images, and the first labels (ankle boot, pullover,
  // trouser, trouser), as the dataset's own reader gives them.
  std::array<int, 10> count{};
  for (uint8_t l : s.labels) ++count[l];
  EXPECT_EQ(count, (std::array<int, 10>{107, 105, 111, 93, 115, 87, 97, 95, 95, 95}));
  EXPECT_EQ(std::vector<int>(s.labels.begin(), s.labels.begin() + 4),
            (std::vector<int>{9, 2, 1, 1}));
  int64_t sum = 0;
  for (uint8_t p : s.image(0)) sum += p;
  EXPECT_GT(sum, 0);
}

// Raw (not gzip'd) IDX bytes written to a temporary file.
std::string write_file(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  return path;
}
std::vector<uint8_t> header(uint32_t magic, std::vector<uint32_t> dims) {
  std::vector<uint8_t> b;
  dims.insert(dims.begin(), magic);
  for (uint32_t v : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(v >> s));
  return b;
}

TEST(Images, DamagedFilesAreNamedWithWhatWasExpected) {
  std::vector<uint8_t> im = header(0x803, {2, 3, 2}), lb = header(0x801, {2});
  for (int i = 0; i < 12; ++i) im.push_back(uint8_t(i));
  lb.push_back(3);
  lb.push_back(7);
  const std::string good_im = write_file("sy_img_ok", im), good_lb = write_file("sy_lbl_ok", lb);
  const ImageSet s = read_idx(good_im, good_lb);  // plain files read as gzip'd ones do
  EXPECT_EQ(s.n, 2);
  EXPECT_EQ(s.n_classes, 8);
  EXPECT_EQ(s.image(1)[0], 6);

  auto expect_io = [](const std::string& a, const std::string& b, const std::string& want) {
    try {
      read_idx(a, b);
      FAIL() << "accepted; expected: " << want;
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  std::vector<uint8_t> swapped = header(0x801, {2, 3, 2});
  swapped.insert(swapped.end(), im.begin() + 16, im.end());
  expect_io(write_file("sy_img_magic", swapped), good_lb, "magic 0x801, expected 0x803");
  std::vector<uint8_t> short_im(im.begin(), im.end() - 1);
  expect_io(write_file("sy_img_short", short_im), good_lb,
            "11 data bytes after the header, expected 12 for dimensions 2 x 3 x 2");
  std::vector<uint8_t> three = header(0x801, {3});
  three.insert(three.end(), {1, 2, 3});
  expect_io(good_im, write_file("sy_lbl_three", three), "2 images but 3 labels");
  expect_io(good_im, "/nonexistent/labels.gz", "not found");
  expect_io(write_file("sy_img_tiny", {8, 3}), good_lb, "shorter than its IDX header");
  // Dimensions whose product overflows 64 bits: named, not wrapped into a match.
  std::vector<uint8_t> huge = header(0x803, {0x80000000u, 0x80000000u, 4});
  huge.insert(huge.end(), {1, 2, 3, 4});
  expect_io(write_file("sy_img_huge", huge), good_lb,
            "4 data bytes after the header, expected 18446744073709551616 for dimensions");
}

TEST(Images, SplitIsDisjointCompleteAndRepeatable) {
  const ImageSet s = read_idx(kImages, kLabels);
  const auto [fit, val] = split_images(s, 200, 7);
  EXPECT_EQ(fit.n, 800);
  EXPECT_EQ(val.n, 200);
  // Each image lands in exactly one side: match by pixels (the slice has no duplicate images).
  std::unordered_set<std::string> all, seen;
  for (int64_t i = 0; i < s.n; ++i) all.emplace(s.image(i).begin(), s.image(i).end());
  ASSERT_EQ(all.size(), 1000u);
  for (const ImageSet* part : {&fit, &val})
    for (int64_t i = 0; i < part->n; ++i)
      EXPECT_TRUE(seen.emplace(part->image(i).begin(), part->image(i).end()).second);
  EXPECT_EQ(seen, all);
  const auto [fit2, val2] = split_images(s, 200, 7);
  EXPECT_EQ(val2.pixels, val.pixels);
  EXPECT_EQ(val2.labels, val.labels);
  const auto [fit3, val3] = split_images(s, 200, 8);
  EXPECT_NE(val3.labels, val.labels);
  EXPECT_THROW(split_images(s, 1000, 1), ConfigError);
  EXPECT_THROW(split_images(s, -1, 1), ConfigError);
}

TEST(Images, AugmentationShiftsWithinThePadAndMirrors) {
  // A 5 x 7 image of distinct values; every output pixel is 0 or the source pixel it must be.
  const int64_t R = 5, C = 7;
  std::vector<uint8_t> img(size_t(R * C)), out(img.size());
  for (size_t i = 0; i < img.size(); ++i) img[i] = uint8_t(i + 1);
  const Philox rng(3, 1);
  augment_image(img, R, C, 0, false, rng, 0, out);
  EXPECT_EQ(out, img);
  std::set<std::pair<int64_t, int64_t>> shifts;
  int mirrored = 0;
  for (uint64_t draw = 0; draw < 400; ++draw) {
    augment_image(img, R, C, 2, true, rng, draw, out);
    // Recover the shift and mirror from any pixel that came from the image.
    bool found = false;
    for (int64_t y = 0; y < R && !found; ++y)
      for (int64_t x = 0; x < C && !found; ++x) {
        const int v = out[size_t(y * C + x)];
        if (v == 0) continue;
        const int64_t sy = (v - 1) / C, sx = (v - 1) % C;
        // Either plain (sx = x + dx) or mirrored (sx = C - 1 - (x + dx)); try both.
        for (const bool m : {false, true}) {
          const int64_t dy = sy - y, dx = m ? (C - 1 - sx) - x : sx - x;
          if (std::abs(dy) > 2 || std::abs(dx) > 2) continue;
          bool all_match = true;
          for (int64_t yy = 0; yy < R; ++yy)
            for (int64_t xx = 0; xx < C; ++xx) {
              const int64_t ty = yy + dy, tx0 = xx + dx;
              const bool in = ty >= 0 && ty < R && tx0 >= 0 && tx0 < C;
              const int want = in ? img[size_t(ty * C + (m ? C - 1 - tx0 : tx0))] : 0;
              all_match = all_match && out[size_t(yy * C + xx)] == want;
            }
          if (all_match) {
            found = true;
            shifts.emplace(dy, dx);
            mirrored += m;
            break;
          }
        }
      }
    ASSERT_TRUE(found) << "draw " << draw << " is not a mirrored or plain shift within 2";
  }
  EXPECT_EQ(shifts.size(), 25u);  // every offset in [-2, 2]^2 occurs
  EXPECT_GT(mirrored, 140);       // about half of 400
  EXPECT_LT(mirrored, 260);
  augment_image(img, R, C, 2, true, rng, 17, out);
  std::vector<uint8_t> again(img.size());
  augment_image(img, R, C, 2, true, rng, 17, again);
  EXPECT_EQ(again, out);  // a draw repeats
}

}  // namespace
}  // namespace sy
