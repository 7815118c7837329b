#!/usr/bin/env python3
"""Plots the training and validation loss of several Switchyard runs in one SVG, read from
their checkpoints' metadata (the `history` JSON every checkpoint carries), and prints a
Markdown table of the validation losses. Standard library only.

    python3 tools/plot_runs.py --out docs/precision_loss.svg \
        f32=runs/q-f32/checkpoint.safetensors bf16=runs/q-bf16/checkpoint.safetensors
"""
import argparse
import json
import struct

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def read_metadata(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return header.get("__metadata__", {})


def polyline(points, sx, sy, color, width, dash=""):
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{extra} points="{pts}"/>'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="label=checkpoint.safetensors")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="austen-moe, 500 steps: f32 and bf16 compute")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, path = spec.split("=", 1)
        meta = read_metadata(path)
        hist = json.loads(meta["history"])
        train = [(s["step"], s["loss"]) for s in hist["steps"]]
        val = [(e["step"], e["val_loss"]) for e in hist["evals"]]
        runs.append((label, meta.get("kernels", "?"), train, val))
    steps = max(p[0] for _, _, t, _ in runs for p in t)
    ys = [p[1] for _, _, t, v in runs for p in t + v]
    lo, hi = min(ys), min(max(ys), 3.5)
    W, H, L, R, T, B = 720, 420, 60, 20, 40, 50
    sx = lambda x: L + (W - L - R) * x / steps
    sy = lambda y: T + (H - T - B) * (hi - min(y, hi)) / (hi - lo)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{args.title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(6):
        y = lo + (hi - lo) * i / 5
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>')
    for i in range(6):
        x = steps * i / 5
        out.append(f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{int(x)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">loss (nats/byte)</text>')
    for i, (label, kernels, train, val) in enumerate(runs):
        c = COLORS[i % len(COLORS)]
        out.append(polyline(train, sx, sy, c, 1, "3,3"))
        out.append(polyline(val, sx, sy, c, 2))
        out.append(f'<text x="{W - R - 250}" y="{T + 20 + 18 * i}" fill="{c}">{label}: val (solid), train (dashed)</text>')
    out.append("</svg>")
    with open(args.out, "w") as fh:
        fh.write("\n".join(out) + "\n")
    print("| step | " + " | ".join(f"{label} val" for label, *_ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    evals = [dict(v) for *_, v in runs]
    for step in sorted(evals[0]):
        if step % 100 == 0 or step == max(evals[0]):
            print(f"| {step} | " + " | ".join(f"{e.get(step, float('nan')):.4f}" for e in evals) + " |")
    for label, kernels, _, val in runs:
        print(f"{label}: kernels {kernels}, final val {val[-1][1]:.4f}")


if __name__ == "__main__":
    main()
