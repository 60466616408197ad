"""Time and peak memory of tokenising one long string through the worker's text encoder.

    python dev/tokenizer_cost.py [--mib 1 4] [--kind prose|spaces|longword] [--requests 1]

Each case runs in a fresh child process (peak RSS, ``ru_maxrss``, only grows): the child loads
``models/minilm`` (``make minilm``), warms the encoder up, then encodes ``--requests`` requests
of one string of the given size together (as one tokenizer round does) and prints the seconds
it took, how much its peak RSS grew, the tokens kept of the first string and how many strings
the replies would count as truncated. ``prose`` is the bench corpus repeated; ``spaces`` is
whitespace with a few words at the end; ``longword`` is one run of letters with no separator.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def text(kind: str, size: int) -> str:
    """A string of about ``size`` UTF-8 bytes."""
    if kind == "spaces":
        tail = " the end of a long gap"
        return " " * (size - len(tail)) + tail
    if kind == "longword":
        return "a" * size
    from worker.bench.corpus import paragraphs

    corpus = " ".join(paragraphs(200, seed=1))
    return (corpus * (size // len(corpus.encode()) + 1)).encode()[:size].decode("utf-8", "ignore")


def child(kind: str, size: int, requests: int) -> dict[str, float | int]:
    """Measure one case in this process."""
    from worker.text import TextEncoder

    folder = ROOT / "models" / "minilm" / "1"
    encoder = TextEncoder(folder / "tokenizer.json", max_length=256,
                          feeds=["input_ids", "attention_mask"])  # fmt: skip
    encoder.encode("text", np.array([b"warm up " * 64], dtype=object))
    strings = np.array([text(kind, size).encode()], dtype=object)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    done = encoder.encode_many([("text", strings)] * requests)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokenized = [t for t in done if not isinstance(t, Exception)]
    return {"seconds": seconds, "peak_rss_growth_mib": (after - before) / 1024,
            "tokens": tokenized[0].lengths[0],
            "truncated": sum(t.truncated for t in tokenized)}  # fmt: skip


def main() -> None:
    """Run each size in a child process and print a line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--kind", choices=["prose", "spaces", "longword"], default="prose")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.kind, args.child, args.requests)))
        return
    for mib in args.mib:
        size = int(mib * 1024 * 1024)
        out = subprocess.run(
            [sys.executable, __file__, "--kind", args.kind, "--requests", str(args.requests),
             "--child", str(size)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        ).stdout  # fmt: skip
        case = json.loads(out)
        print(f"{args.kind} {args.requests} x {mib:g} MiB: {case['seconds']:.3f} s, peak RSS "
              f"+{case['peak_rss_growth_mib']:.0f} MiB, {case['tokens']} tokens, "
              f"truncated {case['truncated']}")  # fmt: skip


if __name__ == "__main__":
    main()
