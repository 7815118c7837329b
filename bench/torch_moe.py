"""The MoE block as users commonly write it in PyTorch (loop over experts, index_add), timed
beside `switchyard bench moe`: same shapes, dropless, softmax top-k with renormalisation, SwiGLU
experts. On the GPU (default): bf16, median of CUDA-event timings. On the CPU (--device cpu):
f32, or bf16 autocast (--precision bf16: matmuls in bf16, f32 weights) as users run mixed
precision there, on --threads threads; median wall time after warm-up.

    python3 bench/torch_moe.py [--device cuda|cpu] [--precision f32|bf16] [--threads 2]
                               [--shape A M ...] [--json out.json]
"""
import argparse
import contextlib
import json
import time

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


def median_ms_cpu(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


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
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--precision", choices=["f32", "bf16"], default=None,
                    help="CPU only (GPU runs bf16): f32, or bf16 autocast")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(1)
    cpu = args.device == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
        args.shape = [s for s in args.shape if s not in ("M", "X")] if args.shape == list(SHAPES) else args.shape
    precision = args.precision or ("f32" if cpu else "bf16")
    timer = median_ms_cpu if cpu else median_ms
    rows = []
    for name in args.shape:
        T, d, f, E, k = SHAPES[name]
        if cpu:
            block = MoeBlock(d, f, E, k)
            x = torch.randn(T, d, requires_grad=True)
            dy = torch.randn(T, d)
            autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
                else contextlib.nullcontext
        else:
            block = MoeBlock(d, f, E, k).cuda().to(torch.bfloat16)
            x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
            autocast = contextlib.nullcontext

        def fwd_only():
            with torch.no_grad(), autocast():
                block(x)

        def step():
            with autocast():
                y = block(x)
            y.backward(dy.to(y.dtype))

        fwd = timer(fwd_only, args.iters)
        fwd_bwd = timer(step, args.iters)
        flops = 6.0 * T * k * d * f + 2.0 * T * d * E
        rows.append({"shape": name, "device": args.device, "precision": precision,
                     "threads": args.threads if cpu else None, "torch": torch.__version__,
                     "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                     "fwd_gflops": flops / fwd / 1e6, "fwd_bwd_gflops": 3 * flops / fwd_bwd / 1e6})
        print(f"torch {torch.__version__} {args.device} {precision} {name:<4} T={T:<6} d={d:<5} "
              f"f={f:<6} E={E:<3} k={k}  fwd {fwd:9.3f} ms {flops / fwd / 1e6:8.1f} GF/s  "
              f"fwd+bwd {fwd_bwd:9.3f} ms {3 * flops / fwd_bwd / 1e6:8.1f} GF/s", flush=True)
        del block, x, dy
        if not cpu:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
