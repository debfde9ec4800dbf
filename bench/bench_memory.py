"""Milter memory while receiving large messages (peak RSS growth).

Starts a throwaway Postfix on loopback with the real `mxrules milter`, warms
it up with one small message, then sends N messages of SIZE MB (optionally
concurrently) and reports the milter's peak RSS (VmHWM) before and after.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_memory.py --size 30 --count 1
    ... --size 30 --count 10 --parallel 10      # 10 concurrent 30 MB messages
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.fixtures import instance_dir
from harness.mxrules_proc import MilterProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.sink import SmtpSink
from harness.smtp import send
from harness.stack import write_config


def vm(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def big_message(size_mb: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * (size_mb * 1024 * 1024 // len(line))
    head = (b"From: <a@sender.test>\r\nTo: <user@example.com>\r\nSubject: big\r\n"
            b"Message-ID: <big@sender.test>\r\n\r\n")
    return head + body


def measure(size_mb: int, count: int, parallel: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mxrules-bench-"))
    port = free_port()
    cfg = write_config(work, port=port, max_message_size=64 * 1024 * 1024)
    milter = MilterProcess(cfg, port, work / "milter.log")
    milter.start()
    sink = SmtpSink()
    sink.start()
    postfix = Postfix(workdir=instance_dir(), smtp_port=free_port(), milter=milter.postfix_spec,
                      relay_port=sink.port, extra={"message_size_limit": str(80 * 1024 * 1024)})
    postfix.start()
    try:
        assert milter.proc is not None
        pid = milter.proc.pid
        warm = send("127.0.0.1", postfix.smtp_port, "a@sender.test", ["user@example.com"],
                    big_message(0) + b"warm up\r\n")
        assert warm.data and warm.data[0] == 250, warm
        before = vm(pid, "VmHWM")
        msg = big_message(size_mb)
        results: list[int] = []

        def one() -> None:
            r = send("127.0.0.1", postfix.smtp_port, "a@sender.test", ["user@example.com"], msg)
            results.append(r.data[0] if r.data else -1)

        for start in range(0, count, parallel):
            threads = [threading.Thread(target=one) for _ in range(min(parallel, count - start))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        after = vm(pid, "VmHWM")
        assert results == [250] * count, results
        return {"before_kib": before, "after_kib": after, "growth_mib": (after - before) / 1024}
    finally:
        postfix.stop()
        milter.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(postfix.workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=30, help="message size in MB")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    r = measure(args.size, args.count, args.parallel)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}")
    print(f"{args.count} x {args.size} MB message(s), {args.parallel} at a time")
    print(f"milter peak RSS before: {r['before_kib'] / 1024:.1f} MiB, "
          f"after: {r['after_kib'] / 1024:.1f} MiB, growth: {r['growth_mib']:.2f} MiB")


if __name__ == "__main__":
    main()
