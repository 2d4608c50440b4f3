#!/usr/bin/env python3
"""Pools the rounds of several runs of benches/rpc-h2load.sh.

One run's median ratio moves by several hundredths on a shared machine; the
per-round ratios of many runs (each round's targets ran back to back) say more.
Prints, per run, the median ratio to the gateway's Health, then the median of
all rounds with a bootstrap 95% interval (fixed seed: the same files give the
same figures).

usage: benches/rpc-h2load.sh 100000 11 50 10 > run1.txt; ...
       benches/rpc-h2load-pool.py run1.txt run2.txt ...
"""

import random
import re
import statistics
import sys

TARGETS = ("get-token", "validate")


def rounds(path):
    """The rounds of one run: {target: req/s} each."""
    found = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("== round"):
                found.append({})
            m = re.match(r"(\S+) rps=(\d+)", line)
            if m and found:
                found[-1][m.group(1)] = int(m.group(2))
    return [r for r in found if "health" in r and all(t in r for t in TARGETS)]


def main(paths):
    if not paths:
        sys.exit(__doc__)
    pooled = {t: [] for t in TARGETS}
    for path in paths:
        rs = rounds(path)
        if not rs:
            sys.exit(f"{path}: no complete round")
        ratios = {t: [r[t] / r["health"] for r in rs] for t in TARGETS}
        health = [r["health"] for r in rs]
        print(
            f"{path}: {len(rs)} rounds, health {min(health)}-{max(health)} req/s, "
            + ", ".join(f"{t} {statistics.median(v):.3f}x" for t, v in ratios.items())
        )
        for t in TARGETS:
            pooled[t] += ratios[t]
    rng = random.Random(1)
    for t, v in pooled.items():
        boot = sorted(statistics.median(rng.choices(v, k=len(v))) for _ in range(4000))
        print(
            f"{t}: {len(v)} rounds pooled, median {statistics.median(v):.3f}x "
            f"(bootstrap 95%: {boot[100]:.3f}-{boot[3899]:.3f}), mean {statistics.mean(v):.3f}x"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
