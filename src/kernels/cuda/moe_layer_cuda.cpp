// CudaMoeLayer: the MoE layer on CUDA with bf16 weights and activations, f32 accumulation and
// f32 parameter gradients. GEMMs go to cuBLAS (cublasGemmEx, bf16 in, f32 compute), one call
// per expert on one stream; the rest are the kernels of moe_kernels.cu. The dispatch plan is built
// on the host by build_dispatch_plan (the same code as on CPU) from the device's expert ids, so
// both backends drop exactly the same slots. Every reduction has a fixed order: results do not
// depend on scheduling. Reference: MoeLayer (moe/moe_layer.h), checked in float64.
#include "switchyard/moe/moe_layer_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/moe_kernels.h"
#include "switchyard/core/rng.h"

#define SY_CUDA_CHECK(call)                                                          \
  do {                                                                               \
    cudaError_t err_ = (call);                                                       \
    SY_CHECK(err_ == cudaSuccess, "{} failed: {}", #call, cudaGetErrorString(err_)); \
  } while (0)
#define SY_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                          \
    cublasStatus_t st_ = (call);                                                                \
    SY_CHECK(st_ == CUBLAS_STATUS_SUCCESS, "{} failed: {}", #call, cublasGetStatusString(st_)); \
  } while (0)

namespace sy {

namespace {

using bf = cuda::bf;

// A device buffer of n elements of T, grown on demand and never shrunk.
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t cap = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  T* need(size_t n) {
    if (n > cap) {
      if (ptr) SY_CUDA_CHECK(cudaFree(ptr));
      ptr = nullptr;
      SY_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
      cap = n;
    }
    return ptr;
  }
};

}  // namespace

struct CudaMoeLayer::Impl {
  MoeConfig cfg;
  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;
  // Parameters (bf16) and gradients (f32).
  // w13 [E, d, 2f]: each row of w1 followed by the same row of w3, so the gate and up
  // projections are one GEMM per expert, and h13 [n, 2f] holds h1 | h3 side by side.
  DeviceBuffer<bf> w_gate, w13, w2;
  DeviceBuffer<float> g_gate, g13, g2;
  // Forward activations.
  DeviceBuffer<bf> x, xs, h13, act, ys, y;
  DeviceBuffer<float> logits, probs, lse, weight, sums;
  DeviceBuffer<int> expert, demand, offsets, row_token, row_slot, slot_row;
  // Backward.
  DeviceBuffer<bf> dy, dys, dact, dh13, dlogits;
  DeviceBuffer<float> dweight, dprobs, dbal, dxs, dx;
  // Host mirrors. plan holds only sizes, offsets and demand: its index arrays live on the
  // device (row_token, row_slot, slot_row above).
  std::vector<float> h_sums;
  DispatchPlan plan;
  int64_t n_tokens = 0;
  bool params_set = false;

  // Row-major C[M, N] = alpha op(A) op(B) + beta C, through column-major cuBLAS as
  // C^T = op(B)^T op(A)^T. A, B bf16; C bf16 or f32; f32 compute.
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const bf* A, int64_t lda,
            const bf* B, int64_t ldb, float beta, void* C, cudaDataType c_type, int64_t ldc) {
    if (M == 0 || N == 0) return;
    const float alpha = 1.0f;
    SY_CUBLAS_CHECK(cublasGemmEx(blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                 ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(N), int(M), int(K), &alpha, B,
                                 CUDA_R_16BF, int(ldb), A, CUDA_R_16BF, int(lda), &beta, C, c_type,
                                 int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // One GEMM of expert e, in the row-major terms of gemm().
  struct ExpertGemm {
    bool ta, tb;
    int64_t M, N, K;
    const bf* A;
    int64_t lda;
    const bf* B;
    int64_t ldb;
    void* C;
    int64_t ldc;
  };
  // The GEMMs of all experts (args_of(e) -> ExpertGemm), one cublasGemmEx each; cuBLAS 13.0's
  // cublasGemmGroupedBatchedEx rejected these bf16 GEMMs on an H100 ("not supported").
  template <class Fn>
  void expert_gemms(int64_t E, float beta, cudaDataType c_type, Fn&& args_of) {
    for (int64_t e = 0; e < E; ++e) {
      const ExpertGemm g = args_of(e);
      if (g.K == 0 && beta == 1.0f) continue;  // an expert without rows adds nothing
      gemm(g.ta, g.tb, g.M, g.N, g.K, g.A, g.lda, g.B, g.ldb, beta, g.C, c_type, g.ldc);
    }
  }

  // Phase timing with events, when profiling: mark(name) ends the phase called name.
  bool profile = false;
  std::vector<std::pair<const char*, cudaEvent_t>> marks;
  size_t n_marks = 0;
  void mark(const char* name) {
    if (!profile) return;
    if (n_marks == marks.size()) {
      cudaEvent_t ev;
      SY_CUDA_CHECK(cudaEventCreate(&ev));
      marks.push_back({name, ev});
    }
    marks[n_marks].first = name;
    SY_CUDA_CHECK(cudaEventRecord(marks[n_marks++].second, stream));
  }

  void upload_bf16(const Tensor& t, DeviceBuffer<bf>& dst) {
    Tensor b = convert(t, DType::kBF16);
    SY_CUDA_CHECK(cudaMemcpy(dst.need(size_t(b.numel())), b.data<sy::bf16>(), b.nbytes(),
                             cudaMemcpyHostToDevice));
  }

  MoeForward forward_device(bool training);
  void backward_device();
};

bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

CudaMoeLayer::CudaMoeLayer(const MoeConfig& cfg) : impl_(std::make_unique<Impl>()) {
  cfg.validate();
  if (cfg.d_model % 8 != 0)
    throw ConfigError(
        fmt::format("moe.d_model = {}: the CUDA backend needs a multiple of 8", cfg.d_model));
  if (cfg.gating != Gating::kSoftmaxTopK)
    throw ConfigError("moe.router: the CUDA backend has softmax top-k only for now");
  if (cfg.jitter_eps > 0 || cfg.n_groups > 0)
    throw ConfigError("moe.jitter_eps / moe.n_groups: not supported by the CUDA backend yet");
  if (cfg.n_shared_experts > 0)
    throw ConfigError("moe.n_shared_experts: the CUDA backend has no shared experts yet");
  if (cfg.batch_prioritized)
    throw ConfigError(
        "moe.batch_prioritized = true: not supported by the CUDA backend yet (its plan is "
        "built on the device in choice-major token order)");
  if (!cuda_available()) throw Error("CUDA backend: no usable CUDA device");
  impl_->cfg = cfg;
  SY_CUDA_CHECK(cudaStreamCreate(&impl_->stream));
  SY_CUBLAS_CHECK(cublasCreate(&impl_->blas));
  SY_CUBLAS_CHECK(cublasSetStream(impl_->blas, impl_->stream));
}

CudaMoeLayer::~CudaMoeLayer() {
  if (!impl_) return;
  if (impl_->blas) cublasDestroy(impl_->blas);
  for (auto& [name, ev] : impl_->marks) cudaEventDestroy(ev);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

void CudaMoeLayer::set_params(const MoeParams& p) {
  MoeLayer(impl_->cfg).check_params(p);
  Impl& m = *impl_;
  m.upload_bf16(p.w_gate, m.w_gate);
  // Rows of w1 and w3 interleaved into w13 [E, d, 2f].
  const int64_t f = m.cfg.d_ff, rows = p.w1.numel() / f;
  Tensor w1 = convert(p.w1, DType::kBF16), w3 = convert(p.w3, DType::kBF16);
  Tensor w13({rows, 2 * f}, DType::kBF16);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(w1.data<sy::bf16>() + r * f, f, w13.data<sy::bf16>() + r * 2 * f);
    std::copy_n(w3.data<sy::bf16>() + r * f, f, w13.data<sy::bf16>() + r * 2 * f + f);
  }
  m.upload_bf16(w13, m.w13);
  m.upload_bf16(p.w2, m.w2);
  for (auto [g, n] :
       {std::pair{&m.g_gate, p.w_gate.numel()}, {&m.g13, 2 * p.w1.numel()}, {&m.g2, p.w2.numel()}})
    SY_CUDA_CHECK(cudaMemset(g->need(size_t(n)), 0, size_t(n) * sizeof(float)));
  m.params_set = true;
}

MoeForward CudaMoeLayer::Impl::forward_device(bool training) {
  const int64_t T = n_tokens, d = cfg.d_model, f = cfg.d_ff, E = cfg.n_experts, k = cfg.top_k;
  mark("start");
  gemm(false, false, T, E, d, x.ptr, d, w_gate.ptr, E, 0.0f, logits.need(size_t(T * E)), CUDA_R_32F,
       E);
  probs.need(size_t(T * E));
  lse.need(size_t(T));
  weight.need(size_t(T * k));
  expert.need(size_t(T * k));
  SY_CUDA_CHECK(cuda::router(logits.ptr, int(T), int(E), int(k), cfg.renormalize, probs.ptr,
                             lse.ptr, expert.ptr, weight.ptr, stream));
  const int64_t chunks = cuda::router_sums_chunks(int(T));
  SY_CUDA_CHECK(cuda::router_sums(probs.ptr, lse.ptr, int(T), int(E),
                                  sums.need(size_t(chunks * (2 * E + 1))), stream));
  mark("router");
  // The plan on the device; the host gets back only what it launches with (offsets) and the
  // demand for the losses and stats, with one synchronisation.
  const int64_t capacity = cfg.capacity(T, training);
  SY_CUDA_CHECK(cuda::build_plan(expert.ptr, int(T), int(k), int(E), int(capacity),
                                 demand.need(size_t(E)), offsets.need(size_t(E + 1)),
                                 row_token.need(size_t(T * k)), row_slot.need(size_t(T * k)),
                                 slot_row.need(size_t(T * k)), stream));
  plan.n_tokens = T, plan.top_k = k, plan.n_experts = E, plan.capacity = capacity;
  plan.offsets.resize(size_t(E + 1));
  plan.demand.resize(size_t(E));
  h_sums.resize(size_t(chunks * (2 * E + 1)));
  SY_CUDA_CHECK(cudaMemcpyAsync(plan.offsets.data(), offsets.ptr, (E + 1) * 4,
                                cudaMemcpyDeviceToHost, stream));
  SY_CUDA_CHECK(
      cudaMemcpyAsync(plan.demand.data(), demand.ptr, E * 4, cudaMemcpyDeviceToHost, stream));
  SY_CUDA_CHECK(
      cudaMemcpyAsync(h_sums.data(), sums.ptr, h_sums.size() * 4, cudaMemcpyDeviceToHost, stream));
  SY_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int64_t n = plan.n_rows();
  mark("plan, offsets to host");

  xs.need(size_t(n * d));
  h13.need(size_t(n * 2 * f));
  act.need(size_t(n * f));
  ys.need(size_t(n * d));
  y.need(size_t(T * d));
  SY_CUDA_CHECK(cuda::gather_rows(x.ptr, row_token.ptr, int(n), int(d), xs.ptr, stream));
  mark("gather");
  auto rows_of = [&](int64_t e) { return std::pair{int64_t(plan.offsets[e]), plan.rows_of(e)}; };
  expert_gemms(E, 0.0f, CUDA_R_16BF, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{false, false,
                      rows,  2 * f,
                      d,     xs.ptr + r0 * d,
                      d,     w13.ptr + e * d * 2 * f,
                      2 * f, h13.ptr + r0 * 2 * f,
                      2 * f};
  });
  mark("gemm w1|w3");
  SY_CUDA_CHECK(cuda::swiglu(h13.ptr, size_t(n), size_t(f), act.ptr, stream));
  mark("swiglu");
  expert_gemms(E, 0.0f, CUDA_R_16BF, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{false, false,           rows, d, f, act.ptr + r0 * f, f, w2.ptr + e * f * d,
                      d,     ys.ptr + r0 * d, d};
  });
  mark("gemm w2");
  SY_CUDA_CHECK(
      cuda::combine(ys.ptr, slot_row.ptr, weight.ptr, int(T), int(k), int(d), y.ptr, stream));
  mark("combine");

  // Aux losses and stats from the chunk partials, summed in chunk order in double.
  MoeForward out;
  std::vector<double> p_sum(size_t(E), 0.0);
  double entropy = 0, z = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* part = h_sums.data() + c * (2 * E + 1);
    for (int64_t e = 0; e < E; ++e) p_sum[e] += part[e], entropy += part[E + e];
    z += part[2 * E];
  }
  if (T > 0) {
    double s = 0;
    for (int64_t e = 0; e < E; ++e)
      s += double(plan.demand[e]) / double(T * k) * p_sum[e] / double(T);
    out.loss_balance = cfg.loss_balance_weight * double(E) * s;
    out.loss_z = cfg.loss_z_weight * z / double(T);
  }
  out.stats = routing_stats(plan, T > 0 ? entropy / double(T) : 0.0);
  return out;
}

MoeForward CudaMoeLayer::forward(const Tensor& x_host, Tensor& y_host, bool training) {
  Impl& m = *impl_;
  SY_CHECK(m.params_set, "CudaMoeLayer::forward before set_params");
  const int64_t d = m.cfg.d_model;
  if (x_host.rank() != 2 || x_host.dim(1) != d)
    throw ShapeError(
        fmt::format("moe input x: {}, expected [T, {}] (moe.d_model)", x_host.shape_str(), d));
  m.n_tokens = x_host.dim(0);
  Tensor xb = convert(x_host, DType::kBF16);
  SY_CUDA_CHECK(cudaMemcpyAsync(m.x.need(size_t(xb.numel())), xb.data<sy::bf16>(), xb.nbytes(),
                                cudaMemcpyHostToDevice, m.stream));
  MoeForward out = m.forward_device(training);
  Tensor yb({m.n_tokens, d}, DType::kBF16);
  SY_CUDA_CHECK(
      cudaMemcpyAsync(yb.data<sy::bf16>(), m.y.ptr, yb.nbytes(), cudaMemcpyDeviceToHost, m.stream));
  SY_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  y_host = convert(yb, DType::kF32);
  return out;
}

void CudaMoeLayer::Impl::backward_device() {
  const int64_t T = n_tokens, d = cfg.d_model, f = cfg.d_ff, E = cfg.n_experts, k = cfg.top_k;
  const int64_t n = plan.n_rows();
  dys.need(size_t(n * d));
  dweight.need(size_t(T * k));
  SY_CUDA_CHECK(cuda::combine_backward(ys.ptr, dy.ptr, slot_row.ptr, weight.ptr, int(T), int(k),
                                       int(d), dys.ptr, dweight.ptr, stream));
  dact.need(size_t(n * f));
  dh13.need(size_t(n * 2 * f));
  dxs.need(size_t(n * d));
  mark("combine backward");
  auto rows_of = [&](int64_t e) { return std::pair{int64_t(plan.offsets[e]), plan.rows_of(e)}; };
  // ys = act w2: dw2 += act^T dys, dact = dys w2^T.
  expert_gemms(E, 1.0f, CUDA_R_32F, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{
        true, false, f, d, rows, act.ptr + r0 * f, f, dys.ptr + r0 * d, d, g2.ptr + e * f * d, d};
  });
  expert_gemms(E, 0.0f, CUDA_R_16BF, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{
        false, true, rows, f, d, dys.ptr + r0 * d, d, w2.ptr + e * f * d, d, dact.ptr + r0 * f, f};
  });
  mark("gemm w2 backward");
  SY_CUDA_CHECK(cuda::swiglu_backward(h13.ptr, dact.ptr, size_t(n), size_t(f), dh13.ptr, stream));
  mark("swiglu backward");
  // h13 = xs w13: dw13 += xs^T dh13, dxs = dh13 w13^T.
  expert_gemms(E, 1.0f, CUDA_R_32F, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{true,  false,
                      d,     2 * f,
                      rows,  xs.ptr + r0 * d,
                      d,     dh13.ptr + r0 * 2 * f,
                      2 * f, g13.ptr + e * d * 2 * f,
                      2 * f};
  });
  expert_gemms(E, 0.0f, CUDA_R_32F, [&](int64_t e) {
    auto [r0, rows] = rows_of(e);
    return ExpertGemm{false, true,
                      rows,  d,
                      2 * f, dh13.ptr + r0 * 2 * f,
                      2 * f, w13.ptr + e * d * 2 * f,
                      2 * f, dxs.ptr + r0 * d,
                      d};
  });
  mark("gemm w1|w3 backward");
  // Router: the balance loss adds w_b E f_e / T to dprobs[t, e]; the z-loss adds
  // w_z 2 lse_t / T probs[t, e] to dlogits.
  std::vector<float> h_dbal(size_t(E), 0.0f);
  if (T > 0)
    for (int64_t e = 0; e < E; ++e)
      h_dbal[e] = float(cfg.loss_balance_weight * double(E) * double(plan.demand[e]) /
                        double(T * k) / double(T));
  SY_CUDA_CHECK(
      cudaMemcpyAsync(dbal.need(size_t(E)), h_dbal.data(), E * 4, cudaMemcpyHostToDevice, stream));
  dprobs.need(size_t(T * E));
  dlogits.need(size_t(T * E));
  dx.need(size_t(T * d));
  const float z_scale = T > 0 ? float(2 * cfg.loss_z_weight / double(T)) : 0.0f;
  SY_CUDA_CHECK(cuda::router_backward(probs.ptr, lse.ptr, expert.ptr, weight.ptr, dweight.ptr,
                                      dbal.ptr, z_scale, int(T), int(E), int(k), cfg.renormalize,
                                      dprobs.ptr, dlogits.ptr, stream));
  gemm(true, false, d, E, T, x.ptr, d, dlogits.ptr, E, 1.0f, g_gate.ptr, CUDA_R_32F, E);
  gemm(false, true, T, d, E, dlogits.ptr, E, w_gate.ptr, E, 0.0f, dx.ptr, CUDA_R_32F, d);
  mark("router backward");
  SY_CUDA_CHECK(
      cuda::gather_add_rows(dxs.ptr, slot_row.ptr, int(T), int(k), int(d), dx.ptr, stream));
  mark("dx gather");
}

void CudaMoeLayer::backward(const Tensor& dy_host, Tensor& dx_host) {
  Impl& m = *impl_;
  expect_shape(dy_host, {m.n_tokens, m.cfg.d_model}, "moe backward dy");
  Tensor db = convert(dy_host, DType::kBF16);
  SY_CUDA_CHECK(cudaMemcpyAsync(m.dy.need(size_t(db.numel())), db.data<sy::bf16>(), db.nbytes(),
                                cudaMemcpyHostToDevice, m.stream));
  m.backward_device();
  dx_host.resize({m.n_tokens, m.cfg.d_model}, DType::kF32);
  SY_CUDA_CHECK(cudaMemcpyAsync(dx_host.data<float>(), m.dx.ptr, dx_host.nbytes(),
                                cudaMemcpyDeviceToHost, m.stream));
  SY_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

MoeParams CudaMoeLayer::grads() const {
  const Impl& m = *impl_;
  const int64_t d = m.cfg.d_model, f = m.cfg.d_ff, E = m.cfg.n_experts;
  MoeParams g{Tensor({d, E}, DType::kF32), Tensor({E, d, f}, DType::kF32),
              Tensor({E, d, f}, DType::kF32), Tensor({E, f, d}, DType::kF32)};
  for (auto [dst, src] : {std::pair{&g.w_gate, m.g_gate.ptr}, {&g.w2, m.g2.ptr}})
    SY_CUDA_CHECK(cudaMemcpy(dst->data<float>(), src, dst->nbytes(), cudaMemcpyDeviceToHost));
  Tensor g13({E * d, 2 * f}, DType::kF32);  // rows of dw1 | dw3
  SY_CUDA_CHECK(cudaMemcpy(g13.data<float>(), m.g13.ptr, g13.nbytes(), cudaMemcpyDeviceToHost));
  for (int64_t r = 0; r < E * d; ++r) {
    std::copy_n(g13.data<float>() + r * 2 * f, f, g.w1.data<float>() + r * f);
    std::copy_n(g13.data<float>() + r * 2 * f + f, f, g.w3.data<float>() + r * f);
  }
  return g;
}

CudaMoeLayer::Timing CudaMoeLayer::time_on_device(int64_t n_tokens, int iters, uint64_t seed) {
  Impl& m = *impl_;
  const int64_t d = m.cfg.d_model, f = m.cfg.d_ff, k = m.cfg.top_k;
  m.n_tokens = n_tokens;
  // Random inputs made on the host once (never zeros), converted on the device.
  auto random_bf16 = [&](DeviceBuffer<bf>& dst, int64_t count, uint64_t stream) {
    Tensor t({count}, DType::kF32);
    fill_normal(t.span<float>(), Philox(seed, stream), 1.0f);
    DeviceBuffer<float> tmp;
    SY_CUDA_CHECK(
        cudaMemcpy(tmp.need(size_t(count)), t.data<float>(), t.nbytes(), cudaMemcpyHostToDevice));
    SY_CUDA_CHECK(cuda::f32_to_bf16(tmp.ptr, size_t(count), dst.need(size_t(count)), m.stream));
    SY_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  };
  random_bf16(m.x, n_tokens * d, 200);
  random_bf16(m.dy, n_tokens * d, 201);
  cudaEvent_t start, stop;
  SY_CUDA_CHECK(cudaEventCreate(&start));
  SY_CUDA_CHECK(cudaEventCreate(&stop));
  auto median_ms = [&](auto&& fn) {
    fn();  // warm-up: allocations, cuBLAS heuristics
    std::vector<float> ms(size_t(std::max(iters, 1)));
    for (float& v : ms) {
      SY_CUDA_CHECK(cudaEventRecord(start, m.stream));
      fn();
      SY_CUDA_CHECK(cudaEventRecord(stop, m.stream));
      SY_CUDA_CHECK(cudaEventSynchronize(stop));
      SY_CUDA_CHECK(cudaEventElapsedTime(&v, start, stop));
    }
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return double(ms[ms.size() / 2]);
  };
  Timing out;
  out.fwd_ms = median_ms([&] { m.forward_device(true); });
  out.rows = m.plan.n_rows();
  out.fwd_bwd_ms = median_ms([&] {
    m.forward_device(true);
    m.backward_device();
  });
  // The ceiling: one dense bf16 GEMM with the rows of all experts, [T k, d] x [d, f].
  DeviceBuffer<bf> a, b, c;
  random_bf16(a, n_tokens * k * d, 202);
  random_bf16(b, d * f, 203);
  c.need(size_t(n_tokens * k * f));
  out.dense_ms = median_ms([&] {
    m.gemm(false, false, n_tokens * k, f, d, a.ptr, d, b.ptr, f, 0.0f, c.ptr, CUDA_R_16BF, f);
  });
  // One profiled forward+backward: time between consecutive marks, per phase.
  m.profile = true;
  m.n_marks = 0;
  m.forward_device(true);
  m.backward_device();
  SY_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  for (size_t i = 1; i < m.n_marks; ++i) {
    float ms = 0;
    SY_CUDA_CHECK(cudaEventElapsedTime(&ms, m.marks[i - 1].second, m.marks[i].second));
    out.phases.emplace_back(m.marks[i].first, double(ms));
  }
  m.profile = false;
  SY_CUDA_CHECK(cudaEventDestroy(start));
  SY_CUDA_CHECK(cudaEventDestroy(stop));
  return out;
}

}  // namespace sy
