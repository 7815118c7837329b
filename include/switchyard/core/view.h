// Non-owning views that kernels take: a row-major matrix [rows, cols] (contiguous rows,
// leading dimension == cols) and a stack of equal matrices [n, rows, cols] such as the
// experts' weights [E, d, f].
#pragma once

#include <cstdint>
#include <type_traits>

#include "switchyard/core/error.h"

namespace sy {

template <class T>
struct MatrixView {
  T* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  T* row(int64_t i) const { return data + i * cols; }
  T& operator()(int64_t i, int64_t j) const { return data[i * cols + j]; }
  int64_t size() const { return rows * cols; }
  // Rows [begin, end): still contiguous, so a sub-range is a view of the same kind.
  MatrixView slice_rows(int64_t begin, int64_t end) const {
    SY_DCHECK(0 <= begin && begin <= end && end <= rows, "rows [{}, {}) of {}", begin, end, rows);
    return {data + begin * cols, end - begin, cols};
  }
  operator MatrixView<const T>() const requires(!std::is_const_v<T>) { return {data, rows, cols}; }
};
template <class T>
using ConstMatrixView = MatrixView<const T>;

template <class T>
struct StackedView {
  T* data = nullptr;
  int64_t n = 0;
  int64_t rows = 0;
  int64_t cols = 0;

  MatrixView<T> operator[](int64_t i) const { return {data + i * rows * cols, rows, cols}; }
  // Matrix i as a stack of one.
  StackedView one(int64_t i) const { return {data + i * rows * cols, 1, rows, cols}; }
  operator StackedView<const T>() const requires(!std::is_const_v<T>) {
    return {data, n, rows, cols};
  }
};

}  // namespace sy
