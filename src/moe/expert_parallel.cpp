// Expert parallelism inside the MoE layer: the experts of one layer split over the ranks of an
// expert group, tokens sent to their experts' owners with all-to-alls and brought back.
//
// Forward on rank r of P (El = E / P local experts):
//   1. counts: the rows this rank sends each expert, exchanged so that each owner knows what
//      arrives from whom. With a capacity C, counts go per (expert, choice); the owner grants
//      C rows choice by choice and source rank by source rank, which is the single-process
//      choice-major order over all ranks' tokens taken rank after rank, and sends back what it
//      granted. Within one source's rows for an expert (choice-major) the granted ones are a
//      prefix, so the source's plan needs only a row count per expert.
//   2. rows: all-to-allv of the dispatched rows (already grouped by expert, hence by owner);
//      they arrive grouped by source, are regrouped by local expert (xe), run through the
//      grouped GEMMs, regrouped by source and sent back the same way.
// Backward sends the rows' output gradients to the owners, runs the experts' backward there
// (their weight gradients take every source's rows) and returns the input gradients.
#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/parallel.h"
#include "switchyard/kernels/cpu.h"
#include "switchyard/moe/moe_layer.h"

namespace sy {

namespace {

int64_t sum(std::span<const int64_t> v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

// With profiling (wait set): the seconds until the group's slowest rank arrives here.
void wait_for_group(const ParallelGroup& g, double* wait) {
  if (wait == nullptr) return;
  int64_t one = 1;
  add_wall_seconds(wait, [&] { g.ep_allreduce_sum({&one, 1}); });
}

// rows [n, d] -> out [m, d] through the group, send_rows / recv_rows per rank; as bf16 on the
// wire when asked (f32 rows only: the float64 path is the tests' reference and stays exact).
template <class T>
void exchange_rows(const ParallelGroup& g, const Tensor& rows, std::span<const int64_t> send_rows,
                   Tensor& out, std::span<const int64_t> recv_rows, int64_t d, bool bf16_wire,
                   double* wait) {
  out.resize({sum(recv_rows), d}, dtype_of<T>());
  wait_for_group(g, wait);
  if constexpr (std::is_same_v<T, float>) {
    if (bf16_wire) {
      const int64_t n = sum(send_rows) * d, m = out.numel();
      std::vector<bf16> out_wire(static_cast<size_t>(n)), in_wire(static_cast<size_t>(m));
      const float* x = rows.data<float>();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) out_wire[size_t(i)] = to_bf16(x[i]);
      g.ep_alltoallv(reinterpret_cast<const std::byte*>(out_wire.data()), send_rows,
                     reinterpret_cast<std::byte*>(in_wire.data()), recv_rows,
                     size_t(d) * sizeof(bf16));
      float* y = out.data<float>();
#pragma omp parallel for schedule(static) if (m > (1 << 16))
      for (int64_t i = 0; i < m; ++i) y[i] = to_float(in_wire[size_t(i)]);
      return;
    }
  }
  g.ep_alltoallv(reinterpret_cast<const std::byte*>(rows.data<T>()), send_rows,
                 reinterpret_cast<std::byte*>(out.data<T>()), recv_rows, size_t(d) * sizeof(T));
}

// Row offsets of each rank's block: [P+1].
std::vector<int64_t> block_starts(std::span<const int64_t> rows) {
  std::vector<int64_t> at(rows.size() + 1, 0);
  for (size_t q = 0; q < rows.size(); ++q) at[q + 1] = at[q] + rows[q];
  return at;
}

// The overlapped exchange (ExecContext::exchange_overlap), one direction and back:
//   out [sum send_rows, d], block q for ep rank q  ->  in [sum recv_rows, d], block s from s;
//   compute(s, progress) turns block s of `in` into block s of `res`;
//   res block s goes back to s  ->  back [sum send_rows, d], in the order of `out`.
// Every transfer is posted at once; this rank's own block is computed first (it moves by a
// copy), then each source's block as it arrives, its results sent back at once, so the
// remaining blocks move while it computes. compute calls progress() between its pieces.
// With bf16_wire (f32 only) every row is rounded on the way out and widened on arrival, this
// rank's own block too, as exchange_rows does. Returns the seconds spent in compute.
template <class T, class Compute>
double overlapped_exchange(const ParallelGroup& g, const Tensor& out,
                           std::span<const int64_t> send_rows, Tensor& in, Tensor& res,
                           std::span<const int64_t> recv_rows, Tensor& back, int64_t d,
                           bool bf16_wire, Compute&& compute) {
  const int P = g.ep_size(), r = g.ep_rank();
  const std::vector<int64_t> so = block_starts(send_rows), ro = block_starts(recv_rows);
  in.resize({ro[P], d}, dtype_of<T>());
  res.resize({ro[P], d}, dtype_of<T>());
  back.resize({so[P], d}, dtype_of<T>());
  constexpr bool kCanNarrow = std::is_same_v<T, float>;
  const bool narrow = kCanNarrow && bf16_wire;
  const size_t row_bytes = size_t(d) * (narrow ? sizeof(bf16) : sizeof(T));
  // The bytes on the wire: the tensors themselves, or their bf16 copies.
  std::vector<bf16> out_w, in_w, res_w, back_w;
  auto wire = [&](const Tensor& t, std::vector<bf16>& w) {
    if (!narrow) return const_cast<std::byte*>(t.bytes());
    w.resize(size_t(t.numel()));
    return reinterpret_cast<std::byte*>(w.data());
  };
  std::byte* out_b = wire(out, out_w);
  std::byte* in_b = wire(in, in_w);
  std::byte* res_b = wire(res, res_w);
  std::byte* back_b = wire(back, back_w);
  // Rows [begin, end) of an f32 tensor to or from its bf16 copy.
  auto to_wire = [&](const Tensor& t, std::vector<bf16>& w, int64_t begin, int64_t end) {
    if constexpr (kCanNarrow) {
      const float* x = t.data<float>();
      for (int64_t i = begin * d; i < end * d; ++i) w[size_t(i)] = to_bf16(x[i]);
    }
  };
  auto from_wire = [&](const std::vector<bf16>& w, Tensor& t, int64_t begin, int64_t end) {
    if constexpr (kCanNarrow) {
      float* y = t.data<float>();
      for (int64_t i = begin * d; i < end * d; ++i) y[i] = to_float(w[size_t(i)]);
    }
  };
  if (narrow) to_wire(out, out_w, 0, so[P]);

  enum Tag { kOut = 1, kBack = 2 };
  const std::unique_ptr<RowTransfers> tx = g.ep_transfers(row_bytes);
  std::vector<int> source_of;  // recv id -> the source of an `in` block, or -1 (a `back` one)
  for (int q = 0; q < P; ++q) {
    if (q == r) continue;
    if (recv_rows[q] > 0) {
      tx->recv(q, in_b + size_t(ro[q]) * row_bytes, recv_rows[q], kOut);
      source_of.push_back(q);
    }
    if (send_rows[q] > 0) {
      tx->recv(q, back_b + size_t(so[q]) * row_bytes, send_rows[q], kBack);
      source_of.push_back(-1);
    }
  }
  for (int q = 0; q < P; ++q)
    if (q != r && send_rows[q] > 0)
      tx->send(q, out_b + size_t(so[q]) * row_bytes, send_rows[q], kOut);

  double compute_s = 0;
  auto run_block = [&](int s) {
    if (narrow) from_wire(in_w, in, ro[s], ro[s + 1]);
    add_wall_seconds(&compute_s, [&] { compute(s, [&] { tx->progress(); }); });
    if (narrow) to_wire(res, res_w, ro[s], ro[s + 1]);
    if (s != r) tx->send(s, res_b + size_t(ro[s]) * row_bytes, recv_rows[s], kBack);
  };
  std::memcpy(in_b + size_t(ro[r]) * row_bytes, out_b + size_t(so[r]) * row_bytes,
              size_t(send_rows[r]) * row_bytes);
  run_block(r);
  std::memcpy(back_b + size_t(so[r]) * row_bytes, res_b + size_t(ro[r]) * row_bytes,
              size_t(send_rows[r]) * row_bytes);
  for (int id; (id = tx->wait_recv()) >= 0;)
    if (source_of[size_t(id)] >= 0) run_block(source_of[size_t(id)]);
  tx->wait_all();
  if (narrow) from_wire(back_w, back, 0, so[P]);
  return compute_s;
}

// Block s of the overlapped exchange, piece by piece: fn(el, rows) for each local expert el
// with rows from source s, rows its range in the source-major buffers.
template <class Fn>
void for_each_piece(const ExpertParallelCache& ep, int s, int64_t El, Fn&& fn) {
  int64_t at = block_starts(ep.recv_rows)[size_t(s)];
  for (int64_t el = 0; el < El; ++el) {
    const int64_t n = ep.recv_counts[size_t(s * El + el)];
    if (n > 0) fn(el, std::pair{at, at + n});
    at += n;
  }
}

}  // namespace

void MoeLayer::plan_parallel(MoeCache& c, int64_t n_tok, const ExecContext& ctx) const {
  const ParallelGroup& g = *ctx.parallel;
  const int64_t P = g.ep_size(), r = g.ep_rank(), E = cfg_.n_experts, El = E / P;
  const int64_t k = cfg_.slots_per_token();
  ExpertParallelCache& ep = c.ep;
  double& seconds = c.times.exchange;
  const std::vector<int32_t>& expert = c.router.expert;

  int64_t capacity = -1;
  if (!cfg_.dropless) {
    int64_t n_all = n_tok;
    add_wall_seconds(&seconds, [&] { g.ep_allreduce_sum({&n_all, 1}); });
    capacity = cfg_.capacity(n_all, ctx.training);
  }
  ep.recv_counts.assign(size_t(E), 0);  // [P][El]: rows from source s for local expert el
  if (capacity < 0) {
    ep.counts.assign(size_t(E), 0);
    for (int32_t e : expert) ++ep.counts[e];
    add_wall_seconds(&seconds, [&] { g.ep_alltoall(ep.counts, ep.recv_counts); });
    build_dispatch_plan(expert, n_tok, k, E, -1, c.plan);
  } else {
    // [E][k] demand per (expert, choice) out; [P][El][k] in.
    ep.counts.assign(size_t(E * k), 0);
    for (size_t s = 0; s < expert.size(); ++s) ++ep.counts[size_t(expert[s] * k) + s % size_t(k)];
    std::vector<int64_t> demand(size_t(E * k));
    add_wall_seconds(&seconds, [&] { g.ep_alltoall(ep.counts, demand); });
    for (int64_t el = 0; el < El; ++el) {
      int64_t left = capacity;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t s = 0; s < P; ++s) {
          const int64_t take = std::min(left, demand[size_t((s * El + el) * k + j)]);
          ep.recv_counts[size_t(s * El + el)] += take;
          left -= take;
        }
    }
    ep.kept.assign(size_t(E), 0);
    add_wall_seconds(&seconds, [&] { g.ep_alltoall(ep.recv_counts, ep.kept); });
    build_dispatch_plan(expert, n_tok, k, E, capacity, c.plan, {}, ep.kept);
  }

  ep.send_rows.assign(size_t(P), 0);
  ep.recv_rows.assign(size_t(P), 0);
  for (int64_t q = 0; q < P; ++q)
    for (int64_t el = 0; el < El; ++el) {
      ep.send_rows[q] += c.plan.rows_of(q * El + el);
      ep.recv_rows[q] += ep.recv_counts[size_t(q * El + el)];
    }
  // Arrived rows are [source][local expert]; xe wants [local expert][source].
  std::vector<int64_t> start(static_cast<size_t>(E));  // start[s * El + el]: its first row
  for (int64_t b = 0, at = 0; b < E; ++b) start[b] = at, at += ep.recv_counts[b];
  ep.offsets.assign(size_t(El + 1), 0);
  ep.by_expert.clear();
  for (int64_t el = 0; el < El; ++el) {
    for (int64_t s = 0; s < P; ++s)
      for (int64_t i = 0; i < ep.recv_counts[size_t(s * El + el)]; ++i)
        ep.by_expert.push_back(int32_t(start[size_t(s * El + el)] + i));
    ep.offsets[el + 1] = int32_t(ep.by_expert.size());
  }
  ep.by_source.resize(ep.by_expert.size());
  for (size_t i = 0; i < ep.by_expert.size(); ++i)
    ep.by_source[size_t(ep.by_expert[i])] = int32_t(i);
  ep.rows_computed = int64_t(ep.by_expert.size());
  ep.values_sent = 0;
  for (int64_t q = 0; q < P; ++q)
    if (q != r) ep.values_sent += (ep.send_rows[q] + ep.recv_rows[q]) * cfg_.d_model;
}

template <class T, class W>
void MoeLayer::experts_forward_parallel(const MoeParams& p, MoeCache& c, const ExecContext& ctx,
                                        const Backend& be) const {
  const ParallelGroup& g = *ctx.parallel;
  const bool wire = ctx.exchange_bf16;
  double* wait = ctx.profile ? &c.times.exchange_wait : nullptr;
  const int64_t d = cfg_.d_model;
  ExpertParallelCache& ep = c.ep;
  const int64_t m = ep.rows_computed;
  ep.overlapped = ctx.exchange_overlap;
  if (ep.overlapped) {
    const int64_t El = cfg_.n_experts / g.ep_size();
    ep.pieces.resize(size_t(cfg_.n_experts));  // [P][El]
    wait_for_group(g, wait);
    const double t0 = wall_seconds();
    const double compute_s = overlapped_exchange<T>(
        g, c.xs, ep.send_rows, ep.xe, ep.ye, ep.recv_rows, c.ys, d, wire,
        [&](int s, auto&& progress) {
          for_each_piece(ep, s, El, [&](int64_t el, std::pair<int64_t, int64_t> rows) {
            const auto [begin, end] = rows;
            const std::array<int32_t, 2> offsets{0, int32_t(end - begin)};
            experts_forward(
                be, p.w1.stacked<W>().one(el), p.w3.stacked<W>().one(el), p.w2.stacked<W>().one(el),
                ConstMatrixView<T>(ep.xe.matrix<T>().slice_rows(begin, end)), offsets,
                ep.ye.matrix<T>().slice_rows(begin, end), ep.pieces[size_t(s * El + el)]);
            progress();
          });
        });
    c.times.exchange += wall_seconds() - t0 - compute_s;
    return;
  }
  add_wall_seconds(&c.times.exchange, [&] {
    exchange_rows<T>(g, c.xs, ep.send_rows, ep.buf, ep.recv_rows, d, wire, wait);
  });
  ep.xe.resize({m, d}, dtype_of<T>());
  ep.ye.resize({m, d}, dtype_of<T>());
  cpu::gather_rows<T>(ep.buf.matrix<T>(), ep.by_expert, ep.xe.matrix<T>());
  experts_forward(be, p.w1.stacked<W>(), p.w3.stacked<W>(), p.w2.stacked<W>(),
                  ConstMatrixView<T>(ep.xe.matrix<T>()), ep.offsets, ep.ye.matrix<T>(), c.experts);
  cpu::gather_rows<T>(ep.ye.matrix<T>(), ep.by_source, ep.buf.matrix<T>());
  add_wall_seconds(&c.times.exchange, [&] {
    exchange_rows<T>(g, ep.buf, ep.recv_rows, c.ys, ep.send_rows, d, wire, wait);
  });
}

template <class T>
void MoeLayer::experts_backward_parallel(const MoeParams& p, MoeCache& c, MoeParams& grads,
                                         const ExecContext& ctx, const Backend& be) const {
  const ParallelGroup& g = *ctx.parallel;
  const bool wire = ctx.exchange_bf16;
  double* wait = ctx.profile ? &c.times.exchange_wait : nullptr;
  const int64_t d = cfg_.d_model;
  ExpertParallelCache& ep = c.ep;
  const int64_t m = ep.rows_computed;
  double& seconds = c.times.backward_exchange;
  if (ep.overlapped) {
    const int64_t El = cfg_.n_experts / g.ep_size();
    wait_for_group(g, wait);
    const double t0 = wall_seconds();
    // buf: the rows' output gradients as they arrive; dxe: their input gradients.
    const double compute_s = overlapped_exchange<T>(
        g, c.dys, ep.send_rows, ep.buf, ep.dxe, ep.recv_rows, c.dxs, d, wire,
        [&](int s, auto&& progress) {
          for_each_piece(ep, s, El, [&](int64_t el, std::pair<int64_t, int64_t> rows) {
            const auto [begin, end] = rows;
            const std::array<int32_t, 2> offsets{0, int32_t(end - begin)};
            experts_backward<T>(
                be, p.w1.stacked<T>().one(el), p.w3.stacked<T>().one(el), p.w2.stacked<T>().one(el),
                ConstMatrixView<T>(ep.xe.matrix<T>().slice_rows(begin, end)), offsets,
                ConstMatrixView<T>(ep.buf.matrix<T>().slice_rows(begin, end)),
                ep.pieces[size_t(s * El + el)], grads.w1.stacked<T>().one(el),
                grads.w3.stacked<T>().one(el), grads.w2.stacked<T>().one(el),
                ep.dxe.matrix<T>().slice_rows(begin, end));
            progress();
          });
        });
    seconds += wall_seconds() - t0 - compute_s;
    return;
  }
  add_wall_seconds(&seconds, [&] {
    exchange_rows<T>(g, c.dys, ep.send_rows, ep.buf, ep.recv_rows, d, wire, wait);
  });
  cpu::gather_rows<T>(ep.buf.matrix<T>(), ep.by_expert, ep.ye.matrix<T>());  // ye: dye now
  ep.dxe.resize({m, d}, dtype_of<T>());
  experts_backward<T>(be, p.w1.stacked<T>(), p.w3.stacked<T>(), p.w2.stacked<T>(),
                      ep.xe.matrix<T>(), ep.offsets, ep.ye.matrix<T>(), c.experts,
                      grads.w1.stacked<T>(), grads.w3.stacked<T>(), grads.w2.stacked<T>(),
                      ep.dxe.matrix<T>());
  cpu::gather_rows<T>(ep.dxe.matrix<T>(), ep.by_source, ep.buf.matrix<T>());
  add_wall_seconds(&seconds, [&] {
    exchange_rows<T>(g, ep.buf, ep.recv_rows, c.dxs, ep.send_rows, d, wire, wait);
  });
}

template void MoeLayer::experts_forward_parallel<float, float>(const MoeParams&, MoeCache&,
                                                               const ExecContext&,
                                                               const Backend&) const;
template void MoeLayer::experts_forward_parallel<double, double>(const MoeParams&, MoeCache&,
                                                                 const ExecContext&,
                                                                 const Backend&) const;
template void MoeLayer::experts_forward_parallel<float, bf16>(const MoeParams&, MoeCache&,
                                                              const ExecContext&,
                                                              const Backend&) const;
template void MoeLayer::experts_backward_parallel<float>(const MoeParams&, MoeCache&, MoeParams&,
                                                         const ExecContext&, const Backend&) const;
template void MoeLayer::experts_backward_parallel<double>(const MoeParams&, MoeCache&, MoeParams&,
                                                          const ExecContext&, const Backend&) const;

}  // namespace sy
