// Tensor: an owning, 64-byte aligned, contiguous, row-major array of f32, f64 or bf16 with a
// shape of up to 4 dims. Move-only (copies are explicit with clone()) so a large buffer is
// never duplicated by accident. Typed access checks the dtype; views check the rank.
//
//   Tensor w({E, d, f}, DType::kF32);        // zero-filled
//   StackedView<float> wv = w.stacked<float>();
//   MatrixView<float> x = t.matrix<float>(); // rank 2 only
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "switchyard/core/dtype.h"
#include "switchyard/core/error.h"
#include "switchyard/core/view.h"

namespace sy {

class Tensor {
 public:
  static constexpr size_t kAlignment = 64;
  static constexpr int kMaxRank = 4;

  Tensor() = default;
  // Throws ShapeError for a negative dim or a rank above kMaxRank.
  Tensor(std::span<const int64_t> shape, DType dtype);
  Tensor(std::initializer_list<int64_t> shape, DType dtype)
      : Tensor(std::span<const int64_t>(shape.begin(), shape.size()), dtype) {}

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor clone() const;

  // Keeps the buffer and its contents when shape and dtype already match (no allocation in the
  // steady state); otherwise zero-filled, in the same buffer when it is large enough.
  void resize(std::span<const int64_t> shape, DType dtype);
  void resize(std::initializer_list<int64_t> shape, DType dtype) {
    resize(std::span<const int64_t>(shape.begin(), shape.size()), dtype);
  }
  // The same for a tensor that the caller overwrites whole (a GEMM's output with beta = 0): a
  // reused buffer is not zeroed first. Expert scratch of varying row count then costs neither
  // allocation nor a pass over memory per step.
  void resize_for_overwrite(std::initializer_list<int64_t> shape, DType dtype);
  void fill_zero();

  DType dtype() const { return dtype_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const {
    SY_CHECK(i >= 0 && i < rank(), "dim {} of a rank-{} tensor", i, rank());
    return shape_[i];
  }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  bool empty() const { return numel_ == 0; }
  std::string shape_str() const;  // e.g. "[8, 512, 1024] f32"

  // The raw bytes, whatever the dtype: for file I/O.
  std::byte* bytes() { return buf_.get(); }
  const std::byte* bytes() const { return buf_.get(); }
  template <class T>
  T* data() {
    check_dtype(dtype_of<T>());
    return reinterpret_cast<T*>(buf_.get());
  }
  template <class T>
  const T* data() const {
    check_dtype(dtype_of<T>());
    return reinterpret_cast<const T*>(buf_.get());
  }
  template <class T>
  std::span<T> span() {
    return {data<T>(), static_cast<size_t>(numel_)};
  }
  template <class T>
  std::span<const T> span() const {
    return {data<T>(), static_cast<size_t>(numel_)};
  }
  template <class T>
  MatrixView<T> matrix() {
    check_rank(2);
    return {data<T>(), shape_[0], shape_[1]};
  }
  template <class T>
  ConstMatrixView<T> matrix() const {
    check_rank(2);
    return {data<T>(), shape_[0], shape_[1]};
  }
  template <class T>
  StackedView<T> stacked() {
    check_rank(3);
    return {data<T>(), shape_[0], shape_[1], shape_[2]};
  }
  template <class T>
  StackedView<const T> stacked() const {
    check_rank(3);
    return {data<T>(), shape_[0], shape_[1], shape_[2]};
  }

 private:
  struct Free {
    void operator()(std::byte* p) const;
  };
  void check_dtype(DType want) const;
  void check_rank(int want) const;

  std::unique_ptr<std::byte[], Free> buf_;
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
  size_t capacity_ = 0;  // bytes of buf_
};

// Throws ShapeError naming `what` unless t has exactly this shape.
void expect_shape(const Tensor& t, std::span<const int64_t> shape, std::string_view what);
inline void expect_shape(const Tensor& t, std::initializer_list<int64_t> shape,
                         std::string_view what) {
  expect_shape(t, std::span<const int64_t>(shape.begin(), shape.size()), what);
}

// Throws ShapeError naming `what` unless t holds `want`; `why` (e.g. "moe.w_gate's dtype") is
// added to the message when given.
void expect_dtype(const Tensor& t, DType want, std::string_view what, std::string_view why = {});

// Converts between dtypes (f32 <-> f64 <-> bf16). Same dtype gives a clone.
Tensor convert(const Tensor& t, DType to);

}  // namespace sy
