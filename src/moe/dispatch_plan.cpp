// Dispatch plan by counting sort, and the weighted combine that undoes it.
#include "switchyard/moe/dispatch_plan.h"

#include <algorithm>

#include "switchyard/core/error.h"

namespace sy {

size_t DispatchPlan::index_bytes() const {
  return sizeof(int32_t) *
         (offsets.size() + row_token.size() + row_slot.size() + slot_row.size() + demand.size());
}

void build_dispatch_plan(std::span<const int32_t> expert, int64_t n_tokens, int64_t top_k,
                         int64_t n_experts, int64_t capacity, DispatchPlan& plan,
                         std::span<const int32_t> rank, std::span<const int64_t> kept) {
  if (n_experts < 1) throw ConfigError(fmt::format("n_experts = {}: expected >= 1", n_experts));
  if (top_k < 1 || top_k > n_experts)
    throw ConfigError(fmt::format("top_k = {}: expected 1..{} (n_experts)", top_k, n_experts));
  if (capacity < -1)
    throw ConfigError(fmt::format("capacity = {}: expected >= 0, or -1 for none", capacity));
  const int64_t n_slots = n_tokens * top_k;
  if (int64_t(expert.size()) != n_slots)
    throw ShapeError(fmt::format("expert ids: {} entries, expected {} (tokens {} x top_k {})",
                                 expert.size(), n_slots, n_tokens, top_k));
  if (!rank.empty()) {
    if (int64_t(rank.size()) != n_slots)
      throw ShapeError(fmt::format("slot rank: {} entries, expected {}", rank.size(), n_slots));
    std::vector<bool> seen(size_t(n_slots), false);
    for (int64_t r = 0; r < n_slots; ++r) {
      const int32_t s = rank[r];
      if (s < 0 || s >= n_slots || seen[s])
        throw ShapeError(
            fmt::format("slot rank[{}] = {}: expected a permutation of 0..{}", r, s, n_slots - 1));
      seen[s] = true;
    }
  }

  plan.n_tokens = n_tokens;
  plan.top_k = top_k;
  plan.n_experts = n_experts;
  plan.capacity = capacity;
  plan.demand.assign(size_t(n_experts), 0);
  for (int64_t s = 0; s < n_slots; ++s) {
    const int32_t e = expert[s];
    if (e < 0 || e >= n_experts)
      throw ShapeError(fmt::format("expert id {} at slot {} (token {}, choice {}): expected 0..{}",
                                   e, s, s / top_k, s % top_k, n_experts - 1));
    ++plan.demand[e];
  }

  // Histogram -> kept rows per expert -> exclusive prefix sum.
  plan.offsets.assign(size_t(n_experts) + 1, 0);
  if (!kept.empty() && int64_t(kept.size()) != n_experts)
    throw ShapeError(fmt::format("kept rows: {} entries, expected {} (n_experts)", kept.size(),
                                 n_experts));
  for (int64_t e = 0; e < n_experts; ++e) {
    int64_t rows = capacity < 0 ? plan.demand[e] : std::min<int64_t>(plan.demand[e], capacity);
    if (!kept.empty()) {
      if (kept[e] < 0 || kept[e] > plan.demand[e])
        throw ShapeError(fmt::format("kept rows of expert {}: {}, expected 0..{} (its demand)", e,
                                     kept[e], plan.demand[e]));
      rows = kept[e];
    }
    plan.offsets[e + 1] = plan.offsets[e] + int32_t(rows);
  }
  const int64_t n_rows = plan.offsets.back();
  plan.row_token.resize(size_t(n_rows));
  plan.row_slot.resize(size_t(n_rows));
  plan.slot_row.assign(size_t(n_slots), -1);

  // Scatter slots in rank order; cursor[e] is expert e's next free row.
  std::vector<int32_t> cursor(plan.offsets.begin(), plan.offsets.end() - 1);
  for (int64_t r = 0; r < n_slots; ++r) {
    // Default, choice-major: rank r is choice r / T of token r % T.
    const int64_t s = rank.empty() ? (r % n_tokens) * top_k + r / n_tokens : rank[r];
    const int32_t e = expert[s];
    if (cursor[e] == plan.offsets[e + 1]) continue;  // expert full: slot dropped
    const int32_t row = cursor[e]++;
    plan.row_token[row] = int32_t(s / top_k);
    plan.row_slot[row] = int32_t(s);
    plan.slot_row[s] = row;
  }
}

template <class T>
void combine_rows(ConstMatrixView<T> ys, const DispatchPlan& plan, ConstMatrixView<T> weight,
                  MatrixView<T> y) {
  const int64_t k = plan.top_k, d = y.cols;
#pragma omp parallel for schedule(static) if (y.size() > (1 << 14))
  for (int64_t t = 0; t < plan.n_tokens; ++t) {
    T* out = y.row(t);
    std::fill_n(out, d, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t row = plan.slot_row[t * k + j];
      if (row < 0) continue;
      const T w = weight(t, j);
      const T* src = ys.row(row);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) out[c] += w * src[c];
    }
  }
}

template <class T>
void combine_rows_backward(ConstMatrixView<T> ys, const DispatchPlan& plan,
                           ConstMatrixView<T> weight, ConstMatrixView<T> dy, MatrixView<T> dys,
                           MatrixView<T> dweight) {
  const int64_t k = plan.top_k, d = dy.cols;
#pragma omp parallel for schedule(static) if (dy.size() > (1 << 14))
  for (int64_t t = 0; t < plan.n_tokens; ++t) {
    const T* g = dy.row(t);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t row = plan.slot_row[t * k + j];
      if (row < 0) {
        dweight(t, j) = T(0);
        continue;
      }
      const T w = weight(t, j);
      const T* src = ys.row(row);
      T* dst = dys.row(row);
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) {
        dst[c] = w * g[c];
        dot += g[c] * src[c];
      }
      dweight(t, j) = dot;
    }
  }
}

template void combine_rows(ConstMatrixView<float>, const DispatchPlan&, ConstMatrixView<float>,
                           MatrixView<float>);
template void combine_rows(ConstMatrixView<double>, const DispatchPlan&, ConstMatrixView<double>,
                           MatrixView<double>);
template void combine_rows_backward(ConstMatrixView<float>, const DispatchPlan&,
                                    ConstMatrixView<float>, ConstMatrixView<float>,
                                    MatrixView<float>, MatrixView<float>);
template void combine_rows_backward(ConstMatrixView<double>, const DispatchPlan&,
                                    ConstMatrixView<double>, ConstMatrixView<double>,
                                    MatrixView<double>, MatrixView<double>);

}  // namespace sy
