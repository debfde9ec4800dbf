"""Fuzz run: the targets in tests/fuzz/targets.py, 100,000+ generated inputs in total.

Each target gets a share of --inputs (by its weight: slow targets fewer) and
runs under hypothesis with that many examples and no example database: a
failure is shrunk to a minimal input, printed, and counted; the run goes on
with the next target.  Every input runs under the targets' per-input time bound, so a
hang is reported as a failure too.  Prints one summary line per target.

    PYTHONSAFEPATH=1 .venv/bin/python bench/fuzz.py             # 100,000 inputs
    PYTHONSAFEPATH=1 .venv/bin/python bench/fuzz.py --inputs 5000 --only session
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fuzz.targets import TARGETS, TIME_BOUND, Target, cleanup, prepare, run_one
from hypothesis import HealthCheck, Phase, given, settings


def fuzz(target: Target, count: int) -> dict[str, Any]:
    seen = {"inputs": 0, "slowest": 0.0}

    @settings(max_examples=count, deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(value=target.strategy)
    def run(value: Any) -> None:
        seen["inputs"] += 1
        started = time.perf_counter()
        try:
            run_one(target, value)
        finally:
            seen["slowest"] = max(seen["slowest"], time.perf_counter() - started)

    started = time.monotonic()
    failure = ""
    try:
        run()
    except Exception as exc:  # a crash, a broken invariant or a hang, shrunk by hypothesis
        failure = "".join(traceback.format_exception_only(exc)).strip()
        print(f"\n{target.name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
    return {**seen, "seconds": time.monotonic() - started, "failure": failure}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000,
                        help="generated inputs in total, shared equally by the targets")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this target (repeatable)")
    args = parser.parse_args()
    targets = [t for t in TARGETS if not args.only or t.name in args.only]
    weights = sum(t.weight for t in targets)
    shares = {t.name: math.ceil(args.inputs * t.weight / weights) for t in targets}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"{len(targets)} targets, {sum(shares.values())} inputs, "
          f"per-input time bound {TIME_BOUND:.0f} s\n")
    prepare()
    rows = []
    try:
        for target in targets:
            result = fuzz(target, shares[target.name])
            rows.append((target, result))
            print(f"  {target.name:<13} {result['inputs']:>7} inputs  "
                  f"{result['seconds']:7.1f} s  {'FAILED' if result['failure'] else 'ok'}",
                  flush=True)
    finally:
        cleanup()
    total = sum(r["inputs"] for _, r in rows)
    seconds = sum(r["seconds"] for _, r in rows)
    failed = [t.name for t, r in rows if r["failure"]]
    print(f"\n{'target':<13} {'inputs':>8} {'failures':>8} {'seconds':>8} {'inputs/s':>9} "
          f"{'slowest':>9}  what")
    for target, r in rows:
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0.0
        print(f"{target.name:<13} {r['inputs']:>8} {int(bool(r['failure'])):>8} "
              f"{r['seconds']:>8.1f} {rate:>9.0f} {r['slowest'] * 1000:>7.0f}ms  {target.what}")
    print(f"{'total':<13} {total:>8} {len(failed):>8} {seconds:>8.1f}")
    for target, _ in rows:
        if target.notes:
            outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(
                target.notes.items(), key=lambda kv: -kv[1])[:8])
            print(f"  {target.name}: {outcomes}")
    for target, r in rows:
        if r["failure"]:
            print(f"\nFAILED {target.name}: {r['failure'][:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
