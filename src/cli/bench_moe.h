// `switchyard bench moe`: the MoE layer's speed on the shapes, each figure beside a
// ceiling measured in the same run (dense sgemm of the same active FLOPs; memory copy
// bandwidth for decode). The shape table is shared with bench/moe_bench.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "switchyard/kernels/backend.h"

namespace sy::cli {

struct MoeShape {
  std::string name;
  int64_t n_tokens, d_model, d_ff, n_experts, top_k;
  bool decode;    // memory-bound: report weight bytes/s against copy bandwidth
  bool gpu_only;  // too large for a CPU run (Mixtral-like, many experts)
};

// A: T=4096 d=512 f=1024 E=8 k=2; B: T=4096 d=1024 f=512 E=64 k=8;
// C1, C16 (decode): T=1 and 16 with d=1024 f=3584 E=8 k=2; GPU only: M (Mixtral-like)
// T=16384 d=4096 f=14336 E=8 k=2 and X (many experts) T=16384 d=2048 f=1024 E=64 k=8.
const std::vector<MoeShape>& moe_bench_shapes();

struct BenchMoeOptions {
  std::vector<std::string> shapes;  // names from moe_bench_shapes(); empty: all
  int n_threads = 0;
  int iters = 0;                // 0: per shape, enough for ~1 s
  std::string device = "cpu";   // cpu or cuda
  std::string weights = "f32";  // expert weight dtype on CPU: f32 or bf16 (forward only)
  std::string precision = "auto";  // GEMM precision on CPU: f32, bf16 or auto
  double capacity_factor = 0;   // 0: dropless, so every shape computes exactly T*k rows
  std::string json_path;        // write results as JSON here ("-": stdout)
  uint64_t seed = 1;
};

int run_bench_moe(const BenchMoeOptions& opt);

// Dense GEMM rates (FLOP/s) of [M, K] x [K, N] measured now, with all threads, by each library
// here: the ceilings every benchmark figure is a ratio to. bf16 is oneDNN on inputs already in
// bf16 (0 where the CPU has no AVX512-BF16).
struct DenseCeilings {
  double openblas_f32 = 0, onednn_f32 = 0, onednn_bf16 = 0;
  std::string openblas_core;  // the kernel OpenBLAS picked for this CPU ("Prescott", "Haswell")
  double best(Precision p) const;  // the best ceiling in that precision (kF32 or kBf16)
  nlohmann::json to_json() const;
};
DenseCeilings measure_dense_ceilings(int64_t M, int64_t K, int64_t N, int iters);

// Copy bandwidth in bytes/s, counting the bytes read and the bytes written, over a buffer far
// larger than the caches, split across threads as the layers' kernels are; median of iters.
double copy_bandwidth(int iters);

// A command's JSON results (text): to stdout for "-", otherwise written whole to path (the file
// appears only complete); nothing for an empty path. Shared by every command with --json.
void write_json_output(const std::string& text, const std::string& path);

}  // namespace sy::cli
