"""Where a server process's time went, from the collapsed stacks of ``benchmarks/stack_sampler``.

    python benchmarks/stack_summary.py STACKS.PID.txt [...] [--top 30] [--thread NAME] [--within FUNC]

For each file (one process) and each thread (or the one named): the inclusive share of every function
(file and name, lines merged) and the self share of the innermost lines. A function's inclusive share is the
fraction of samples whose stack contains it, so nested functions add up to more than 100 %. ``--within FUNC``
keeps only the samples inside a function of that name (e.g. ``event_loop_overlap``: a scheduler's serving loop,
without its start-up).
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r" \(([^:()]+):\d+\)$")


def summarize(path: str, thread: str, top: int, within: str | None = None) -> str:
    inclusive: collections.Counter = collections.Counter()
    self_lines: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if frames[0] != thread or (within and not any(fr.startswith(within + " (") for fr in frames[1:])):
                continue
            n = int(n)
            total += n
            for fn in {_LINE.sub(r" (\1)", fr) for fr in frames[1:]}:
                inclusive[fn] += n
            self_lines[frames[-1]] += n
    where = f" within {within}" if within else ""
    if not total:
        return f"{path}: no samples of thread {thread}{where}\n"
    out = [f"{path}: {total} samples of thread {thread}{where}", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {fn}" for fn, n in inclusive.most_common(top)]
    out.append("self (innermost line):")
    out += [f"  {100 * n / total:5.1f}%  {fn}" for fn, n in self_lines.most_common(top)]
    return "\n".join(out) + "\n"


def threads(path: str) -> list[str]:
    """The file's threads, most samples first."""
    n: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n[stack.split(";", 1)[0]] += int(count)
    return [t for t, _ in n.most_common()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--thread", default=None, help="one thread's name (default: every thread)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--within", default=None, help="only samples inside a function of this name")
    a = p.parse_args(argv)
    for path in a.files:
        for thread in [a.thread] if a.thread else threads(path):
            text = summarize(path, thread, a.top, a.within)
            if not a.within or "no samples" not in text:
                print(text)


if __name__ == "__main__":
    main()
