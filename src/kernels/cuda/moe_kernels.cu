// CUDA kernels of the MoE layer, bf16 data with f32 arithmetic: router softmax + top-k (one
// warp per token), gather, SwiGLU, combine, and their backwards. Each launcher returns the
// launch's error; src/kernels/cuda/moe_layer_cuda.cpp drives them with cuBLAS GEMMs. Every
// reduction has a fixed order, so results do not depend on scheduling. No project header is
// included: nvcc compiles only this file. References: the same-named CPU code in moe/ and
// kernels/ref.
#include "kernels/cuda/moe_kernels.h"

#include <algorithm>

namespace sy::cuda {

namespace {

using bf = __nv_bfloat16;

constexpr int kWarp = 32;

// Router: one warp per token. probs = softmax(logits); top-k by k rounds of warp arg-max
// (ties to the lower index, as the CPU kernel); weights optionally renormalised.
// logits: [T, E] f32 -> probs [T, E], lse [T], expert [T, k], weight [T, k]
__global__ void router_kernel(const float* logits, int T, int E, int k, bool renorm, float* probs,
                              float* lse, int* expert, float* weight) {
  const int t = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;
  const float* l = logits + size_t(t) * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, l[e]);
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float s = 0;
  for (int e = lane; e < E; e += kWarp) s += expf(l[e] - mx);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  const float log_z = mx + logf(s);
  float* p = probs + size_t(t) * E;
  for (int e = lane; e < E; e += kWarp) p[e] = expf(l[e] - log_z);
  __syncwarp();
  float chosen_sum = 0;
  int prev_e = -1;
  float prev_v = INFINITY;
  for (int j = 0; j < k; ++j) {
    // Best (value, index) strictly after (prev_v, prev_e) in the order (value desc, index asc).
    float bv = -INFINITY;
    int be = E;
    for (int e = lane; e < E; e += kWarp) {
      const float v = p[e];
      const bool after = v < prev_v || (v == prev_v && e > prev_e);
      if (after && (v > bv || (v == bv && e < be))) bv = v, be = e;
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (ov > bv || (ov == bv && oe < be)) bv = ov, be = oe;
    }
    if (lane == 0) {
      expert[size_t(t) * k + j] = be;
      weight[size_t(t) * k + j] = bv;
    }
    chosen_sum += bv;
    prev_v = bv, prev_e = be;
  }
  __syncwarp();
  if (lane == 0) {
    lse[t] = log_z;
    if (renorm)
      for (int j = 0; j < k; ++j) weight[size_t(t) * k + j] /= chosen_sum;
  }
}

// Per chunk of kChunk tokens: column sums of probs and of -p log p, and the sum of lse^2.
// Partials are summed on the host in chunk order. probs: [T, E] -> part: [chunks, 2E + 1]
constexpr int kChunk = 256;
__global__ void router_sums_kernel(const float* probs, const float* lse, int T, int E,
                                   float* part) {
  const int c = blockIdx.x, t0 = c * kChunk, t1 = min(T, t0 + kChunk);
  float* out = part + size_t(c) * (2 * E + 1);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float ps = 0, h = 0;
    for (int t = t0; t < t1; ++t) {
      const float v = probs[size_t(t) * E + e];
      ps += v;
      if (v > 0) h -= v * logf(v);
    }
    out[e] = ps;
    out[E + e] = h;
  }
  if (threadIdx.x == 0) {
    float z = 0;
    for (int t = t0; t < t1; ++t) z += lse[t] * lse[t];
    out[2 * E] = z;
  }
}

// xs[r] = x[row_token[r]], 8 bf16 (16 bytes) per thread step. d % 8 == 0.
__global__ void gather_kernel(const bf* x, const int* row_token, int n, int d, bf* xs) {
  const int v = d / 8;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(n) * v;
       i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / v, c = i % v;
    reinterpret_cast<uint4*>(xs + r * d)[c] =
        reinterpret_cast<const uint4*>(x + size_t(row_token[r]) * d)[c];
  }
}

__device__ inline float silu_f(float g) { return g / (1.0f + __expf(-g)); }

// act = silu(h1) * h3, elementwise in f32.
__global__ void swiglu_kernel(const bf* h1, const bf* h3, size_t n, bf* act) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(h1[i]);
    act[i] = __float2bfloat16(silu_f(g) * __bfloat162float(h3[i]));
  }
}

__global__ void swiglu_backward_kernel(const bf* h1, const bf* h3, const bf* da, size_t n, bf* dh1,
                                       bf* dh3) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(h1[i]), u = __bfloat162float(h3[i]);
    const float d = __bfloat162float(da[i]), s = 1.0f / (1.0f + __expf(-g));
    dh1[i] = __float2bfloat16(d * u * s * (1.0f + g * (1.0f - s)));
    dh3[i] = __float2bfloat16(d * g * s);
  }
}

// y[t] = sum_j weight[t, j] ys[slot_row[t k + j]] in f32; one block per token.
__global__ void combine_kernel(const bf* ys, const int* slot_row, const float* weight, int k,
                               int d, bf* y) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0;
    for (int j = 0; j < k; ++j) {
      const int r = slot_row[size_t(t) * k + j];
      if (r >= 0) acc += weight[size_t(t) * k + j] * __bfloat162float(ys[size_t(r) * d + c]);
    }
    y[size_t(t) * d + c] = __float2bfloat16(acc);
  }
}

// dys[r] = w dy[t]; dweight[t, j] = <dy[t], ys[r]> (0 when dropped). One warp per slot.
__global__ void combine_backward_kernel(const bf* ys, const bf* dy, const int* slot_row,
                                        const float* weight, int n_slots, int k, int d, bf* dys,
                                        float* dweight) {
  const int s = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= n_slots) return;
  const int r = slot_row[s], t = s / k;
  float dot = 0;
  if (r >= 0) {
    const float w = weight[s];
    for (int c = lane; c < d; c += kWarp) {
      const float g = __bfloat162float(dy[size_t(t) * d + c]);
      dys[size_t(r) * d + c] = __float2bfloat16(w * g);
      dot += g * __bfloat162float(ys[size_t(r) * d + c]);
    }
  }
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) dweight[s] = dot;
}

// Router backward, one warp per token: dprobs from dweight (through the renormalisation) plus
// the balance loss's constant dbal[e]; softmax backward; plus the z-loss term. -> dlogits bf16
__global__ void router_backward_kernel(const float* probs, const float* lse, const int* expert,
                                       const float* weight, const float* dweight,
                                       const float* dbal, float z_scale, int T, int E, int k,
                                       bool renorm, float* dprobs, bf* dlogits) {
  const int t = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;
  const float* p = probs + size_t(t) * E;
  float* dp = dprobs + size_t(t) * E;
  for (int e = lane; e < E; e += kWarp) dp[e] = dbal[e];
  __syncwarp();
  if (lane == 0) {
    const int* ex = expert + size_t(t) * k;
    const float *w = weight + size_t(t) * k, *dw = dweight + size_t(t) * k;
    if (renorm) {
      float sum_p = 0, dot = 0;
      for (int j = 0; j < k; ++j) sum_p += p[ex[j]], dot += dw[j] * w[j];
      for (int j = 0; j < k; ++j) dp[ex[j]] += (dw[j] - dot) / sum_p;
    } else {
      for (int j = 0; j < k; ++j) dp[ex[j]] += dw[j];
    }
  }
  __syncwarp();
  float dot = 0;
  for (int e = lane; e < E; e += kWarp) dot += dp[e] * p[e];
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  for (int e = lane; e < E; e += kWarp)
    dlogits[size_t(t) * E + e] = __float2bfloat16(p[e] * (dp[e] - dot) + z_scale * lse[t] * p[e]);
}

// dx[t] += sum_j dxs[slot_row[t k + j]], all f32.
__global__ void gather_add_kernel(const float* dxs, const int* slot_row, int k, int d, float* dx) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = dx[size_t(t) * d + c];
    for (int j = 0; j < k; ++j) {
      const int r = slot_row[size_t(t) * k + j];
      if (r >= 0) acc += dxs[size_t(r) * d + c];
    }
    dx[size_t(t) * d + c] = acc;
  }
}

__global__ void f32_to_bf16_kernel(const float* in, size_t n, bf* out) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

int grid_for(size_t n, int block = 256) {
  return int(std::min<size_t>((n + block - 1) / block, 65535));
}

}  // namespace

cudaError_t router(const float* logits, int T, int E, int k, bool renorm, float* probs, float* lse,
                   int* expert, float* weight, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  router_kernel<<<(T + 7) / 8, 256, 0, s>>>(logits, T, E, k, renorm, probs, lse, expert, weight);
  return cudaGetLastError();
}

int router_sums_chunks(int T) { return (T + kChunk - 1) / kChunk; }

cudaError_t router_sums(const float* probs, const float* lse, int T, int E, float* part,
                        cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  router_sums_kernel<<<router_sums_chunks(T), 256, 0, s>>>(probs, lse, T, E, part);
  return cudaGetLastError();
}

cudaError_t gather_rows(const bf* x, const int* row_token, int n, int d, bf* xs, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  gather_kernel<<<grid_for(size_t(n) * d / 8), 256, 0, s>>>(x, row_token, n, d, xs);
  return cudaGetLastError();
}

cudaError_t swiglu(const bf* h1, const bf* h3, size_t n, bf* act, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  swiglu_kernel<<<grid_for(n), 256, 0, s>>>(h1, h3, n, act);
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const bf* h1, const bf* h3, const bf* da, size_t n, bf* dh1, bf* dh3,
                            cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  swiglu_backward_kernel<<<grid_for(n), 256, 0, s>>>(h1, h3, da, n, dh1, dh3);
  return cudaGetLastError();
}

cudaError_t combine(const bf* ys, const int* slot_row, const float* weight, int T, int k, int d,
                    bf* y, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  combine_kernel<<<T, 256, 0, s>>>(ys, slot_row, weight, k, d, y);
  return cudaGetLastError();
}

cudaError_t combine_backward(const bf* ys, const bf* dy, const int* slot_row, const float* weight,
                             int T, int k, int d, bf* dys, float* dweight, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  combine_backward_kernel<<<(T * k + 7) / 8, 256, 0, s>>>(ys, dy, slot_row, weight, T * k, k, d,
                                                          dys, dweight);
  return cudaGetLastError();
}

cudaError_t router_backward(const float* probs, const float* lse, const int* expert,
                            const float* weight, const float* dweight, const float* dbal,
                            float z_scale, int T, int E, int k, bool renorm, float* dprobs,
                            bf* dlogits, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  router_backward_kernel<<<(T + 7) / 8, 256, 0, s>>>(probs, lse, expert, weight, dweight, dbal,
                                                     z_scale, T, E, k, renorm, dprobs, dlogits);
  return cudaGetLastError();
}

cudaError_t gather_add_rows(const float* dxs, const int* slot_row, int T, int k, int d, float* dx,
                            cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  gather_add_kernel<<<T, 256, 0, s>>>(dxs, slot_row, k, d, dx);
  return cudaGetLastError();
}

cudaError_t f32_to_bf16(const float* in, size_t n, bf* out, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  f32_to_bf16_kernel<<<grid_for(n), 256, 0, s>>>(in, n, out);
  return cudaGetLastError();
}

}  // namespace sy::cuda
