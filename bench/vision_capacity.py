#!/usr/bin/env python3
"""V-MoE's capacity experiment: a per-token MoE vision checkpoint (fashion-vmoe) evaluated on the
test set at several expert capacity factors, with and without batch prioritized routing, by
`switchyard eval --set`. Writes a CSV and an SVG plot (no plotting library needed).

    python3 bench/vision_capacity.py --checkpoint runs/fashion-vmoe-s1 [--out docs/vision-capacity]
"""
import argparse
import re
import subprocess

# V-MoE's factors, and two lower ones where dropping bites harder.
FACTORS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0]


def accuracy(binary, checkpoint, factor, bpr, threads):
    out = subprocess.run(
        [binary, "eval", "--checkpoint", checkpoint, "--threads", str(threads),
         "--set", f"model.moe.capacity_factor_eval={factor}",
         "--set", f"model.moe.batch_prioritized={'true' if bpr else 'false'}"],
        check=True, capture_output=True, text=True).stdout
    return float(re.search(r"accuracy ([0-9.]+)%", out).group(1))


def svg(rows):
    w, h, left, top, right, bottom = 520, 340, 60, 30, 20, 50
    accs = [a for r in rows for a in r[1:]]
    lo, hi = min(accs) - 1, max(accs) + 1
    x = lambda f: left + (f - FACTORS[0]) / (FACTORS[-1] - FACTORS[0]) * (w - left - right)
    y = lambda a: top + (hi - a) / (hi - lo) * (h - top - bottom)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="18">fashion-vmoe test accuracy against eval capacity factor</text>']
    for f in FACTORS:
        parts.append(f'<line x1="{x(f):.1f}" y1="{h - bottom}" x2="{x(f):.1f}" y2="{h - bottom + 5}" stroke="black"/>'
                     f'<text x="{x(f):.1f}" y="{h - bottom + 18}" text-anchor="middle">{f}</text>')
    for i in range(6):
        a = lo + (hi - lo) * i / 5
        parts.append(f'<text x="{left - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.1f}</text>'
                     f'<line x1="{left}" y1="{y(a):.1f}" x2="{w - right}" y2="{y(a):.1f}" stroke="#ddd"/>')
    for col, name, colour in [(1, "batch prioritized", "#0044cc"), (2, "token order", "#cc4400")]:
        pts = " ".join(f"{x(r[0]):.1f},{y(r[col]):.1f}" for r in rows)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(r[0]):.1f}" cy="{y(r[col]):.1f}" r="3" fill="{colour}"/>' for r in rows]
        parts.append(f'<text x="{w - right - 130}" y="{h - bottom - 20 - 16 * col}" fill="{colour}">{name}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">capacity factor</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--binary", default="build/switchyard")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="docs/vision-capacity")
    a = ap.parse_args()
    rows = [(f, accuracy(a.binary, a.checkpoint, f, True, a.threads),
             accuracy(a.binary, a.checkpoint, f, False, a.threads)) for f in FACTORS]
    with open(a.out + ".csv", "w") as f:
        f.write("capacity_factor,accuracy_bpr,accuracy_token_order\n")
        for r in rows:
            f.write(f"{r[0]},{r[1]:.2f},{r[2]:.2f}\n")
    with open(a.out + ".svg", "w") as f:
        f.write(svg(rows))
    for r in rows:
        print(f"capacity {r[0]:5}: BPR {r[1]:6.2f}%  token order {r[2]:6.2f}%")


if __name__ == "__main__":
    main()
