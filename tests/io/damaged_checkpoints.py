#!/usr/bin/env python3
"""Damaged checkpoints through the command line, as a user would meet them.

Trains a tiny checkpoint with `switchyard train`, then makes damaged copies of it (truncation,
bad headers, wrong dtypes, shapes, offsets and metadata, a flipped bit in every tensor) and runs
`switchyard eval` and `switchyard generate` on each, and `switchyard train --resume` on a run
directory holding it. Each must end with exit status 1 (never a signal), print an error that
names the file and what is wrong, and leave every file as it was.

Usage: damaged_checkpoints.py SWITCHYARD WORKDIR
Prints one line per case and "N passed, M failed" last; exits 1 if any failed.
"""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys


def split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data):
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data


def unchecked(header):
    """The header as a version-1 file (before checksums) would have it: the deeper checks run."""
    meta = header["__metadata__"]
    meta.pop("switchyard.xxh3_64", None)
    meta["version"] = "1"
    return header


def tensor_names(header):
    return sorted(k for k in header if k != "__metadata__")


def cases(good):
    header, data = split(good)
    names = tensor_names(header)
    first = names[0]
    model = next(k for k in names if k.startswith("model."))  # what eval needs too

    def edit(fn, version1=False):
        h = json.loads(json.dumps(header))
        if version1:
            unchecked(h)
        fn(h)
        return join(h, data)

    def set_meta(key, value, version1=True):
        return edit(lambda h: h["__metadata__"].__setitem__(key, value), version1)

    def set_entry(name, key, value, version1=False):
        return edit(lambda h: h[name].__setitem__(key, value), version1)

    n = struct.unpack("<Q", good[:8])[0]
    out = [
        ("empty file", b"", "expected at least 8"),
        ("7 bytes", good[:7], "expected at least 8"),
        ("truncated in the header", good[:8 + n // 2], "header length"),
        ("truncated in the data", good[:len(good) - len(data) // 2], "truncated?"),
        ("one byte short", good[:-1], "truncated?"),
        ("header length 2^62", struct.pack("<Q", 1 << 62) + good[8:], "header length"),
        ("header not JSON", good[:8] + b"{" * n + data, "header is not JSON"),
        ("header a JSON array", join([], data), "not a JSON object"),
        ("unknown dtype", set_entry(first, "dtype", "F33"), "is not a safetensors dtype"),
        ("dtype of another size", set_entry(first, "dtype", "F64"), "truncated?"),
        ("dtype of the same size", set_entry(first, "dtype", "I32"), "expected F32, F64 or BF16"),
        ("negative dim", set_entry(first, "shape", [-1, 4]), "dim -1"),
        ("2^42 elements", set_entry(first, "shape", [1 << 21, 1 << 21]), "truncated?"),
        ("shape overflowing 64 bits", set_entry(first, "shape", [1 << 40, 1 << 40]),
         "overflows 64 bits"),
        ("rank 9", set_entry(first, "shape", [1] * 9), "rank 9"),
        ("shape transposed", edit(lambda h: h[first].__setitem__("shape", h[first]["shape"][::-1])),
         "fails its checksum"),
        ("offsets past the end", set_entry(first, "data_offsets", [len(data), len(data) + 4]),
         "truncated?"),
        ("offsets reversed", edit(lambda h: h[first].__setitem__(
            "data_offsets", h[first]["data_offsets"][::-1])), "truncated?"),
        ("offsets overlapping", edit(lambda h: h[names[1]].__setitem__(
            "data_offsets", [h[names[1]]["data_offsets"][0] - 4, h[names[1]]["data_offsets"][1] - 4])),
         "overlap"),
        ("offsets not numbers", set_entry(first, "data_offsets", ["a", "b"]), "malformed"),
        ("no format", edit(lambda h: h["__metadata__"].pop("format"), True),
         "metadata has no \"format\""),
        ("foreign format", set_meta("format", "pt"), "expected \"switchyard-lm\""),
        ("version 99", set_meta("version", "99"), "this build reads versions"),
        ("checksums stripped", edit(lambda h: h["__metadata__"].pop("switchyard.xxh3_64")),
         "without its checksums"),
        ("checksum table not JSON", set_meta("switchyard.xxh3_64", "{", False), "is not JSON"),
        ("a history digit changed", set_meta("history", header["__metadata__"]["history"].replace(
            "1", "2", 1), False), "metadata fails its checksum"),
        ("config not JSON", set_meta("config", "{"), "stored config invalid"),
        ("config of another model", set_meta("model_hash", "0123456789abcdef"), "altered"),
        ("history malformed", set_meta("history", "[]"), "training history malformed"),
        ("step not a count", set_meta("step", "-3"), "expected a count"),
        ("tensor missing", edit(lambda h: h.pop(model), True), f"tensor {model} missing"),
        ("tensor extra", edit(lambda h: h.__setitem__("model.extra", dict(h[model])), True),
         "overlap"),
        ("tensor renamed", edit(lambda h: h.__setitem__("model.extra", h.pop(model)), True),
         f"tensor {model} missing"),
        ("checksum of a missing tensor", edit(lambda h: h.pop(model)),
         f"checksum for {model}, which is not in the file"),
    ]
    # A flipped bit in every tensor's data, at a spot that differs per tensor.
    for i, name in enumerate(names):
        b, e = header[name]["data_offsets"]
        if e == b:
            continue
        flipped = bytearray(good)
        flipped[8 + n + b + (e - b) * (i % 7 + 1) // 8] ^= 1 << (i % 8)
        out.append((f"bit flipped in {name}", bytes(flipped), f"tensor {name} fails its checksum"))
    return out


def digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main():
    exe, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    tiny = ["--set", "model.d_model=8", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
            "--set", "model.moe.d_ff=8", "--set", "model.d_ff=8", "--set", "model.context=16"]
    run = os.path.join(work, "good")
    r = subprocess.run([exe, "train", "--steps", "2", "--threads", "1", "--out", run] + tiny,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        sys.exit("could not train the tiny checkpoint")
    with open(os.path.join(run, "checkpoint.safetensors"), "rb") as f:
        good = f.read()

    passed = failed = 0
    for i, (what, blob, expect) in enumerate(cases(good)):
        d = os.path.join(work, f"case{i:02d}")
        os.makedirs(d)
        path = os.path.join(d, "checkpoint.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        before = digest_tree(d)
        commands = [
            [exe, "eval", "--checkpoint", path, "--max-tokens", "64", "--threads", "1"],
            [exe, "generate", "--checkpoint", path, "--tokens", "4", "--threads", "1"],
            [exe, "train", "--resume", "--out", d, "--steps", "4", "--threads", "1"] + tiny,
        ]
        problems = []
        for cmd in commands:
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                               timeout=120)
            err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            if r.returncode < 0:
                problems.append(f"{cmd[1]}: killed by {signal.Signals(-r.returncode).name}")
            elif r.returncode != 1:
                problems.append(f"{cmd[1]}: exit {r.returncode}, expected 1 ({err!r})")
            elif "checkpoint.safetensors" not in err or expect not in err:
                problems.append(f"{cmd[1]}: error {err!r} does not name the file and {expect!r}")
        if digest_tree(d) != before:
            problems.append("files changed on disk")
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {what}: {expect}" + "".join(f"\n     {p}" for p in problems))
        passed += not problems
        failed += bool(problems)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
