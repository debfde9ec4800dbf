"""The cost of authenticating every message: SPF, DKIM and DMARC off against on.

Two throwaway Postfix instances on loopback, each with its own real `mxrules
milter` (unix socket, `delivery: consume`, bench_throughput's rule: AddHeader +
S3, no scan_enabled), identical but for `scan.authentication`:

  off  never   (no SPF, DKIM or DMARC: what mxrules did before, for unscanned rules)
  on   always  (the default, as SES: every message is authenticated)

Both milters' DNS goes to one local DNS server (harness.dns) holding the
senders' SPF, DMARC and DKIM key records; it answers on loopback in well under
a millisecond, so the figures show mxrules' own cost, not the Internet's DNS
latency (which the shared answer cache hides for repeat senders).

1. End-of-data latency: one SMTP session at a time, off and on interleaved,
   the client's DATA command timed (it ends when Postfix has the milter's
   end-of-data answer).  Two workloads:
     cached    every message from the same domain, unsigned (after the first,
               every lookup is answered from the milter's cache)
     uncached  every message from a new domain, DKIM-signed (SPF, key and DMARC
               lookups all go to the DNS server; the body is hashed and the
               signature verified)
   Prints p50/p99/mean for off and on, the difference, and DNS queries per
   message.
2. Throughput: smtp-source (as bench_throughput.py) against both instances,
   interleaved, at each session count: msg/s, the milter's CPU per message,
   and on/off.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_auth.py
    ... --count 300 --sessions 1,20 --messages 1000 --repeats 3 --size 10240   # the defaults
"""

from __future__ import annotations

import argparse
import base64
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dkim
import machine
from bench_throughput import (
    DISCARD,
    RECIPIENT,
    RULE,
    SENDER,
    SMTP_SOURCE,
    Rig,
    Run,
    _wait_count,
    cpu_seconds,
    machine_times,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.dns import DnsServer
from harness.fixtures import instance_dir
from harness.mxrules_proc import MilterProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.smtp import Client
from harness.stack import write_config

MODES = {"off": "never", "on": "always"}
SENDER_DOMAIN = SENDER.rpartition("@")[2]  # smtp-source's sender, and the cached workload's


def _key() -> tuple[bytes, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def zone(domains: list[str], key_record: str) -> dict[str, dict[str, list[str]]]:
    """SPF passing loopback, DMARC p=reject and a DKIM key, for every sender domain."""
    records: dict[str, dict[str, list[str]]] = {}
    for domain in domains:
        records[domain] = {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]}
        records[f"_dmarc.{domain}"] = {"TXT": ["v=DMARC1; p=reject"]}
        records[f"sel1._domainkey.{domain}"] = {"TXT": [key_record]}
    return records


def message(domain: str, i: int, size: int) -> bytes:
    line = "An ordinary line of text for the checks to read and hash.\r\n"
    return (f"From: <bench@{domain}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {i}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bench-{i}-{time.time_ns()}@{domain}>\r\n\r\n"
            + line * max(1, size // len(line))).encode()


def sign(msg: bytes, domain: str, pem: bytes) -> bytes:
    header: bytes = dkim.sign(msg, b"sel1", domain.encode(), pem,
                              include_headers=[b"from", b"to", b"subject", b"date",
                                               b"message-id"])
    return header + msg


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class AuthRig:
    """Two Postfix + mxrules pairs, off and on, started once and stopped on any exit."""

    def __init__(self, dns: DnsServer) -> None:
        self.dns = dns
        self.work = Path(tempfile.mkdtemp(prefix="mxrules-bench-auth-"))
        self.work.chmod(0o711)  # smtpd (user postfix) reaches the unix sockets in here
        self.postfix: dict[str, Postfix] = {}
        self.milters: dict[str, MilterProcess] = {}

    def start(self) -> None:
        for name, mode in MODES.items():
            directory = self.work / name
            directory.mkdir()
            directory.chmod(0o711)
            sock = directory / "milter.sock"
            cfg = write_config(
                directory, port=0, rules=[RULE], filters=[],
                milter={"listen": f"unix:{sock}", "reload_interval": 5.0, "socket_mode": "0666"},
                scan={"authentication": mode,
                      "dns": {"nameservers": [self.dns.address], "timeout": 2}})
            milter = MilterProcess(cfg, 0, directory / "milter.log")
            self.milters[name] = milter
            milter.spawn()
            assert milter.proc is not None
            Rig._wait_milter(f"unix:{sock}", 0, milter.proc, directory / "milter.log")
            p = Postfix(workdir=instance_dir(), smtp_port=free_port(), milter=f"unix:{sock}",
                        tls=False, extra=DISCARD)
            self.postfix[name] = p
            p.start()

    def stop(self) -> None:
        for p in self.postfix.values():
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {p}: {exc}", file=sys.stderr)
            else:
                shutil.rmtree(p.workdir, ignore_errors=True)
        for m in self.milters.values():
            m.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def spool(self, name: str) -> Path:
        return self.work / name / "spool"

    def settle(self, name: str, messages: int, log_from: int) -> None:
        """Every message has its job and was discarded; nothing logged; spool emptied."""
        p = self.postfix[name]
        incoming = self.spool(name) / "incoming"
        jobs = list(incoming.iterdir()) if incoming.is_dir() else []
        discards = _wait_count(p, r"milter triggers DISCARD action", messages, log_from)
        if len(jobs) != messages or discards != messages:
            raise RuntimeError(f"{name}: {len(jobs)} jobs, {discards} discards, "
                               f"{messages} messages sent")
        for job in jobs:
            shutil.rmtree(job)
        problems = self.milters[name].problems()
        if problems:
            raise RuntimeError(f"{name} milter logged problems:\n" + "\n".join(problems[:20]))

    # -- latency ------------------------------------------------------------------------

    def data_time(self, name: str, msg: bytes, sender: str) -> float:
        with Client("127.0.0.1", self.postfix[name].smtp_port) as c:
            c.ehlo()
            c.mail(sender)
            c.rcpt(RECIPIENT)
            started = time.perf_counter()
            reply = c.data(msg)
            elapsed = time.perf_counter() - started
            assert reply[0] == 250, reply
        return elapsed

    # -- throughput ---------------------------------------------------------------------

    def throughput(self, name: str, sessions: int, messages: int, size: int) -> Run:
        p = self.postfix[name]
        milter = self.milters[name]
        assert milter.proc is not None
        pid = milter.proc.pid
        log_from = p.log_size()
        argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                "-r", "1", "-f", SENDER, "-t", RECIPIENT, "-M", "client.test",
                f"127.0.0.1:{p.smtp_port}"]
        user0, sys0 = cpu_seconds(pid)
        busy0, total0 = machine_times()
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        wall = time.monotonic() - t0
        busy1, total1 = machine_times()
        user1, sys1 = cpu_seconds(pid)
        if out.returncode != 0 or out.stderr.strip():
            raise RuntimeError(f"smtp-source against {name} exited {out.returncode}:\n"
                               f"{out.stderr[-2000:]}\nmaillog tail:\n{p.log_tail(20)}")
        self.settle(name, messages, log_from)
        return Run(name, sessions, messages, wall, user1 - user0 + sys1 - sys0, sys1 - sys0,
                   (busy1 - busy0) / max(1, total1 - total0))


def latency(rig: AuthRig, dns: DnsServer, workload: str, count: int, size: int,
            pem: bytes, offset: int) -> dict[str, tuple[list[float], float]]:
    """{mode: (DATA seconds per message, DNS queries per message)}, off and on interleaved."""
    times: dict[str, list[float]] = {name: [] for name in MODES}
    queries: dict[str, int] = dict.fromkeys(MODES, 0)
    logs = {name: rig.postfix[name].log_size() for name in MODES}
    for i in range(count):
        for name in (MODES if i % 2 == 0 else list(MODES)[::-1]):
            if workload == "cached":
                domain = SENDER_DOMAIN
                msg = message(domain, i, size)
            else:  # a domain no message used before, in either mode
                domain = f"d{offset + 2 * i + list(MODES).index(name)}.test"
                msg = sign(message(domain, i, size), domain, pem)
            before = len(dns.queries)
            times[name].append(rig.data_time(name, msg, f"bench@{domain}"))
            queries[name] += len(dns.queries) - before
    for name in MODES:
        rig.settle(name, count, logs[name])
    return {name: (times[name], queries[name] / count) for name in MODES}


def latency_table(results: dict[str, dict[str, tuple[list[float], float]]]) -> list[str]:
    ms = 1000.0
    head = (f"{'workload':>9} | {'mode':>4} | {'p50 ms':>7} | {'p99 ms':>7} | {'mean ms':>7} | "
            f"{'DNS q/msg':>9}")
    lines = [head, "-" * len(head)]
    for workload, by_mode in results.items():
        for name, (values, q) in by_mode.items():
            lines.append(f"{workload:>9} | {name:>4} | {percentile(values, 50) * ms:7.1f} | "
                         f"{percentile(values, 99) * ms:7.1f} | "
                         f"{statistics.mean(values) * ms:7.1f} | {q:9.1f}")
        off, on = by_mode["off"][0], by_mode["on"][0]
        lines.append(f"{workload:>9} | {'+':>4} | "
                     f"{(percentile(on, 50) - percentile(off, 50)) * ms:7.1f} | "
                     f"{(percentile(on, 99) - percentile(off, 99)) * ms:7.1f} | "
                     f"{(statistics.mean(on) - statistics.mean(off)) * ms:7.1f} | {'':>9}")
    return lines


def throughput_table(runs: dict[tuple[str, int], list[Run]], sessions: list[int]) -> list[str]:
    head = (f"{'sessions':>8} | {'off msg/s':>9} | {'on msg/s':>9} | {'on/off':>6} | "
            f"{'off cpu':>7} | {'on cpu':>7} | {'busy':>5}")
    lines = [head, f"{'':>8} | {'':>9} | {'':>9} | {'':>6} | {'ms/msg':>7} | {'ms/msg':>7} | "
                   f"{'':>5}", "-" * len(head)]
    for s in sessions:
        off, on = runs["off", s], runs["on", s]
        ratio = statistics.median(b.rate / a.rate for a, b in zip(off, on, strict=True))
        cpu = {name: statistics.median(1000 * r.milter_cpu / r.messages for r in runs[name, s])
               for name in MODES}
        busy = statistics.median(r.busy for r in off + on)
        lines.append(f"{s:>8} | {statistics.median(r.rate for r in off):9.1f} | "
                     f"{statistics.median(r.rate for r in on):9.1f} | {ratio:6.2f} | "
                     f"{cpu['off']:7.2f} | {cpu['on']:7.2f} | {busy:5.0%}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="latency: messages per mode and "
                    "workload")
    ap.add_argument("--sessions", default="1,20", help="throughput: comma-separated sessions")
    ap.add_argument("--messages", type=int, default=1000, help="throughput: messages per run")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: interleaved repetitions")
    ap.add_argument("--size", type=int, default=10240, help="message body bytes")
    args = ap.parse_args()
    sessions = [int(s) for s in args.sessions.split(",")]

    for line in machine.describe():
        print(line)
    print(f"latency: {args.count} messages per mode and workload, one session at a time; "
          f"throughput: {args.messages} messages per run, 1 recipient, sessions {sessions}, "
          f"{args.repeats} interleaved repetitions; {args.size} bytes body; milters on a unix "
          "socket; mxrules worker not running")
    print(f"before: {machine.load()}", flush=True)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    pem, key_record = _key()
    domains = [SENDER_DOMAIN] + [f"d{i}.test" for i in range(2 * args.count + 20)]
    dns = DnsServer(zone(domains, key_record))
    dns.start()
    rig = AuthRig(dns)
    runs: dict[tuple[str, int], list[Run]] = {(n, s): [] for n in MODES for s in sessions}
    lat: dict[str, dict[str, tuple[list[float], float]]] = {}
    try:
        rig.start()
        latency(rig, dns, "uncached", 5, args.size, pem, 2 * args.count)  # warm-up
        for name in MODES:  # not counted either: first connections, imports, page cache
            rig.throughput(name, 5, 50, args.size)
        for workload in ("cached", "uncached"):
            lat[workload] = latency(rig, dns, workload, args.count, args.size, pem, 0)
        during = machine.load()
        for rep in range(args.repeats):
            for s in (sessions if rep % 2 == 0 else sessions[::-1]):
                for name in (MODES if (rep + s) % 2 == 0 else list(MODES)[::-1]):
                    r = rig.throughput(name, s, args.messages, args.size)
                    runs[name, s].append(r)
                    print(f"  rep {rep + 1} sessions={s:<3} auth {name:<3} {r.rate:7.1f} msg/s "
                          f"(milter cpu {1000 * r.milter_cpu / r.messages:.2f} ms/msg, machine "
                          f"busy {r.busy:.0%})", flush=True)
    finally:
        rig.stop()
        dns.stop()
    print(f"after: {machine.load()} (latency part ended at: {during})")
    print("\nend-of-data latency (client's DATA command), off = scan.authentication: never, "
          "on = always; + = on - off")
    print("\n".join(latency_table(lat)))
    print(f"\nthroughput, medians of {args.repeats}; on/off = median of the per-repetition "
          "ratios; cpu = the milter process's CPU per message; busy = share of all cores in use")
    print("\n".join(throughput_table(runs, sessions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
