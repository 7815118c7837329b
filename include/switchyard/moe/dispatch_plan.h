// The dispatch plan: which rows each expert computes. A counting sort of the T*k (token,
// choice) slots by expert gives offsets[E+1] and the token of each row; capacity C bounds the
// rows per expert and the rest are dropped. Memory is O(T*k) indices, never a [T, E, C] one-hot.
//
// Which slots drop: slots are ranked choice-major, every token's first choice before any
// token's second choice and by token index within a choice (GShard), so a token loses its
// second expert before another token loses its first. A caller can pass its own ranking
// (batch prioritized routing ranks by router score).
//
//   build_dispatch_plan(expert, T, k, E, /*capacity=*/C, plan);
//   cpu::gather_rows(x, plan.row_token, xs);   // xs: rows in expert order
//   ... per-expert work on plan.offsets ...
//   combine_rows(ys, plan, weight, y);         // backward of the gather: scatter_add_rows
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "switchyard/core/view.h"

namespace sy {

struct DispatchPlan {
  int64_t n_tokens = 0;
  int64_t top_k = 0;
  int64_t n_experts = 0;
  int64_t capacity = -1;           // -1: unbounded (dropless)
  std::vector<int32_t> offsets;    // [E+1]: expert e computes rows offsets[e]..offsets[e+1]
  std::vector<int32_t> row_token;  // [n]: the token each row comes from
  std::vector<int32_t> row_slot;   // [n]: the slot t*k+j each row serves
  std::vector<int32_t> slot_row;   // [T*k]: the row serving each slot, -1 when dropped
  std::vector<int32_t> demand;     // [E]: slots that chose each expert, before capacity

  int64_t n_rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int64_t n_slots() const { return n_tokens * top_k; }
  int64_t n_dropped() const { return n_slots() - n_rows(); }
  int64_t rows_of(int64_t e) const { return offsets[e + 1] - offsets[e]; }
  size_t index_bytes() const;  // memory held by the index arrays above
};

// expert: [T*k] chosen experts, slot t*k+j = token t's j-th choice. capacity: rows per expert,
// or -1 for none. rank (optional, [T*k]): the slot order in which capacity is granted, a
// permutation of 0..T*k-1; empty means choice-major. Reuses plan's buffers.
// Throws ShapeError for an expert id outside [0, E) or a bad rank, ConfigError for k or C out
// of range. kept (optional, [E]): rows granted to each expert, in place of min(demand, capacity)
// (expert parallelism decides them over all ranks' tokens; capacity is then only recorded).
void build_dispatch_plan(std::span<const int32_t> expert, int64_t n_tokens, int64_t top_k,
                         int64_t n_experts, int64_t capacity, DispatchPlan& plan,
                         std::span<const int32_t> rank = {}, std::span<const int64_t> kept = {});

// y[t] = sum_j weight[t, j] * ys[slot_row[t*k+j]], a dropped slot adding nothing.
// ys: [n, d], weight: [T, k] -> y: [T, d] (=)
template <class T>
void combine_rows(ConstMatrixView<T> ys, const DispatchPlan& plan, ConstMatrixView<T> weight,
                  MatrixView<T> y);

// Backward of combine_rows. dy: [T, d] -> dys: [n, d] (=) with dys[r] = weight[s] * dy[t];
// dweight: [T, k] (=) with dweight[t, j] = <dy[t], ys[row]>, 0 for a dropped slot.
template <class T>
void combine_rows_backward(ConstMatrixView<T> ys, const DispatchPlan& plan,
                           ConstMatrixView<T> weight, ConstMatrixView<T> dy, MatrixView<T> dys,
                           MatrixView<T> dweight);

}  // namespace sy
