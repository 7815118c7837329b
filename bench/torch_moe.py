"""The MoE block as users commonly write it in PyTorch (loop over experts, index_add), timed on
the GPU beside `switchyard bench moe --device cuda`: same shapes, bf16, dropless, softmax
top-k with renormalisation, SwiGLU experts. Median of CUDA-event timings after warm-up.

    python3 bench/torch_moe.py [--shape A M ...] [--json out.json]
"""
import argparse
import json

import torch

SHAPES = {  # name: (T, d, f, E, k), as in src/cli/bench_moe.cpp
    "A": (4096, 512, 1024, 8, 2),
    "B": (4096, 1024, 512, 64, 8),
    "C1": (1, 1024, 3584, 8, 2),
    "C16": (16, 1024, 3584, 8, 2),
    "M": (16384, 4096, 14336, 8, 2),
    "X": (16384, 2048, 1024, 64, 8),
}


class MoeBlock(torch.nn.Module):
    def __init__(self, d, f, E, k):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Parameter(torch.randn(d, E) / d**0.5)
        self.w1 = torch.nn.Parameter(torch.randn(E, d, f) / d**0.5)
        self.w3 = torch.nn.Parameter(torch.randn(E, d, f) / d**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(E, f, d) / f**0.5)

    def forward(self, x):
        probs = torch.softmax((x @ self.gate).float(), dim=-1)
        weight, expert = probs.topk(self.k, dim=-1)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = (expert == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            xs = x[token]
            h = torch.nn.functional.silu(xs @ self.w1[e]) * (xs @ self.w3[e])
            y.index_add_(0, token, (h @ self.w2[e]) * weight[token, slot, None])
        return y


def median_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="*", default=list(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(1)
    rows = []
    for name in args.shape:
        T, d, f, E, k = SHAPES[name]
        block = MoeBlock(d, f, E, k).cuda().to(torch.bfloat16)
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
        fwd = median_ms(lambda: block(x), args.iters)

        def step():
            block(x).backward(dy)

        fwd_bwd = median_ms(step, args.iters)
        flops = 6.0 * T * k * d * f + 2.0 * T * d * E
        rows.append({"shape": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                     "fwd_gflops": flops / fwd / 1e6, "fwd_bwd_gflops": 3 * flops / fwd_bwd / 1e6})
        print(f"torch {name:<4} T={T:<6} d={d:<5} f={f:<6} E={E:<3} k={k}  fwd {fwd:9.3f} ms "
              f"{flops / fwd / 1e9:8.1f} TF/s  fwd+bwd {fwd_bwd:9.3f} ms", flush=True)
        del block, x, dy
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
