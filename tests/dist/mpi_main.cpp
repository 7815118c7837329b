// GoogleTest main for the tests run under mpirun: MPI is initialised around the whole run, and
// only rank 0 prints results (every rank runs every test; a failure on any rank fails the run).
#include <gtest/gtest.h>

#include "switchyard/dist/comm.h"

int main(int argc, char** argv) {
  sy::MpiSession mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (sy::Comm::world().rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  // A test that fails on one rank while the others wait in a collective must not hang ctest.
  sy::Comm::set_timeout(120);
  const int failed = RUN_ALL_TESTS();
  // Every rank's verdict: a failure seen only by rank 2 still fails the run.
  double any[1] = {double(failed != 0)};
  sy::Comm::world().allreduce_sum(any);
  return any[0] > 0 ? 1 : 0;
}
