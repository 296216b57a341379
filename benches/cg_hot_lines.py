#!/usr/bin/env python3
"""Code footprint per transaction from a callgrind profile.

Usage: benches/cg_hot_lines.py CALLGRIND_OUT TRANSACTIONS [--share 0.9] [--top 40]

The profile must be taken with `--dump-instr=yes --dump-line=no` (docs/benchmarks.md,
"Code footprint"). A 64-byte line of code counts as executed on every transaction when
one of its instructions ran at least SHARE x TRANSACTIONS times. Prints how many such
lines there are (what the transaction's path needs in the instruction cache, which
PostgreSQL and pgbench share on a small machine) and the functions that own the most.
"""
import argparse
import collections
import re


def parse(path):
    """Per instruction address: executions, and the function it belongs to."""
    counts = collections.Counter()
    owner = {}
    names = {}
    fn = "?"
    pos = 0
    skip_next = False
    name_re = re.compile(r"c?fn=\((\d+)\)(?: (.*))?")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith(("fn=", "cfn=")):
                m = name_re.match(line)
                if m:
                    if m.group(2):
                        names[m.group(1)] = m.group(2)
                    if line.startswith("fn="):
                        fn = names.get(m.group(1), "?")
                continue
            if line.startswith("calls="):
                # The next cost line is the call's inclusive cost, not this address's.
                skip_next = True
                continue
            if line[0] not in "0123456789+-*":
                continue
            fields = line.split()
            p = fields[0]
            if p.startswith("0x"):
                pos = int(p, 16)
            elif p[0] in "+-":
                delta = int(p[1:], 16) if p[1:].startswith("0x") else int(p[1:])
                pos += delta if p[0] == "+" else -delta
            if skip_next:
                skip_next = False
                continue
            if len(fields) > 1:
                counts[pos] += int(fields[1])
                owner[pos] = fn
    return counts, owner


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("transactions", type=int)
    ap.add_argument("--share", type=float, default=0.9)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    counts, owner = parse(a.profile)
    runs = collections.Counter()  # per line: the most executions of one instruction
    by_fn = {}
    for addr, n in counts.items():
        line = addr // 64
        runs[line] = max(runs[line], n)
        by_fn.setdefault(line, collections.Counter())[owner[addr]] += n
    hot = [line for line, n in runs.items() if n >= a.share * a.transactions]
    print(
        f"code lines executed on >= {a.share:.0%} of {a.transactions} transactions: "
        f"{len(hot)} ({len(hot) * 64 / 1024:.1f} KiB); "
        f"instructions per transaction: {sum(counts.values()) / a.transactions:.0f}"
    )
    per_fn = collections.Counter(by_fn[line].most_common(1)[0][0] for line in hot)
    for name, n in per_fn.most_common(a.top):
        print(f"{n:5d}  {name[:140]}")


if __name__ == "__main__":
    main()
