#!/usr/bin/env python3
"""The fashion-vit (and fashion-vmoe) model written plainly in PyTorch: the reference for
Switchyard's vision training speed (docs/vision.md, bench/README.md).

Same architecture and shapes as configs/fashion-vit.json: 4x4 patches of a 28x28 image through a
linear embedding, learned positions, pre-norm blocks of bidirectional multi-head attention (no
RoPE) and a SwiGLU feed-forward (dense, or with --moe the last two blocks an MoE of 8 SwiGLU
experts of width 96, softmax top-2 router, renormalised, loop over experts with index_add),
RMSNorm, mean pooling, linear head, cross-entropy; AdamW and gradient clipping. Inputs are random
images of the right shape (the data pipeline is not what is timed), the same each step.

    python3 bench/torch_vit.py [--threads 2] [--steps 20] [--batch 128] [--moe]
                               [--precision f32|bf16] [--json out.json]

--precision bf16 runs the steps under torch.autocast("cpu", dtype=torch.bfloat16), as PyTorch
users train in mixed precision on CPU. Not part of the build or the tests (scripts/bench_env.sh
installs torch into .venv-bench).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.g = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.g


class Attention(torch.nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.h, self.dh = n_heads, d // n_heads
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, d))


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Moe(torch.nn.Module):
    def __init__(self, d, f, n_experts, k):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(SwiGLU(d, f) for _ in range(n_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                y.index_add_(0, rows, expert(x[rows]) * w[rows, slot, None])
        return y.reshape(shape)


class Block(torch.nn.Module):
    def __init__(self, d, n_heads, ffn):
        super().__init__()
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, n_heads)
        self.ffn = ffn

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.ffn(self.n2(x))


class Vit(torch.nn.Module):
    def __init__(self, moe, d=96, n_layers=4, n_heads=4, d_ff=192, patch=4, image=28, classes=10):
        super().__init__()
        self.patch = patch
        n = (image // patch) ** 2
        self.embed = torch.nn.Linear(patch * patch, d)
        self.pos = torch.nn.Parameter(torch.randn(n, d) * 0.02)
        self.blocks = torch.nn.ModuleList(
            Block(d, n_heads, Moe(d, d_ff // 2, 8, 2) if moe and i >= n_layers - 2 else SwiGLU(d, d_ff))
            for i in range(n_layers))
        self.norm = RMSNorm(d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, images):  # [B, 28, 28]
        B, H, W = images.shape
        p = self.patch
        x = images.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
        x = self.embed(x) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    model = Vit(a.moe)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    images = torch.randn(a.batch, 28, 28)
    labels = torch.randint(0, 10, (a.batch,))
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"model": "fashion-vmoe" if a.moe else "fashion-vit", "precision": a.precision,
           "threads": a.threads, "batch": a.batch, "step_s_median": med,
           "images_per_s": a.batch / med, "torch": torch.__version__}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
