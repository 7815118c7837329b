// MPI for Switchyard: the session, a communicator whose every call is checked, and the grid of
// expert-parallel groups times data-parallel replicas that layers and the trainer run on.
//
//   MpiSession mpi(&argc, &argv);                    // MPI_Init_thread .. MPI_Finalize
//   Comm world = Comm::world();
//   MpiParallelGroup grid(world, /*ep_size=*/2);     // 4 ranks: 2 expert groups x 2 replicas
//   ExecContext ctx;  ctx.parallel = &grid;          // MoeLayer now runs its experts spread
//
// Errors: a failing MPI call throws DistError naming the call, the rank and MPI's message.
// A collective that does not complete within the timeout (a peer died or stopped answering)
// prints which one, on which rank, and ends the process with status 124; mpirun then ends the
// others (they are blocked in the same collective, where no exception could reach them).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "switchyard/core/parallel.h"

namespace sy {

class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);  // throws DistError
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

class Comm {
 public:
  static Comm world();
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ranks with the same color form a communicator, ordered by key.
  Comm split(int color, int key) const;
  // Whether this communicator's ranks run on more than one host (collective).
  bool spans_hosts() const;

  void barrier() const;
  // send [size * m] -> recv [size * m], block q to and from rank q.
  void alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const;
  // Rows of row_bytes: send_rows[q] consecutive rows to rank q, recv_rows[q] from it.
  void alltoallv(const std::byte* send, std::span<const int64_t> send_rows, std::byte* recv,
                 std::span<const int64_t> recv_rows, size_t row_bytes) const;
  // Point-to-point transfers of rows, in flight together (core/parallel.h).
  std::unique_ptr<RowTransfers> transfers(size_t row_bytes) const;
  void allreduce_sum(std::span<double> v) const;
  void allreduce_sum(std::span<float> v) const;
  void allreduce_sum(std::span<int64_t> v) const;
  // bytes from every rank (the same count each) into recv [size * bytes], rank order.
  void allgather(const std::byte* send, size_t bytes, std::byte* recv) const;
  void broadcast(std::byte* data, size_t bytes, int root) const;

  // Seconds a collective may take before the job is aborted (default 300; 0: wait forever).
  static void set_timeout(double seconds);
  static double timeout();

 private:
  class Watch;      // the deadline of one collective
  class Transfers;  // transfers() on this communicator
  explicit Comm(std::shared_ptr<MPI_Comm> comm);
  void check(int rc, const char* what) const;

  std::shared_ptr<MPI_Comm> comm_;
  int rank_ = 0, size_ = 1;
};

// The grid: world rank w is ep rank w % ep_size of expert group w / ep_size, and replica
// w / ep_size of the data-parallel group of ranks with that ep rank.
class MpiParallelGroup final : public ParallelGroup {
 public:
  // Throws ConfigError when ep_size does not divide the world size.
  MpiParallelGroup(const Comm& world, int ep_size);

  int ep_rank() const override { return ep_.rank(); }
  int ep_size() const override { return ep_.size(); }
  void ep_alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const override;
  void ep_alltoallv(const std::byte* send, std::span<const int64_t> send_rows, std::byte* recv,
                    std::span<const int64_t> recv_rows, size_t row_bytes) const override;
  std::unique_ptr<RowTransfers> ep_transfers(size_t row_bytes) const override;
  void ep_allreduce_sum(std::span<int64_t> v) const override;
  void ep_allgather(const std::byte* send, size_t bytes, std::byte* recv) const override;
  int dp_size() const override { return dp_.size(); }
  void dp_allreduce_sum(std::span<float> v) const override;
  bool ep_spans_hosts() const override { return ep_spans_hosts_; }
  int world_rank() const override { return world_.rank(); }
  int world_size() const override { return world_.size(); }
  void world_allreduce_sum(std::span<double> v) const override;
  void world_allreduce_sum(std::span<float> v) const override;

  const Comm& world() const { return world_; }

 private:
  Comm world_, ep_, dp_;
  bool ep_spans_hosts_ = false;
};

}  // namespace sy
