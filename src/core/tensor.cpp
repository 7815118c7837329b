// Tensor storage: aligned allocation, shape bookkeeping and dtype conversion.
#include "switchyard/core/tensor.h"

#include <fmt/ranges.h>

#include <cstdlib>
#include <cstring>
#include <new>

namespace sy {

namespace {

std::byte* alloc_aligned(size_t bytes) {
  if (bytes == 0) return nullptr;
  size_t rounded = (bytes + Tensor::kAlignment - 1) / Tensor::kAlignment * Tensor::kAlignment;
  void* p = std::aligned_alloc(Tensor::kAlignment, rounded);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, rounded);
  return static_cast<std::byte*>(p);
}

int64_t checked_numel(std::span<const int64_t> shape) {
  if (shape.size() > static_cast<size_t>(Tensor::kMaxRank))
    throw ShapeError(
        fmt::format("tensor of rank {}: expected at most {}", shape.size(), Tensor::kMaxRank));
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0)
      throw ShapeError(fmt::format("tensor shape [{}]: dims must be >= 0", fmt::join(shape, ", ")));
    n *= s;
  }
  return n;
}

}  // namespace

void Tensor::Free::operator()(std::byte* p) const { std::free(p); }

Tensor::Tensor(std::span<const int64_t> shape, DType dtype)
    : shape_(shape.begin(), shape.end()), numel_(checked_numel(shape)), dtype_(dtype) {
  buf_.reset(alloc_aligned(nbytes()));
  capacity_ = nbytes();
}

Tensor Tensor::clone() const {
  Tensor t(shape_, dtype_);
  if (nbytes() > 0) std::memcpy(t.buf_.get(), buf_.get(), nbytes());
  return t;
}

void Tensor::resize(std::span<const int64_t> shape, DType dtype) {
  if (dtype == dtype_ && std::equal(shape.begin(), shape.end(), shape_.begin(), shape_.end()))
    return;
  const int64_t numel = checked_numel(shape);
  const size_t bytes = static_cast<size_t>(numel) * dtype_size(dtype);
  if (buf_ != nullptr && bytes <= capacity_) {
    // A buffer that is large enough is reused (zeroed as a new one would be): scratch whose
    // row count varies from call to call, such as the rows an expert keeps, then costs no
    // allocation and no page faults.
    shape_.assign(shape.begin(), shape.end());
    numel_ = numel;
    dtype_ = dtype;
    if (bytes > 0) std::memset(buf_.get(), 0, bytes);
    return;
  }
  *this = Tensor(shape, dtype);
}

void Tensor::resize_for_overwrite(std::initializer_list<int64_t> shape, DType dtype) {
  const std::span<const int64_t> s(shape.begin(), shape.size());
  const size_t bytes = static_cast<size_t>(checked_numel(s)) * dtype_size(dtype);
  if (buf_ != nullptr && bytes <= capacity_) {
    shape_.assign(s.begin(), s.end());
    numel_ = checked_numel(s);
    dtype_ = dtype;
    return;
  }
  resize(s, dtype);
}

void Tensor::fill_zero() {
  if (nbytes() > 0) std::memset(buf_.get(), 0, nbytes());
}

std::string Tensor::shape_str() const {
  return fmt::format("[{}] {}", fmt::join(shape_, ", "), dtype_name(dtype_));
}

void Tensor::check_dtype(DType want) const {
  SY_CHECK(want == dtype_, "tensor {} accessed as {}", shape_str(), dtype_name(want));
}

void Tensor::check_rank(int want) const {
  SY_CHECK(rank() == want, "tensor {} used as rank {}", shape_str(), want);
}

void expect_shape(const Tensor& t, std::span<const int64_t> shape, std::string_view what) {
  if (!std::equal(shape.begin(), shape.end(), t.shape().begin(), t.shape().end()))
    throw ShapeError(fmt::format("{}: shape [{}], expected [{}]", what, fmt::join(t.shape(), ", "),
                                 fmt::join(shape, ", ")));
}

void expect_dtype(const Tensor& t, DType want, std::string_view what, std::string_view why) {
  if (t.dtype() != want)
    throw ShapeError(fmt::format("{} is {}: expected {}{}{}{}", what, dtype_name(t.dtype()),
                                 dtype_name(want), why.empty() ? "" : " (", why,
                                 why.empty() ? "" : ")"));
}

namespace {
template <class From, class To>
void convert_elems(const From* src, To* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<From, To>) {
      dst[i] = src[i];
    } else if constexpr (std::is_same_v<From, bf16>) {
      dst[i] = static_cast<To>(to_float(src[i]));
    } else if constexpr (std::is_same_v<To, bf16>) {
      dst[i] = to_bf16(static_cast<float>(src[i]));
    } else {
      dst[i] = static_cast<To>(src[i]);
    }
  }
}
template <class From>
void convert_from(const Tensor& t, Tensor& out) {
  const From* src = t.data<From>();
  switch (out.dtype()) {
    case DType::kF32:
      convert_elems(src, out.data<float>(), t.numel());
      break;
    case DType::kF64:
      convert_elems(src, out.data<double>(), t.numel());
      break;
    case DType::kBF16:
      convert_elems(src, out.data<bf16>(), t.numel());
      break;
  }
}
}  // namespace

Tensor convert(const Tensor& t, DType to) {
  Tensor out(t.shape(), to);
  switch (t.dtype()) {
    case DType::kF32:
      convert_from<float>(t, out);
      break;
    case DType::kF64:
      convert_from<double>(t, out);
      break;
    case DType::kBF16:
      convert_from<bf16>(t, out);
      break;
  }
  return out;
}

}  // namespace sy
