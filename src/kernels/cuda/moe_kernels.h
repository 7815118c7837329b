// Launchers of the MoE layer's CUDA kernels (moe_kernels.cu). Plain pointers and sizes; bf16
// data is __nv_bfloat16. Each returns the launch's cudaError_t and launches nothing for empty
// input. Shapes as in the CPU code: T tokens, E experts, k choices, d width, n rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace sy::cuda {

using bf = __nv_bfloat16;

// logits: [T, E] -> probs [T, E], lse [T], expert [T, k] (best first), weight [T, k]
cudaError_t router(const float* logits, int T, int E, int k, bool renorm, float* probs, float* lse,
                   int* expert, float* weight, cudaStream_t s);
// Per chunk of tokens: column sums of probs, of -p log p, and the sum of lse^2.
// -> part: [router_sums_chunks(T), 2 E + 1]
int router_sums_chunks(int T);
cudaError_t router_sums(const float* probs, const float* lse, int T, int E, float* part,
                        cudaStream_t s);
// The dispatch plan of dispatch_plan.h on the device, slot for slot the same: demand [E],
// offsets [E+1], row_token and row_slot [n] (n = offsets[E] <= T k), slot_row [T k].
// capacity -1: none.
cudaError_t build_plan(const int* expert, int T, int k, int E, int capacity, int* demand,
                       int* offsets, int* row_token, int* row_slot, int* slot_row, cudaStream_t s);
// xs[r] = x[row_token[r]]. x: [T, d], d % 8 == 0 -> xs: [n, d]
cudaError_t gather_rows(const bf* x, const int* row_token, int n, int d, bf* xs, cudaStream_t s);
// act = silu(h1) * h3 with h13 = [h1 | h3] row by row. h13: [n, 2f] -> act: [n, f];
// backward: da: [n, f] -> dh13 = [dh1 | dh3]: [n, 2f] (overwritten).
cudaError_t swiglu(const bf* h13, size_t n, size_t f, bf* act, cudaStream_t s);
cudaError_t swiglu_backward(const bf* h13, const bf* da, size_t n, size_t f, bf* dh13,
                            cudaStream_t s);
// y[t] = sum_j weight[t, j] ys[slot_row[t k + j]] (dropped slots: -1, skipped).
cudaError_t combine(const bf* ys, const int* slot_row, const float* weight, int T, int k, int d,
                    bf* y, cudaStream_t s);
// dys[r] = weight dy[t]; dweight[t, j] = <dy[t], ys[r]>, 0 for a dropped slot.
cudaError_t combine_backward(const bf* ys, const bf* dy, const int* slot_row, const float* weight,
                             int T, int k, int d, bf* dys, float* dweight, cudaStream_t s);
// dlogits from dweight, the balance term dbal [E] and the z-loss scale; see router.h.
cudaError_t router_backward(const float* probs, const float* lse, const int* expert,
                            const float* weight, const float* dweight, const float* dbal,
                            float z_scale, int T, int E, int k, bool renorm, float* dprobs,
                            bf* dlogits, cudaStream_t s);
// dx[t] += sum_j dxs[slot_row[t k + j]]. dxs: [n, d], dx: [T, d], f32.
cudaError_t gather_add_rows(const float* dxs, const int* slot_row, int T, int k, int d, float* dx,
                            cudaStream_t s);
cudaError_t f32_to_bf16(const float* in, size_t n, bf* out, cudaStream_t s);

}  // namespace sy::cuda
