#!/usr/bin/env python3
"""The austen-moe model written plainly in PyTorch, as the reference for `switchyard bench train`.

Same architecture and shapes: byte embedding, pre-norm blocks of causal multi-head attention with
RoPE and an MoE SwiGLU feed-forward (softmax top-k router, renormalised, loop over experts with
index_add), final RMSNorm, LM head, cross-entropy; AdamW and gradient clipping. No capacity limit
(every routed token is computed), which is the usual plain implementation and slightly more work
than Switchyard's capacity factor 1.25 run (it drops a few percent of slots).

    python3 bench/torch_lm.py [--threads 2] [--steps 8] [--dense] [--precision f32|bf16]
                              [--json out.json]

--precision bf16 runs the steps under torch.autocast("cpu", dtype=torch.bfloat16): matmuls in
bf16, weights and optimizer state in f32, as PyTorch users train in mixed precision on CPU.
Runs on Debian's python3-torch (1.13) or the current one from PyPI (scripts/bench_env.sh);
not part of the build or the tests.
"""
import argparse
import json
import math
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


def rope(x, cos, sin):  # x: [B, H, L, dh], rotate pairs (i, i + dh/2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, d, n_heads, context):
        super().__init__()
        self.h, self.dh = n_heads, d // n_heads
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        pos = torch.arange(context, dtype=torch.float32)[:, None]
        freq = 10000.0 ** (-torch.arange(0, self.dh // 2, dtype=torch.float32) * 2 / self.dh)
        self.register_buffer("cos", torch.cos(pos * freq))
        self.register_buffer("sin", torch.sin(pos * freq))
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")), 1))

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k = rope(q, self.cos[:L], self.sin[:L]), rope(k, self.cos[:L], self.sin[:L])
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + self.mask[:L, :L]
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
        return self.o(o)


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(torch.nn.Module):
    def __init__(self, d, f, n_experts, top_k):
        super().__init__()
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(SwiGLU(d, f) for _ in range(n_experts))
        self.k = top_k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = logits.softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y.index_add_(0, tok, (expert(x[tok]) * w[tok, slot, None]).to(y.dtype))
        # Switch balance loss and z-loss, as in the Switchyard config.
        E = probs.shape[-1]
        frac = F.one_hot(idx, E).float().sum((0, 1)) / idx.numel()
        aux = 0.01 * E * (frac * probs.mean(0)).sum() + 0.001 * torch.logsumexp(logits, -1).pow(2).mean()
        return y.view(shape), aux


class Block(torch.nn.Module):
    def __init__(self, d, n_heads, context, dense, f_dense, f, n_experts, top_k):
        super().__init__()
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, n_heads, context)
        self.ffn = SwiGLU(d, f_dense) if dense else MoE(d, f, n_experts, top_k)
        self.dense = dense

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        if self.dense:
            return x + self.ffn(self.n2(x)), 0.0
        y, aux = self.ffn(self.n2(x))
        return x + y, aux


class LM(torch.nn.Module):
    def __init__(self, dense, V=256, context=256, d=256, layers=4, heads=4):
        super().__init__()
        self.embed = torch.nn.Embedding(V, d)
        self.blocks = torch.nn.ModuleList(
            Block(d, heads, context, dense, 1024, 512, 8, 2) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = torch.nn.Linear(d, V, bias=False)

    def forward(self, tokens, targets):
        x, aux = self.embed(tokens), 0.0
        for b in self.blocks:
            x, a = b(x)
            aux = aux + a
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dense", action="store_true", help="austen-dense instead of austen-moe")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(1)
    torch.set_num_threads(args.threads)
    model = LM(args.dense)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    B, L = 16, 256
    times = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, 256, (B, L + 1))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"torch": torch.__version__, "threads": args.threads, "model": "dense" if args.dense else "moe",
           "precision": args.precision,
           "step_median_s": med, "tokens_per_s": B * L / med}
    print(json.dumps(out))
    if args.json:
        json.dump(out, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
