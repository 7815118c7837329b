// The MoE layer on an NVIDIA GPU: bf16 weights and activations, f32 accumulation, f32
// parameter gradients. Same math and the same dispatch plan as MoeLayer (the plan is built by
// the same code, on the host, from the device's routing), so it is tested against the CPU
// layer in float64. No CUDA header leaks from here; without -DSY_WITH_CUDA=ON every call
// throws sy::Error saying so, and cuda_available() is false.
//
//   CudaMoeLayer layer(cfg);            // needs cuda_available()
//   layer.set_params(p);                // host f32 params -> device bf16 (grads zeroed)
//   MoeForward out = layer.forward(x, y, /*training=*/true);   // host f32 [T, d] in and out
//   layer.backward(dy, dx);             // grads += on the device
//   MoeParams g = layer.grads();        // device f32 grads -> host
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/core/tensor.h"
#include "switchyard/moe/moe_layer.h"

namespace sy {

// True when this build has CUDA and a device can be used.
bool cuda_available();

class CudaMoeLayer {
 public:
  explicit CudaMoeLayer(const MoeConfig& cfg);  // throws ConfigError, or Error without a GPU
  ~CudaMoeLayer();
  CudaMoeLayer(const CudaMoeLayer&) = delete;
  CudaMoeLayer& operator=(const CudaMoeLayer&) = delete;

  // Uploads f32 (or f64) params, rounding to bf16; zeroes the gradients.
  void set_params(const MoeParams& p);
  // x: [T, d] host -> y: [T, d] host f32. Routing stats and aux losses as MoeLayer's.
  MoeForward forward(const Tensor& x, Tensor& y, bool training);
  // dy: [T, d] host -> dx: [T, d] host f32; parameter gradients accumulate on the device.
  void backward(const Tensor& dy, Tensor& dx);
  MoeParams grads() const;  // f32, host

  // Benchmarking on device-resident random inputs of T tokens: median milliseconds per call
  // of forward, of forward+backward, and of a dense cuBLAS bf16 GEMM [T*k, d] x [d, f].
  // phases: milliseconds of each phase of one forward+backward, in order.
  struct Timing {
    double fwd_ms = 0, fwd_bwd_ms = 0, dense_ms = 0;
    int64_t rows = 0;
    std::vector<std::pair<std::string, double>> phases;
  };
  Timing time_on_device(int64_t n_tokens, int iters, uint64_t seed);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sy
