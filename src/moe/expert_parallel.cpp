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
#include <cstring>
#include <type_traits>
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

// rows [n, d] -> out [m, d] through the group, send_rows / recv_rows per rank; as bf16 on the
// wire when asked (f32 rows only: the float64 path is the tests' reference and stays exact).
template <class T>
void exchange_rows(const ParallelGroup& g, const Tensor& rows, std::span<const int64_t> send_rows,
                   Tensor& out, std::span<const int64_t> recv_rows, int64_t d, bool bf16_wire,
                   double* wait) {
  out.resize({sum(recv_rows), d}, dtype_of<T>());
  if (wait != nullptr) {
    int64_t one = 1;
    add_wall_seconds(wait, [&] { g.ep_allreduce_sum({&one, 1}); });
  }
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
  add_wall_seconds(&c.times.exchange,
                   [&] { exchange_rows<T>(g, c.xs, ep.send_rows, ep.buf, ep.recv_rows, d, wire,
                                          wait); });
  ep.xe.resize({m, d}, dtype_of<T>());
  ep.ye.resize({m, d}, dtype_of<T>());
  cpu::gather_rows<T>(ep.buf.matrix<T>(), ep.by_expert, ep.xe.matrix<T>());
  experts_forward(be, p.w1.stacked<W>(), p.w3.stacked<W>(), p.w2.stacked<W>(),
                  ConstMatrixView<T>(ep.xe.matrix<T>()), ep.offsets, ep.ye.matrix<T>(), c.experts);
  cpu::gather_rows<T>(ep.ye.matrix<T>(), ep.by_source, ep.buf.matrix<T>());
  add_wall_seconds(&c.times.exchange,
                   [&] { exchange_rows<T>(g, ep.buf, ep.recv_rows, c.ys, ep.send_rows, d, wire,
                                          wait); });
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
  add_wall_seconds(&seconds,
                   [&] { exchange_rows<T>(g, c.dys, ep.send_rows, ep.buf, ep.recv_rows, d, wire,
                                          wait); });
  cpu::gather_rows<T>(ep.buf.matrix<T>(), ep.by_expert, ep.ye.matrix<T>());  // ye: dye now
  ep.dxe.resize({m, d}, dtype_of<T>());
  experts_backward<T>(be, p.w1.stacked<T>(), p.w3.stacked<T>(), p.w2.stacked<T>(),
                      ep.xe.matrix<T>(), ep.offsets, ep.ye.matrix<T>(), c.experts,
                      grads.w1.stacked<T>(), grads.w3.stacked<T>(), grads.w2.stacked<T>(),
                      ep.dxe.matrix<T>());
  cpu::gather_rows<T>(ep.dxe.matrix<T>(), ep.by_source, ep.buf.matrix<T>());
  add_wall_seconds(&seconds,
                   [&] { exchange_rows<T>(g, ep.buf, ep.recv_rows, c.dxs, ep.send_rows, d, wire,
                                          wait); });
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
                                                         const ExecContext&,
                                                         const Backend&) const;
template void MoeLayer::experts_backward_parallel<double>(const MoeParams&, MoeCache&, MoeParams&,
                                                          const ExecContext&,
                                                          const Backend&) const;

}  // namespace sy
