// MPI calls, each checked; collectives are started non-blocking and waited on with a deadline.
#include "switchyard/dist/comm.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/core/exec_context.h"

namespace sy {

namespace {

double g_timeout_s = 300;

std::string mpi_message(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(text, size_t(len));
}

int as_count(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX)
    throw DistError(fmt::format("{}: {} elements, expected 0..{} (MPI's int count)", what, n,
                                INT_MAX));
  return int(n);
}

// One row of row_bytes as an MPI type, so that counts stay in rows.
class RowType {
 public:
  explicit RowType(size_t row_bytes) {
    const int rc = MPI_Type_contiguous(as_count(int64_t(row_bytes), "row bytes"), MPI_BYTE, &type_);
    if (rc == MPI_SUCCESS) MPI_Type_commit(&type_);
    if (rc != MPI_SUCCESS) throw DistError("MPI_Type_contiguous: " + mpi_message(rc));
  }
  ~RowType() { MPI_Type_free(&type_); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// counts -> (counts as int, displacements).
void counts_displs(std::span<const int64_t> rows, std::vector<int>& counts, std::vector<int>& displs,
                   const char* what) {
  counts.resize(rows.size());
  displs.resize(rows.size());
  int64_t at = 0;
  for (size_t q = 0; q < rows.size(); ++q) {
    counts[q] = as_count(rows[q], what);
    displs[q] = as_count(at, what);
    at += rows[q];
  }
}

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  // More ranks on this machine than cores they may run on: a rank waiting inside a blocking
  // collective must give its core to the ranks still computing, or each step lasts as long as
  // the scheduler lets the spinners spin. Measured on 2 cores, 4 ranks (bench/README.md):
  // 4.0x the training tokens/s with OpenMPI yielding; with a core per rank it changes nothing
  // measurable. An explicit setting by the user is kept.
  if (const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) {
    cpu_set_t mask;
    const int cores = sched_getaffinity(0, sizeof(mask), &mask) == 0 ? CPU_COUNT(&mask) : 0;
    // mpirun binds a rank to one core when ranks <= cores; then the machine's count decides.
    const int machine = int(std::thread::hardware_concurrency());
    if (std::atoi(local) > std::max(cores, machine))
      ::setenv("OMPI_MCA_mpi_yield_when_idle", "1", /*overwrite=*/0);
  }
  int provided = 0;
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (rc != MPI_SUCCESS) throw DistError("MPI_Init_thread: " + mpi_message(rc));
  // Errors come back as return codes, so that each call can say what failed.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Comm::Comm(std::shared_ptr<MPI_Comm> comm) : comm_(std::move(comm)) {
  check(MPI_Comm_rank(*comm_, &rank_), "MPI_Comm_rank");
  check(MPI_Comm_size(*comm_, &size_), "MPI_Comm_size");
}

Comm Comm::world() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw DistError("Comm::world: MPI is not initialised (no MpiSession)");
  return Comm(std::make_shared<MPI_Comm>(MPI_COMM_WORLD));
}

namespace {
// A communicator for MPI to fill in, freed with its last Comm (unless MPI has ended by then).
std::shared_ptr<MPI_Comm> new_comm() {
  return std::shared_ptr<MPI_Comm>(new MPI_Comm(MPI_COMM_NULL), [](MPI_Comm* c) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && *c != MPI_COMM_NULL) MPI_Comm_free(c);
    delete c;
  });
}
}  // namespace

Comm Comm::split(int color, int key) const {
  const std::shared_ptr<MPI_Comm> comm = new_comm();
  check(MPI_Comm_split(*comm_, color, key, comm.get()), "MPI_Comm_split");
  return Comm(comm);
}

namespace {
// The host this rank runs on, as its launcher knows it: under OpenMPI the daemon it was started
// by (one per host, also where hosts share a name, as network namespaces on one machine do),
// else MPI's processor name. (MPI_COMM_TYPE_SHARED is no help there: OpenMPI judges locality by
// host name, and ranks of different hosts with one name then disagree and hang.)
uint64_t host_id() {
  std::string id;
  if (const char* uri = std::getenv("OMPI_MCA_orte_local_daemon_uri")) {
    id = uri;
    id = "orte:" + id.substr(0, id.find(';'));  // "jobid.vpid" of the daemon
  } else {
    char name[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    if (MPI_Get_processor_name(name, &len) == MPI_SUCCESS) id.assign(name, size_t(len));
  }
  return std::hash<std::string>{}(id);
}
}  // namespace

bool Comm::spans_hosts() const {
  const uint64_t mine = host_id();
  std::vector<uint64_t> all(static_cast<size_t>(size_));
  allgather(reinterpret_cast<const std::byte*>(&mine), sizeof(mine),
            reinterpret_cast<std::byte*>(all.data()));
  return std::any_of(all.begin(), all.end(), [&](uint64_t h) { return h != all[0]; });
}

void Comm::set_timeout(double seconds) { g_timeout_s = seconds; }
double Comm::timeout() { return g_timeout_s; }

void Comm::check(int rc, const char* what) const {
  if (rc != MPI_SUCCESS)
    throw DistError(fmt::format("rank {} of {}: {}: {}", rank_, size_, what, mpi_message(rc)));
}

// A collective in progress, watched: blocking MPI calls progress fastest (non-blocking ones
// only advance inside MPI calls), so the deadline is kept by a watchdog thread that ends this
// process when a collective overstays; mpirun then ends the others.
class Comm::Watch {
 public:
  Watch(const char* what);
  ~Watch();
};

namespace {

std::mutex g_watch_mutex;
const char* g_watch_what = nullptr;  // the collective in progress, or none
double g_watch_since = 0;

void watchdog() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::lock_guard lock(g_watch_mutex);
    if (g_watch_what == nullptr || g_timeout_s <= 0) continue;
    const double waited = wall_seconds() - g_watch_since;
    if (waited <= g_timeout_s) continue;
    int world_rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    std::fprintf(stderr,
                 "switchyard: rank %d: %s did not complete within %.0f s (--comm-timeout): a peer "
                 "has died or stopped answering; stopping (the last checkpoint written is "
                 "intact)\n",
                 world_rank, g_watch_what, g_timeout_s);
    std::fflush(stderr);
    std::_Exit(124);
  }
}

}  // namespace

Comm::Watch::Watch(const char* what) {
  static std::once_flag started;
  std::call_once(started, [] { std::thread(watchdog).detach(); });
  std::lock_guard lock(g_watch_mutex);
  g_watch_what = what;
  g_watch_since = wall_seconds();
}

Comm::Watch::~Watch() {
  std::lock_guard lock(g_watch_mutex);
  g_watch_what = nullptr;
}

void Comm::barrier() const {
  // Waits politely: ranks meet here around work of very different lengths (one rank may train
  // alone while the others wait), and a spinning wait would take a core from it.
  const Watch watch("barrier");
  MPI_Request req;
  check(MPI_Ibarrier(*comm_, &req), "MPI_Ibarrier");
  for (int done = 0;;) {
    check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void Comm::alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const {
  if (send.size() != recv.size() || send.size() % size_t(size_) != 0)
    throw DistError(fmt::format("alltoall: send {} and recv {} values: expected equal, a multiple "
                                "of {} ranks",
                                send.size(), recv.size(), size_));
  const int m = as_count(int64_t(send.size()) / size_, "alltoall");
  const Watch watch("all-to-all of counts");
  check(MPI_Alltoall(send.data(), m, MPI_INT64_T, recv.data(), m, MPI_INT64_T, *comm_),
        "MPI_Alltoall");
}

void Comm::alltoallv(const std::byte* send, std::span<const int64_t> send_rows, std::byte* recv,
                     std::span<const int64_t> recv_rows, size_t row_bytes) const {
  if (send_rows.size() != size_t(size_) || recv_rows.size() != size_t(size_))
    throw DistError(fmt::format("alltoallv: {} send and {} recv counts, expected {} (ranks)",
                                send_rows.size(), recv_rows.size(), size_));
  std::vector<int> sc, sd, rc, rd;
  counts_displs(send_rows, sc, sd, "alltoallv send rows");
  counts_displs(recv_rows, rc, rd, "alltoallv recv rows");
  const RowType row(row_bytes);
  const Watch watch("all-to-all of rows");
  check(MPI_Alltoallv(send, sc.data(), sd.data(), row.get(), recv, rc.data(), rd.data(), row.get(),
                      *comm_),
        "MPI_Alltoallv");
}

// Requests of one overlapped exchange. Waits block inside MPI (its fastest progress), under
// the same deadline as the collectives.
class Comm::Transfers final : public RowTransfers {
 public:
  Transfers(const Comm& comm, size_t row_bytes) : comm_(comm), row_(row_bytes) {}
  ~Transfers() override {
    // Only an exception leaves requests behind: their buffers are about to be freed, so they
    // are completed first (or the deadline ends the process).
    try {
      wait_all();
    } catch (const DistError&) {
    }
  }
  Transfers(const Transfers&) = delete;
  Transfers& operator=(const Transfers&) = delete;

  int recv(int peer, std::byte* rows, int64_t n_rows, int tag) override {
    recvs_.push_back(MPI_REQUEST_NULL);
    comm_.check(MPI_Irecv(rows, as_count(n_rows, "recv rows"), row_.get(), peer, tag, *comm_.comm_,
                          &recvs_.back()),
                "MPI_Irecv");
    return int(recvs_.size()) - 1;
  }
  void send(int peer, const std::byte* rows, int64_t n_rows, int tag) override {
    sends_.push_back(MPI_REQUEST_NULL);
    comm_.check(MPI_Isend(rows, as_count(n_rows, "send rows"), row_.get(), peer, tag, *comm_.comm_,
                          &sends_.back()),
                "MPI_Isend");
  }
  int wait_recv() override {
    if (!done_.empty()) {
      const int id = done_.back();
      done_.pop_back();
      return id;
    }
    int id = MPI_UNDEFINED;
    const Watch watch("exchange of rows (overlapped)");
    comm_.check(MPI_Waitany(int(recvs_.size()), recvs_.data(), &id, MPI_STATUS_IGNORE),
                "MPI_Waitany");
    return id == MPI_UNDEFINED ? -1 : id;
  }
  void progress() override {
    // Completed recvs are kept for wait_recv(); MPI nulls their requests.
    int n = 0;
    ids_.resize(recvs_.size());
    if (!recvs_.empty())
      comm_.check(
          MPI_Testsome(int(recvs_.size()), recvs_.data(), &n, ids_.data(), MPI_STATUSES_IGNORE),
          "MPI_Testsome");
    for (int i = 0; i < n; ++i)  // n is MPI_UNDEFINED (< 0) when none was pending
      done_.push_back(ids_[size_t(i)]);
    if (!sends_.empty()) {
      int all = 0;
      comm_.check(MPI_Testall(int(sends_.size()), sends_.data(), &all, MPI_STATUSES_IGNORE),
                  "MPI_Testall");
    }
  }
  void wait_all() override {
    const Watch watch("exchange of rows (overlapped)");
    comm_.check(MPI_Waitall(int(recvs_.size()), recvs_.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
    comm_.check(MPI_Waitall(int(sends_.size()), sends_.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  }

 private:
  const Comm& comm_;
  RowType row_;
  std::vector<MPI_Request> recvs_, sends_;  // a completed one is MPI_REQUEST_NULL
  std::vector<int> ids_, done_;
};

std::unique_ptr<RowTransfers> Comm::transfers(size_t row_bytes) const {
  return std::make_unique<Transfers>(*this, row_bytes);
}

namespace {
template <class T>
MPI_Datatype mpi_type();
template <>
MPI_Datatype mpi_type<double>() {
  return MPI_DOUBLE;
}
template <>
MPI_Datatype mpi_type<float>() {
  return MPI_FLOAT;
}
template <>
MPI_Datatype mpi_type<int64_t>() {
  return MPI_INT64_T;
}
}  // namespace

#define SY_ALLREDUCE_SUM(T)                                                               \
  void Comm::allreduce_sum(std::span<T> v) const {                                        \
    const Watch watch("all-reduce");                                                      \
    check(MPI_Allreduce(MPI_IN_PLACE, v.data(), as_count(int64_t(v.size()), "allreduce"), \
                        mpi_type<T>(), MPI_SUM, *comm_),                                  \
          "MPI_Allreduce");                                                               \
  }
SY_ALLREDUCE_SUM(double)
SY_ALLREDUCE_SUM(float)
SY_ALLREDUCE_SUM(int64_t)
#undef SY_ALLREDUCE_SUM

void Comm::allgather(const std::byte* send, size_t bytes, std::byte* recv) const {
  const int n = as_count(int64_t(bytes), "allgather bytes");
  const Watch watch("all-gather");
  check(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, *comm_), "MPI_Allgather");
}

void Comm::broadcast(std::byte* data, size_t bytes, int root) const {
  const Watch watch("broadcast");
  check(MPI_Bcast(data, as_count(int64_t(bytes), "broadcast bytes"), MPI_BYTE, root, *comm_),
        "MPI_Bcast");
}

MpiParallelGroup::MpiParallelGroup(const Comm& world, int ep_size)
    : world_(world), ep_(world), dp_(world) {
  if (ep_size < 1 || world.size() % ep_size != 0)
    throw ConfigError(
        fmt::format("--expert-parallel {}: expected a divisor of the {} ranks "
                    "(mpirun -np)",
                    ep_size, world.size()));
  ep_ = world.split(world.rank() / ep_size, world.rank());
  dp_ = world.split(world.rank() % ep_size, world.rank());
  ep_spans_hosts_ = ep_.spans_hosts();
}

void MpiParallelGroup::ep_alltoall(std::span<const int64_t> send, std::span<int64_t> recv) const {
  ep_.alltoall(send, recv);
}
void MpiParallelGroup::ep_alltoallv(const std::byte* send, std::span<const int64_t> send_rows,
                                    std::byte* recv, std::span<const int64_t> recv_rows,
                                    size_t row_bytes) const {
  ep_.alltoallv(send, send_rows, recv, recv_rows, row_bytes);
}
std::unique_ptr<RowTransfers> MpiParallelGroup::ep_transfers(size_t row_bytes) const {
  return ep_.transfers(row_bytes);
}
void MpiParallelGroup::ep_allreduce_sum(std::span<int64_t> v) const { ep_.allreduce_sum(v); }
void MpiParallelGroup::ep_allgather(const std::byte* send, size_t bytes, std::byte* recv) const {
  ep_.allgather(send, bytes, recv);
}
void MpiParallelGroup::dp_allreduce_sum(std::span<float> v) const { dp_.allreduce_sum(v); }
void MpiParallelGroup::world_allreduce_sum(std::span<double> v) const { world_.allreduce_sum(v); }
void MpiParallelGroup::world_allreduce_sum(std::span<float> v) const { world_.allreduce_sum(v); }

}  // namespace sy
