// CudaMoeLayer in a build without CUDA: every entry point says how to get one.
#include "switchyard/moe/moe_layer_cuda.h"

namespace sy {

namespace {
[[noreturn]] void no_cuda() {
  throw Error("CUDA backend: this build has none; configure with -DSY_WITH_CUDA=ON (needs nvcc)");
}
}  // namespace

struct CudaMoeLayer::Impl {};

bool cuda_available() { return false; }
CudaMoeLayer::CudaMoeLayer(const MoeConfig&) { no_cuda(); }
CudaMoeLayer::~CudaMoeLayer() = default;
void CudaMoeLayer::set_params(const MoeParams&) { no_cuda(); }
MoeForward CudaMoeLayer::forward(const Tensor&, Tensor&, bool) { no_cuda(); }
void CudaMoeLayer::backward(const Tensor&, Tensor&) { no_cuda(); }
MoeParams CudaMoeLayer::grads() const { no_cuda(); }
CudaMoeLayer::Timing CudaMoeLayer::time_on_device(int64_t, int, uint64_t) { no_cuda(); }

}  // namespace sy
