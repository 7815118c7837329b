// CUDA kernels of the MoE layer, bf16 data with f32 arithmetic: router softmax + top-k (one
// warp per token), gather, SwiGLU, combine, and their backwards. Each launcher returns the
// launch's error; src/kernels/cuda/moe_layer_cuda.cpp drives them with cuBLAS GEMMs. Every
// reduction has a fixed order, so results do not depend on scheduling. No project header is
// included: nvcc compiles only this file. References: the same-named CPU code in moe/ and
// kernels/ref.
#include <algorithm>

#include "kernels/cuda/moe_kernels.h"

namespace sy::cuda {

namespace {

using bf = __nv_bfloat16;

constexpr int kWarp = 32;

// Dispatch plan, the CPU's counting sort (dispatch_plan.cpp) on the device.
// Demand per expert: integer atomics, so the counts are exact whatever the order.
__global__ void plan_count_kernel(const int* expert, int n_slots, int* demand) {
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < n_slots; s += gridDim.x * blockDim.x)
    atomicAdd(&demand[expert[s]], 1);
}

// offsets = exclusive prefix sum of min(demand, capacity); E is small, one thread.
__global__ void plan_offsets_kernel(const int* demand, int E, int capacity, int* offsets) {
  int acc = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e] = acc;
    acc += capacity < 0 ? demand[e] : min(demand[e], capacity);
  }
  offsets[E] = acc;
}

// Exclusive prefix sum of flag over the block (blockDim.x a multiple of 32, at most 1024);
// *total receives the block's sum.
__device__ int block_exclusive_scan(int flag, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int incl = flag;
  for (int o = 1; o < kWarp; o *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == kWarp - 1) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / kWarp;
    int w = lane < n_warps ? warp_sums[lane] : 0;
    for (int o = 1; o < kWarp; o *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    if (lane < n_warps) warp_sums[lane] = w;  // inclusive sums of warp totals
  }
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - flag;
  *total = warp_sums[blockDim.x / kWarp - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

// One block per expert walks all slots in choice-major rank order (rank r is choice r / T of
// token r % T) and places its slots in that order: the first `capacity` get rows, the rest are
// dropped (slot_row -1). Each slot belongs to exactly one expert, so every slot is written once.
__global__ void plan_fill_kernel(const int* expert, int T, int k, int capacity, const int* offsets,
                                 int* row_token, int* row_slot, int* slot_row) {
  const int e = blockIdx.x, n_slots = T * k;
  int base = 0;
  for (int r0 = 0; r0 < n_slots; r0 += blockDim.x) {
    const int r = r0 + threadIdx.x;
    const int s = r < n_slots ? (r % T) * k + r / T : 0;
    const int flag = r < n_slots && expert[s] == e;
    int total;
    const int pos = base + block_exclusive_scan(flag, &total);
    if (flag) {
      if (capacity < 0 || pos < capacity) {
        const int row = offsets[e] + pos;
        row_token[row] = s / k;
        row_slot[row] = s;
        slot_row[s] = row;
      } else {
        slot_row[s] = -1;
      }
    }
    base += total;
  }
}

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

// Eight bf16 in one 16-byte access.
struct alignas(16) Bf8 {
  __nv_bfloat162 v[4];
};

// act = silu(h1) * h3, elementwise in f32, with h13 = [h1 | h3] per row ([n, 2f]).
// With f % 8 == 0 every access is 16 bytes (8 bf16); otherwise element by element.
__global__ void swiglu_kernel(const bf* h13, size_t n, size_t f, bf* act) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  const size_t i0 = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (f % 8 == 0) {
    const size_t f8 = f / 8;
    for (size_t i = i0; i < n * f8; i += stride) {
      const size_t r = i / f8, c = i % f8;
      const Bf8 g = reinterpret_cast<const Bf8*>(h13 + r * 2 * f)[c];
      const Bf8 u = reinterpret_cast<const Bf8*>(h13 + r * 2 * f + f)[c];
      Bf8 out;
      for (int j = 0; j < 4; ++j) {
        const float2 gf = __bfloat1622float2(g.v[j]), uf = __bfloat1622float2(u.v[j]);
        out.v[j] = __floats2bfloat162_rn(silu_f(gf.x) * uf.x, silu_f(gf.y) * uf.y);
      }
      reinterpret_cast<Bf8*>(act + r * f)[c] = out;
    }
    return;
  }
  for (size_t i = i0; i < n * f; i += stride) {
    const size_t r = i / f, c = i % f;
    act[i] = __float2bfloat16(silu_f(__bfloat162float(h13[r * 2 * f + c])) *
                              __bfloat162float(h13[r * 2 * f + f + c]));
  }
}

__device__ inline void swiglu_grad(float g, float u, float d, float& d1, float& d3) {
  const float s = 1.0f / (1.0f + __expf(-g));
  d1 = d * u * s * (1.0f + g * (1.0f - s));
  d3 = d * g * s;
}

// da: [n, f] -> dh13 = [dh1 | dh3]: [n, 2f]. Same access scheme as swiglu_kernel.
__global__ void swiglu_backward_kernel(const bf* h13, const bf* da, size_t n, size_t f, bf* dh13) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  const size_t i0 = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (f % 8 == 0) {
    const size_t f8 = f / 8;
    for (size_t i = i0; i < n * f8; i += stride) {
      const size_t r = i / f8, c = i % f8;
      const Bf8 g = reinterpret_cast<const Bf8*>(h13 + r * 2 * f)[c];
      const Bf8 u = reinterpret_cast<const Bf8*>(h13 + r * 2 * f + f)[c];
      const Bf8 d = reinterpret_cast<const Bf8*>(da + r * f)[c];
      Bf8 o1, o3;
      for (int j = 0; j < 4; ++j) {
        const float2 gf = __bfloat1622float2(g.v[j]), uf = __bfloat1622float2(u.v[j]),
                     df = __bfloat1622float2(d.v[j]);
        float a1, a3, b1, b3;
        swiglu_grad(gf.x, uf.x, df.x, a1, a3);
        swiglu_grad(gf.y, uf.y, df.y, b1, b3);
        o1.v[j] = __floats2bfloat162_rn(a1, b1);
        o3.v[j] = __floats2bfloat162_rn(a3, b3);
      }
      reinterpret_cast<Bf8*>(dh13 + r * 2 * f)[c] = o1;
      reinterpret_cast<Bf8*>(dh13 + r * 2 * f + f)[c] = o3;
    }
    return;
  }
  for (size_t i = i0; i < n * f; i += stride) {
    const size_t r = i / f, c = i % f;
    float d1, d3;
    swiglu_grad(__bfloat162float(h13[r * 2 * f + c]), __bfloat162float(h13[r * 2 * f + f + c]),
                __bfloat162float(da[i]), d1, d3);
    dh13[r * 2 * f + c] = __float2bfloat16(d1);
    dh13[r * 2 * f + f + c] = __float2bfloat16(d3);
  }
}

// y[t] = sum_j weight[t, j] ys[slot_row[t k + j]] in f32; one block per token.
__global__ void combine_kernel(const bf* ys, const int* slot_row, const float* weight, int k, int d,
                               bf* y) {
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
                                       const float* weight, const float* dweight, const float* dbal,
                                       float z_scale, int T, int E, int k, bool renorm,
                                       float* dprobs, bf* dlogits) {
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

cudaError_t build_plan(const int* expert, int T, int k, int E, int capacity, int* demand,
                       int* offsets, int* row_token, int* row_slot, int* slot_row, cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(demand, 0, size_t(E) * sizeof(int), s);
  if (err != cudaSuccess) return err;
  if (T > 0) {
    plan_count_kernel<<<grid_for(size_t(T) * k), 256, 0, s>>>(expert, T * k, demand);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  plan_offsets_kernel<<<1, 1, 0, s>>>(demand, E, capacity, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess || T == 0) return err;
  plan_fill_kernel<<<E, 1024, 0, s>>>(expert, T, k, capacity, offsets, row_token, row_slot,
                                      slot_row);
  return cudaGetLastError();
}

cudaError_t gather_rows(const bf* x, const int* row_token, int n, int d, bf* xs, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  gather_kernel<<<grid_for(size_t(n) * d / 8), 256, 0, s>>>(x, row_token, n, d, xs);
  return cudaGetLastError();
}

cudaError_t swiglu(const bf* h13, size_t n, size_t f, bf* act, cudaStream_t s) {
  if (n * f == 0) return cudaSuccess;
  swiglu_kernel<<<grid_for((n * f + 7) / 8), 256, 0, s>>>(h13, n, f, act);
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const bf* h13, const bf* da, size_t n, size_t f, bf* dh13,
                            cudaStream_t s) {
  if (n * f == 0) return cudaSuccess;
  swiglu_backward_kernel<<<grid_for((n * f + 7) / 8), 256, 0, s>>>(h13, da, n, f, dh13);
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
