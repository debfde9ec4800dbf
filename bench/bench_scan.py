"""Added end-of-data latency with every scan on (spamd, clamd, SPF/DKIM/DMARC).

Starts a throwaway Postfix on loopback with the real `mxrules milter`, real
spamd and clamd (test signature database only) and a local DNS server, then
sends N messages to a rule with scan_enabled and N to one without,
interleaved, timing the client's DATA command (which ends when Postfix has
the milter's end-of-data answer).  Prints p50/p99 for both and the difference.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_scan.py --count 500
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.dns import DnsServer
from harness.fixtures import instance_dir
from harness.mxrules_proc import MilterProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.scanners import Clamd, Spamd
from harness.sink import SmtpSink
from harness.smtp import Client
from harness.stack import write_config

CLIENT = "192.0.2.7"
RULES = [
    {"name": "scanned", "enabled": True, "scan_enabled": True, "recipients": ["scan@example.com"]},
    {"name": "plain", "enabled": True, "recipients": ["plain@example.com"]},
]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def data_time(port: int, rcpt: str, i: int) -> float:
    body = (f"From: <a@sender.test>\r\nTo: <{rcpt}>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}-{time.time_ns()}@sender.test>\r\n\r\n"
            + "An ordinary line of text for the scanners to read.\r\n" * 40).encode()
    with Client("127.0.0.1", port) as c:
        c.ehlo()
        c.xclient(CLIENT)
        c.mail("a@sender.test")
        c.rcpt(rcpt)
        started = time.perf_counter()
        reply = c.data(body)
        elapsed = time.perf_counter() - started
        assert reply[0] == 250, reply
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="messages of each kind")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mxrules-bench-scan-"))
    spamd, clamd = Spamd(work / "spamd"), Clamd(work / "clamd")
    dns = DnsServer({"sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]}})
    sink = SmtpSink()
    milter = postfix = None
    try:
        for server in (spamd, clamd, dns, sink):
            server.start()
        port = free_port()
        cfg = write_config(work, port=port, rules=RULES, scan={
            "spam": {"engine": "spamd", "address": spamd.address},
            "virus": {"engine": "clamd", "address": clamd.address},
            "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 30,
            # SPF/DKIM/DMARC with the scans only, so "scans off" is no check at all,
            # as in the runs recorded before they ran on every message (bench_auth.py).
            "authentication": "scan_enabled"})
        milter = MilterProcess(cfg, port, work / "milter.log")
        milter.start()
        postfix = Postfix(workdir=instance_dir(), smtp_port=free_port(),
                          milter=milter.postfix_spec, relay_port=sink.port)
        postfix.start()
        for i in range(5):  # warm up both paths (spamd loads its rules lazily)
            data_time(postfix.smtp_port, "scan@example.com", i)
            data_time(postfix.smtp_port, "plain@example.com", i)
        on: list[float] = []
        off: list[float] = []
        for i in range(args.count):
            on.append(data_time(postfix.smtp_port, "scan@example.com", i))
            off.append(data_time(postfix.smtp_port, "plain@example.com", i))
        ms = 1000.0
        print(f"machine: {platform.machine()}, CPython {platform.python_version()}; "
              f"{args.count} messages of each kind, interleaved, one session at a time")
        print(f"{'':14}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for name, values in (("scans on", on), ("scans off", off)):
            print(f"{name:14}{percentile(values, 50) * ms:10.1f}{percentile(values, 99) * ms:10.1f}"
                  f"{statistics.mean(values) * ms:10.1f}")
        print(f"{'added by scans':14}{(percentile(on, 50) - percentile(off, 50)) * ms:10.1f}"
              f"{(percentile(on, 99) - percentile(off, 99)) * ms:10.1f}"
              f"{(statistics.mean(on) - statistics.mean(off)) * ms:10.1f}")
    finally:
        for proc in (postfix, milter):
            if proc is not None:
                proc.stop()
        for server in (sink, dns, clamd, spamd):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
