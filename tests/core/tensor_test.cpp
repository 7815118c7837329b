// Tensor: shapes, alignment, dtype checks, conversions and bf16 rounding.
#include "switchyard/core/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "testing/testing.h"

namespace sy {
namespace {

TEST(Tensor, ShapeNumelAndAlignment) {
  Tensor t({3, 5, 7}, DType::kF32);
  EXPECT_EQ(t.rank(), 3);
  EXPECT_EQ(t.numel(), 105);
  EXPECT_EQ(t.nbytes(), 420u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data<float>()) % Tensor::kAlignment, 0u);
  for (float v : t.span<float>()) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(t.shape_str(), "[3, 5, 7] f32");
}

TEST(Tensor, EmptyIsValid) {
  Tensor t({0, 512}, DType::kF32);
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.matrix<float>().rows, 0);
}

TEST(Tensor, BadShapeThrowsNamingIt) {
  EXPECT_THROW(Tensor({2, -1}, DType::kF32), ShapeError);
  EXPECT_THROW(Tensor({1, 1, 1, 1, 1}, DType::kF32), ShapeError);
}

TEST(Tensor, WrongDtypeAccessAborts) {
  Tensor t({2, 2}, DType::kF32);
  EXPECT_DEATH((void)t.data<double>(), "accessed as f64");
  EXPECT_DEATH((void)t.stacked<float>(), "used as rank 3");
}

TEST(Tensor, ResizeKeepsBufferWhenShapeMatches) {
  Tensor t({4, 8}, DType::kF32);
  float* before = t.data<float>();
  t.resize({4, 8}, DType::kF32);
  EXPECT_EQ(t.data<float>(), before);
  t.resize({8, 8}, DType::kF32);
  EXPECT_EQ(t.numel(), 64);
}

TEST(Tensor, ExpectShapeNamesTheTensor) {
  Tensor t({2, 3}, DType::kF32);
  try {
    expect_shape(t, {3, 2}, "moe.w_gate");
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "moe.w_gate: shape [2, 3], expected [3, 2]");
  }
}

TEST(Tensor, ExpectDtypeNamesTheTensorAndWhy) {
  Tensor t({2}, DType::kF64);
  expect_dtype(t, DType::kF64, "moe.expert_bias");
  try {
    expect_dtype(t, DType::kF32, "moe.expert_bias", "moe.w_gate's dtype");
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "moe.expert_bias is f64: expected f32 (moe.w_gate's dtype)");
  }
  EXPECT_THROW(expect_dtype(t, DType::kBF16, "x"), ShapeError);
}

TEST(Tensor, ConvertRoundTrips) {
  Tensor a = testing::random_tensor({13, 7}, DType::kF64, 1);
  Tensor f = convert(a, DType::kF32);
  Tensor back = convert(f, DType::kF64);
  for (int64_t i = 0; i < a.numel(); ++i)
    EXPECT_NEAR(back.data<double>()[i], a.data<double>()[i], 1e-7);
  Tensor h = convert(a, DType::kBF16);
  Tensor hb = convert(h, DType::kF64);
  for (int64_t i = 0; i < a.numel(); ++i)  // bf16 keeps 8 significant bits
    EXPECT_NEAR(hb.data<double>()[i], a.data<double>()[i], std::abs(a.data<double>()[i]) / 256);
}

TEST(Tensor, ResizeForOverwriteKeepsTheBufferAndSkipsZeroing) {
  Tensor t({4, 8}, DType::kF32);
  for (float& v : t.span<float>()) v = 7.0f;
  const std::byte* buf = t.bytes();
  t.resize_for_overwrite({3, 8}, DType::kF32);  // smaller: same buffer, old contents left
  EXPECT_EQ(t.bytes(), buf);
  EXPECT_EQ(t.shape(), (std::vector<int64_t>{3, 8}));
  EXPECT_EQ(t.data<float>()[0], 7.0f);
  t.resize({2, 8}, DType::kF32);  // plain resize zeroes
  EXPECT_EQ(t.data<float>()[0], 0.0f);
  t.resize_for_overwrite({16, 8}, DType::kF32);  // larger: a new zeroed buffer
  EXPECT_EQ(t.numel(), 128);
  for (float v : t.span<float>()) ASSERT_EQ(v, 0.0f);
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(1.0f).bits, 0x3f80);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(to_bf16(1.0f + 0x1p-8f).bits, 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
  EXPECT_EQ(to_bf16(1.0f + 3 * 0x1p-8f).bits, 0x3f82);
  EXPECT_TRUE(std::isnan(to_float(to_bf16(NAN))));
  EXPECT_EQ(to_float(to_bf16(-2.5f)), -2.5f);
}

}  // namespace
}  // namespace sy
