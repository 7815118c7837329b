#!/usr/bin/env python3
"""Extracts Jane Austen's six novels from Debian's r-cran-janeaustenr into data/austen.txt.gz.

The package stores them in Rdata.rdb: six zlib streams, each a 4-byte big-endian length and an
R XDR serialisation of a character vector (one element per line of the book). R is not needed.

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb x
    python3 tools/extract_austen.py x/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb data/

The novels are concatenated in the package's order (which the train/validation split relies on:
the last novel, Sense and Sensibility, ends the file) and written gzip'd with a fixed mtime so
that the output is byte-for-byte reproducible.
"""
import gzip
import hashlib
import os
import struct
import sys
import zlib

NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
          "sensesensibility"]


def read_character_vector(blob: bytes) -> list[str]:
    if blob[:2] != b"X\n":
        raise ValueError("not an R XDR serialisation")
    pos = 2
    (version,) = struct.unpack(">i", blob[pos:pos + 4])
    pos += 12  # version, writer version, minimal reader version
    if version == 3:  # native encoding name
        (n,) = struct.unpack(">i", blob[pos:pos + 4])
        pos += 4 + n
    flags, count = struct.unpack(">ii", blob[pos:pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP = 16), found type {flags & 0xFF}")
    lines = []
    for _ in range(count):
        _, length = struct.unpack(">ii", blob[pos:pos + 8])
        pos += 8
        if length < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(blob[pos:pos + length].decode("utf-8"))
        pos += length
    return lines


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: extract_austen.py Rdata.rdb OUTDIR")
    raw = open(sys.argv[1], "rb").read()
    pos, text = 0, []
    for name in NOVELS:
        pos += 4
        stream = zlib.decompressobj()
        blob = stream.decompress(raw[pos:])
        pos = len(raw) - len(stream.unused_data)
        lines = read_character_vector(blob)
        text.append("\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} lines, {len(text[-1].encode())} bytes")
    data = "".join(text).encode("utf-8")
    os.makedirs(sys.argv[2], exist_ok=True)
    out = os.path.join(sys.argv[2], "austen.txt.gz")
    with open(out, "wb") as f, gzip.GzipFile(filename="austen.txt", mode="wb", fileobj=f,
                                             compresslevel=9, mtime=0) as gz:
        gz.write(data)
    print(f"{out}: {len(data)} bytes of text, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
