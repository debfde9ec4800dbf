"""Milter memory while receiving large messages (peak RSS growth).

Starts a throwaway Postfix on loopback with the real `mxrules milter`, warms
it up with one small message, then sends N messages of SIZE MB (optionally
concurrently) and reports the milter's peak RSS (VmHWM) before and after.

With --scan the rule has scan_enabled, real spamd and clamd (test signature
database only) and a local DNS server (SPF, the DKIM key, DMARC) run beside it,
and every message is DKIM-signed, so all of spam, virus, SPF, DKIM (the whole
body hashed) and DMARC run on each; a MB is then 10^6 bytes, so a 10 MB message
stays under the spam scanner's default max_size (10 MiB) and is scanned too.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_memory.py --size 30 --count 1
    ... --size 30 --count 10 --parallel 10      # 10 concurrent 30 MB messages
    ... --scan --size 10 --count 10 --parallel 10   # 10 concurrent 10 MB scanned messages
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.dns import DkimKey, DnsServer, make_dkim_key
from harness.fixtures import instance_dir
from harness.mxrules_proc import MilterProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.scanners import Clamd, Spamd
from harness.sink import SmtpSink
from harness.smtp import Client
from harness.stack import write_config
from mxrules.spool import Job, Spool

CLIENT = "192.0.2.7"  # allowed by the harness's IP filters
SCAN_RULES = [{"name": "scanned", "enabled": True, "scan_enabled": True,
               "recipients": ["user@example.com"]}]
# Each 10 MB message may wait for a scan slot and then for spamd: the client waits long.
DATA_TIMEOUT = 280.0


def vm(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def big_message(size: int, subject: str = "big") -> bytes:
    """A message of about `size` bytes: a few headers and 78-byte lines of text."""
    line = b"x" * 76 + b"\r\n"
    head = (f"From: <a@sender.test>\r\nTo: <user@example.com>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n").encode()
    return head + line * (max(0, size - len(head)) // len(line))


@contextmanager
def scanners(work: Path, dns_record: str) -> Iterator[dict[str, Any]]:
    """spamd, clamd and a DNS server for sender.test; the config's `scan` section."""
    with ExitStack() as stack:
        spamd, clamd = Spamd(work / "spamd"), Clamd(work / "clamd")
        dns = DnsServer({
            "sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]},
            "sel1._domainkey.sender.test": {"TXT": [dns_record]},
            "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        })
        for server in (spamd, clamd, dns):
            server.start()
            stack.callback(server.stop)
        yield {"spam": {"engine": "spamd", "address": spamd.address},
               "virus": {"engine": "clamd", "address": clamd.address},
               "dns": {"nameservers": [dns.address], "timeout": 5}}


def deliver(port: int, msg: bytes, client_ip: str | None) -> int:
    with Client("127.0.0.1", port, timeout=DATA_TIMEOUT) as c:
        c.ehlo()
        if client_ip is not None:
            c.xclient(client_ip)
        c.mail("a@sender.test")
        c.rcpt("user@example.com")
        return c.data(msg)[0]


def measure(size: int, count: int, parallel: int, scan: bool,
            concurrency: int | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mxrules-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        extra: dict[str, Any] = {}
        client_ip = None
        key: DkimKey | None = None
        if scan:
            key = make_dkim_key()
            extra = {"rules": SCAN_RULES, "scan": stack.enter_context(scanners(work, key.record))}
            if concurrency is not None:
                extra["scan"]["concurrency"] = concurrency
            client_ip = CLIENT
        port = free_port()
        cfg = write_config(work, port=port, max_message_size=64 * 1024 * 1024, **extra)
        milter = MilterProcess(cfg, port, work / "milter.log")
        milter.start()
        stack.callback(milter.stop)
        sink = SmtpSink()
        sink.start()
        stack.callback(sink.stop)
        postfix = Postfix(workdir=instance_dir(), smtp_port=free_port(),
                          milter=milter.postfix_spec, relay_port=sink.port,
                          extra={"message_size_limit": str(80 * 1024 * 1024)})
        stack.callback(shutil.rmtree, postfix.workdir, True)
        postfix.start()
        stack.callback(postfix.stop)
        assert milter.proc is not None
        pid = milter.proc.pid

        warm = big_message(2000, "warm")  # loads what the first message needs
        if key is not None:
            warm = key.sign(warm, "sel1", "sender.test")
        assert deliver(postfix.smtp_port, warm, client_ip) == 250
        before = vm(pid, "VmHWM")
        msg = big_message(size)
        if key is not None:
            msg = key.sign(msg, "sel1", "sender.test")
        results: list[int] = []
        started = time.monotonic()

        def one() -> None:
            results.append(deliver(postfix.smtp_port, msg, client_ip))

        for start in range(0, count, parallel):
            threads = [threading.Thread(target=one) for _ in range(min(parallel, count - start))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elapsed = time.monotonic() - started
        after = vm(pid, "VmHWM")
        assert results == [250] * count, results
        verdicts: Counter[str] = Counter()
        for _, job in Spool(str(work / "spool")).jobs("incoming"):
            if isinstance(job, Job) and job.message_size > len(warm) * 2:  # not the warm-up
                verdicts.update(f"{k}={v}" for k, v in job.verdicts.items())
        return {"before_kib": before, "after_kib": after, "growth_mib": (after - before) / 1024,
                "seconds": elapsed, "verdicts": verdicts, "bytes": len(msg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=30, help="message size in MB")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--scan", action="store_true",
                    help="a scan_enabled rule, real spamd/clamd/DNS, DKIM-signed messages")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="with --scan: scan.concurrency (default: the config's default)")
    args = ap.parse_args()
    size = args.size * (1000 * 1000 if args.scan else 1024 * 1024)
    r = measure(size, args.count, args.parallel, args.scan, args.concurrency)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}")
    scans = ", scans on" if args.scan else ""
    if args.scan and args.concurrency is not None:
        scans += f", scan.concurrency {args.concurrency}"
    print(f"{args.count} x {args.size} MB message(s), {args.parallel} at a time{scans} "
          f"({r['bytes']} bytes each, {r['seconds']:.1f} s)")
    if args.scan:
        print("verdicts: " + ", ".join(f"{k} x{n}" for k, n in sorted(r["verdicts"].items())))
    print(f"milter peak RSS before: {r['before_kib'] / 1024:.1f} MiB, "
          f"after: {r['after_kib'] / 1024:.1f} MiB, growth: {r['growth_mib']:.2f} MiB")


if __name__ == "__main__":
    main()
