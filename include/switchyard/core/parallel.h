// The processes a model is spread over, as a layer sees them. dist/ implements it on MPI; a
// single process passes none (ExecContext::parallel == nullptr).
//
// Ranks form a grid of ep_size() expert-parallel ranks times data-parallel replicas. Within an
// expert group the E experts are split into contiguous blocks of E / ep_size(), and tokens
// travel to their experts' owners with all-to-alls. Every rank holds its own tokens, so
// statistics of the whole batch (the balance loss's) are sums over all world_size() ranks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace sy {

class ParallelGroup {
 public:
  virtual ~ParallelGroup() = default;
  virtual int ep_rank() const = 0;
  virtual int ep_size() const = 0;
  // Expert group: send [ep_size * m] -> recv [ep_size * m]; block q goes to ep rank q, block q of
  // recv came from ep rank q.
  virtual void ep_alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const = 0;
  // Expert group: rows of row_bytes each; send_rows[q] consecutive rows go to ep rank q and
  // recv_rows[q] arrive from it, in rank order.
  virtual void ep_alltoallv(const std::byte* send, std::span<const int64_t> send_rows,
                            std::byte* recv, std::span<const int64_t> recv_rows,
                            size_t row_bytes) const = 0;
  virtual void ep_allreduce_sum(std::span<int64_t> v) const = 0;
  // Expert group: every rank's bytes (the same count each), in rank order, to every rank.
  virtual void ep_allgather(const std::byte* send, size_t bytes, std::byte* recv) const = 0;

  // Data-parallel replicas: the ranks holding the same experts (ep rank equal), dp_size() of
  // them; world_size() = ep_size() * dp_size().
  virtual int dp_size() const = 0;
  virtual void dp_allreduce_sum(std::span<float> v) const = 0;

  virtual int world_rank() const = 0;
  virtual int world_size() const = 0;
  virtual void world_allreduce_sum(std::span<double> v) const = 0;
  virtual void world_allreduce_sum(std::span<float> v) const = 0;
};

}  // namespace sy
