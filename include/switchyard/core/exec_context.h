// How a layer runs: thread count, random stream, kernel backend and whether to record phase
// timings.
// Nothing is global; a layer reads everything it needs to run from here.
#pragma once

#include <chrono>
#include <cstdint>

namespace sy {

class ParallelGroup;
struct Backend;

struct ExecContext {
  int n_threads = 0;     // 0: OpenMP's default (OMP_NUM_THREADS or all cores)
  uint64_t seed = 0;     // for stochastic parts (noise, jitter)
  bool training = true;  // selects the train or eval capacity factor
  bool profile = false;  // record per-phase wall times into the layer's cache
  // Expert and data parallelism over several processes (core/parallel.h); nullptr: this
  // process holds every expert and the whole batch.
  const ParallelGroup* parallel = nullptr;
  // With `parallel`: the MoE layers' rows (activations forward, their gradients backward) cross
  // ranks as bf16, half the bytes, rounded to nearest even on the way out and widened on
  // arrival (every row, the ones a rank keeps too, so the rounding does not depend on where an
  // expert lives). Off: f32, which makes expert parallelism equal one process.
  bool exchange_bf16 = false;
  // With `parallel`: the MoE layers' exchanges overlap their experts' compute. Rows travel
  // point to point, and each owner computes a source's rows as soon as they have arrived (its
  // own first) and sends that source its results at once, while the other blocks are still on
  // the wire. The experts then run per (source, expert) piece rather than over all sources'
  // rows at once: smaller GEMMs, the same values to rounding.
  bool exchange_overlap = false;
  // The GEMM kernels (kernels/backend.h); nullptr: the f32 backend picked for this CPU.
  const Backend* backend = nullptr;
};

// Sets the OpenMP team size (and with it OpenBLAS's, built on OpenMP) for the scope's lifetime
// and restores the previous one after.
class ThreadScope {
 public:
  explicit ThreadScope(int n_threads);
  ~ThreadScope();
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_ = 0;
};

int max_threads();

// Wall clock in seconds since an arbitrary origin, for benchmarks and phase timings.
inline double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs fn and adds its wall time to *slot.
template <class Fn>
void add_wall_seconds(double* slot, Fn&& fn) {
  const double t0 = wall_seconds();
  fn();
  *slot += wall_seconds() - t0;
}

}  // namespace sy
