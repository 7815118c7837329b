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
#include <memory>
#include <span>

namespace sy {

// Point-to-point transfers of rows within an expert group, all in flight together, so that an
// exchange can overlap compute: post every transfer, take each received block as it completes,
// and call progress() between pieces of compute (MPI moves data only inside its own calls).
// A buffer posted stays unread (recv) or unchanged (send) until its completion is reported:
// a recv's by wait_recv(), every transfer's by wait_all().
class RowTransfers {
 public:
  virtual ~RowTransfers() = default;
  // n_rows consecutive rows from / to ep rank `peer`; tags pair the transfers between two
  // ranks. recv returns the transfer's id (0, 1, .. in posting order).
  virtual int recv(int peer, std::byte* rows, int64_t n_rows, int tag) = 0;
  virtual void send(int peer, const std::byte* rows, int64_t n_rows, int tag) = 0;
  // Blocks until a recv not reported before has completed and returns its id; -1 when every
  // recv posted has been reported.
  virtual int wait_recv() = 0;
  virtual void progress() = 0;
  virtual void wait_all() = 0;
};

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
  // Expert group: point-to-point transfers of rows of row_bytes each (RowTransfers above).
  virtual std::unique_ptr<RowTransfers> ep_transfers(size_t row_bytes) const = 0;
  virtual void ep_allreduce_sum(std::span<int64_t> v) const = 0;
  // Expert group: every rank's bytes (the same count each), in rank order, to every rank.
  virtual void ep_allgather(const std::byte* send, size_t bytes, std::byte* recv) const = 0;

  // Data-parallel replicas: the ranks holding the same experts (ep rank equal), dp_size() of
  // them; world_size() = ep_size() * dp_size().
  virtual int dp_size() const = 0;
  virtual void dp_allreduce_sum(std::span<float> v) const = 0;

  // Whether the expert group's ranks are on more than one host (node), where the exchange
  // crosses a network and overlapping it with compute pays (ExecContext::exchange_overlap).
  virtual bool ep_spans_hosts() const = 0;

  virtual int world_rank() const = 0;
  virtual int world_size() const = 0;
  virtual void world_allreduce_sum(std::span<double> v) const = 0;
  virtual void world_allreduce_sum(std::span<float> v) const = 0;
};

}  // namespace sy
