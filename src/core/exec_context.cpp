// Thread-count scoping over OpenMP. OpenBLAS's OpenMP build reads omp_get_max_threads() at
// each call, so one setting covers both our kernels and BLAS.
#include "switchyard/core/exec_context.h"

#include <omp.h>

namespace sy {

ThreadScope::ThreadScope(int n_threads) : previous_(omp_get_max_threads()) {
  if (n_threads > 0) omp_set_num_threads(n_threads);
}

ThreadScope::~ThreadScope() { omp_set_num_threads(previous_); }

int max_threads() { return omp_get_max_threads(); }

}  // namespace sy
