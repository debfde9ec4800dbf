"""Every benchmark in bench/, one after the other, then one summary table.

Each benchmark runs as its own program (each starts and stops what it needs:
Postfix instances, milters, moto, scanners) with the arguments its section of
bench/README.md uses; its whole output is shown as it comes. The summary at
the end takes the headline figures from those outputs and sets them beside
the goals. The machine and its load average are printed before and after.
Not run: bench/fuzz.py (a fuzzing run, not a measurement).

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/run_all.py            # about 15 min
    ... --quick                   # every benchmark in a short form (about 5 min), to try it
    ... --only throughput,drain   # some of them

Needs root (Postfix), like the benchmarks themselves. Exit status 1 if a
benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine

BENCH = Path(__file__).resolve().parent


@dataclass
class Bench:
    name: str
    argv: list[str]
    quick: list[str]
    summary: Callable[[str], list[tuple[str, str, str]]]  # output -> (figure, value, goal)
    output: str = ""
    status: str = "not run"
    seconds: float = 0.0
    rows: list[tuple[str, str, str]] = field(default_factory=list)


def _table_rows(out: str, head: str) -> list[list[str]]:
    """The '|'-separated rows of the table whose header line starts with `head`."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(head) and "|" in line:
            rows = []
            for row in lines[i + 1:]:
                if set(row.strip()) <= {"-"} and row.strip():
                    continue  # the rule under the header
                if "|" not in row:
                    break
                cells = [c.strip() for c in row.split("|")]
                if cells[0]:
                    rows.append(cells)
            return rows
    return []


def s_throughput(out: str) -> list[tuple[str, str, str]]:
    rows = []
    for c in _table_rows(out, "sessions"):
        rows.append((f"{c[0]} sessions: msg/s Postfix / no-op / mxrules",
                     f"{c[1]} / {c[2]} / {c[3]}", ""))
        goal = "≥ 0.85 and ≥ 0.5" if c[0] == "20" else ""
        rows.append((f"{c[0]} sessions: mxrules/no-op, mxrules/Postfix", f"{c[4]}, {c[5]}", goal))
    return rows


def s_decision(out: str) -> list[tuple[str, str, str]]:
    return [(f"{c[0]}: p50 / p99 µs", f"{c[1]} / {c[2]}", "") for c in _table_rows(out, "case")]


def s_memory(out: str) -> list[tuple[str, str, str]]:
    m = re.search(r"^(\d+ x \d+ MB) message\(s\), (\d+) at a time(, scans on)?", out, re.M)
    g = re.search(r"growth: ([\d.]+) MiB", out)
    what = f"{m.group(1)}, {m.group(2)} at a time{m.group(3) or ''}" if m else "?"
    goal = "< 10 MB" if what.startswith("1 x 30 MB, 1 ") else ""
    if what.endswith("scans on"):
        goal = "≤ 64 MiB"
    return [(f"milter peak RSS growth, {what}", f"{g.group(1)} MiB" if g else "?", goal)]


def s_scan(out: str) -> list[tuple[str, str, str]]:
    m = re.search(r"^added by scans\s+(-?[\d.]+)\s+(-?[\d.]+)", out, re.M)
    return [("end of data added by scans, p50 / p99 ms",
             f"{m.group(1)} / {m.group(2)}" if m else "?", "")]


def s_auth(out: str) -> list[tuple[str, str, str]]:
    rows = [(f"end of data added by auth, {c[0]}: p50 / p99 ms", f"{c[2]} / {c[3]}", "")
            for c in _table_rows(out, "workload") if c[1] == "+"]
    rows += [(f"{c[0]} sessions: msg/s auth off / on, on/off", f"{c[1]} / {c[2]}, {c[3]}", "")
             for c in _table_rows(out, "sessions")]
    return rows


def s_worker(out: str) -> list[tuple[str, str, str]]:
    return [(f"worker/boto3 jobs/s at T={c[0]}", f"{c[2]} / {c[1]} = {c[3]}", "≥ 0.8")
            for c in _table_rows(out, "T |")]


def s_drain(out: str) -> list[tuple[str, str, str]]:
    rows = _table_rows(out, "outage")
    rows = [c for c in rows if c[0].replace(".", "").isdigit()]
    if not rows:
        return [("drain after an outage", "?", "")]
    c = rows[0]
    return [(f"{c[0]} s outage: backlog, drain time", f"{c[1]} jobs, {c[2]} s", ""),
            ("drain rate vs intake (jobs/s)", f"{c[4]} vs {c[5]} = x{c[6]}", ""),
            ("accepted, lost, dead-lettered", f"{c[7]}, {c[10]}, {c[11]}", "0 lost")]


BENCHES = [
    Bench("throughput", ["bench_throughput.py"],
          ["--messages", "300", "--repeats", "1", "--chart", "/tmp/mxrules-throughput-quick.png"],
          s_throughput),
    Bench("decision", ["bench_decision.py"], ["--calls", "2000"], s_decision),
    Bench("memory-1", ["bench_memory.py", "--size", "30", "--count", "1"], [], s_memory),
    Bench("memory-10", ["bench_memory.py", "--size", "30", "--count", "10", "--parallel", "10"],
          [], s_memory),
    Bench("memory-scan", ["bench_memory.py", "--scan", "--size", "10", "--count", "10",
                          "--parallel", "10"], [], s_memory),
    Bench("scan", ["bench_scan.py", "--count", "500"], ["--count", "30"], s_scan),
    Bench("auth", ["bench_auth.py"],
          ["--count", "30", "--messages", "200", "--repeats", "1"], s_auth),
    Bench("worker", ["bench_worker.py"], ["--jobs", "200", "--repeats", "1"], s_worker),
    Bench("drain", ["bench_drain.py"], ["--quick"], s_drain),
]


def run(bench: Bench, quick: bool) -> None:
    argv = [sys.executable, str(BENCH / bench.argv[0]), *bench.argv[1:],
            *(bench.quick if quick else [])]
    print(f"\n=== {bench.name}: {' '.join(argv[1:])}  ({machine.load()})", flush=True)
    t0 = time.monotonic()
    # Its own process group: Ctrl-C reaches it once, from us, and it cleans up itself.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONSAFEPATH": "1"}, text=True,
                            start_new_session=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # its KeyboardInterrupt stops its Postfix etc.
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    bench.seconds = time.monotonic() - t0
    bench.output = "".join(lines)
    bench.status = "ok" if code == 0 else f"failed (exit {code})"
    try:
        bench.rows = bench.summary(bench.output)
    except (IndexError, AttributeError, ValueError):
        bench.rows = [("(figures not found in the output above)", "", "")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short forms, to try the command")
    ap.add_argument("--only", default="", help="comma-separated names: "
                    + ",".join(b.name for b in BENCHES))
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    unknown = only - {b.name for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    chosen = [b for b in BENCHES if not only or b.name in only]

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # stops the running benchmark the same way as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)

    for line in machine.describe():
        print(line)
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {machine.load()}", flush=True)
    try:
        for bench in chosen:
            run(bench, args.quick)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    print(f"\n=== summary{' (--quick)' if args.quick else ''}")
    for line in machine.describe():
        print(line)
    print(f"end: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {machine.load()}")
    w1 = max(len(f) for b in chosen for f, _, _ in b.rows or [("", "", "")]) + 2
    w2 = max([len(v) for b in chosen for _, v, _ in b.rows] + [5]) + 2
    print(f"{'benchmark':<12} | {'figure':<{w1}} | {'value':<{w2}} | goal")
    print("-" * (12 + w1 + w2 + 20))
    for b in chosen:
        if b.status != "ok":
            print(f"{b.name:<12} | {b.status:<{w1}} | {'':<{w2}} |")
        for figure, value, goal in b.rows:
            print(f"{b.name:<12} | {figure:<{w1}} | {value:<{w2}} | {goal}")
    print("times: " + ", ".join(f"{b.name} {b.seconds:.0f}s" for b in chosen))
    return 0 if all(b.status == "ok" for b in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
