"""Backlog drain after an AWS outage, with mail flowing all the while.

A real Postfix on loopback with the `mxrules milter` (unix socket, consume
mode) and the `mxrules worker` (the config's defaults: 4 threads, retries
after 1 s doubling up to 600 s, unless --retry-max-delay says otherwise)
storing every message in S3 on a moto server. Mail arrives at a steady
--rate (default 20 msg/s; 10 KB, one recipient, one SMTP session per
message) through the whole run:

  1. --lead seconds of normal flow (the worker keeps up);
  2. the outage: moto is stopped, so every S3 PUT is refused (connection
     refused, as when the endpoint is unreachable), for --outage seconds
     (default 300; --quick: 30);
  3. recovery: moto starts again on the same port and the bucket is made
     again (moto keeps no state); the jobs in the spool at that instant are
     the backlog. Time to drain = recovery until the last of them is done;
  4. the intake stops, the spool empties, and every message that got a 250 is
     checked to be in S3 (none lost), with nothing dead-lettered.

The drain time has two parts: waiting for the retry back-off (a job that
failed for the Nth time waits up to min(600 s, 2^N s) before its next
attempt: the worker does not notice the recovery by itself) and the work.
The bench prints the latest next attempt due at recovery, so the two can be
told apart, and the drain rate (backlog plus what arrived during the drain,
over the drain time) against the intake rate.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_drain.py   # 5-minute outage
    ... --quick                                    # a 30 s outage, to try it out
    ... --outage 300 --rate 20 --lead 10 --retry-max-delay 600      # the defaults
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine

from harness.fixtures import instance_dir
from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.smtp import send
from harness.stack import write_config
from mxrules.spool import Spool

BUCKET = "drain-bucket"
RECIPIENT = "user@example.com"
ACTIVE = ("incoming", "active", "deferred")
SPOOLED = re.compile(r"^INFO \S+: eom .*message_id=([0-9a-v]{40}) .*result=spooled", re.M)
DONE = re.compile(r"job done .*?message_id=([0-9a-v]{40})")


def make_message(i: int, size: int) -> bytes:
    head = (f"From: <a@sender.test>\r\nTo: <{RECIPIENT}>\r\nSubject: drain {i}\r\n"
            f"Message-ID: <drain-{i}@sender.test>\r\n"
            "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n").encode()
    line = b"y" * 76 + b"\r\n"
    return head + line * (max(0, size - len(head)) // len(line))


class Intake:
    """Messages at a steady rate from a few sender threads, on a fixed schedule."""

    def __init__(self, port: int, rate: float, size: int, threads: int = 4) -> None:
        self.port, self.rate, self.size = port, rate, size
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next = 0
        self.accepted = 0
        self.refused: list[str] = []
        self.late = 0  # sends that started more than one interval behind schedule
        self.t0 = 0.0
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i = self.next
                self.next += 1
            due = self.t0 + i / self.rate
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            if time.monotonic() - due > 1 / self.rate:
                self.late += 1
            try:
                r = send("127.0.0.1", self.port, "a@sender.test", [RECIPIENT],
                         make_message(i, self.size))
                ok = bool(r.data) and r.data[0] == 250
            except OSError as exc:
                ok, r = False, exc  # type: ignore[assignment]
            with self.lock:
                if ok:
                    self.accepted += 1
                else:
                    self.refused.append(repr(r)[:200])

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def counts(spool: Spool) -> dict[str, int]:
    return {s: len(spool.ids(s)) for s in (*ACTIVE, "failed", "corrupt")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=300.0, help="seconds without AWS")
    ap.add_argument("--quick", action="store_true", help="a 30 s outage")
    ap.add_argument("--rate", type=float, default=20.0, help="messages per second, throughout")
    ap.add_argument("--lead", type=float, default=10.0, help="seconds of normal flow first")
    ap.add_argument("--size", type=int, default=10240, help="message bytes")
    ap.add_argument("--threads", type=int, default=4, help="worker.threads")
    ap.add_argument("--retry-max-delay", type=float, default=600.0,
                    help="worker.retry_max_delay (the default config's: 600)")
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="give up if the backlog is not drained this long after recovery")
    args = ap.parse_args()
    outage = 30.0 if args.quick else args.outage

    for line in machine.describe():
        print(line)
    print(f"intake {args.rate:g} msg/s of {args.size} bytes, one recipient, one session each; "
          f"{args.lead:g}s normal flow, then {outage:g}s outage; worker.threads {args.threads}, "
          f"retry 1s doubling to {args.retry_max_delay:g}s; {machine.load()}", flush=True)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the finally below stops everything

    signal.signal(signal.SIGTERM, terminate)
    work = Path(tempfile.mkdtemp(prefix="mxrules-bench-drain-"))
    work.chmod(0o711)  # smtpd (user postfix) reaches the milter's socket in here
    moto = MotoServer(record=False, workdir=work / "moto")
    milter: MilterProcess | None = None
    worker: WorkerProcess | None = None
    postfix: Postfix | None = None
    intake: Intake | None = None
    try:
        moto.start()
        moto.make_bucket(BUCKET)
        sock = work / "milter.sock"
        worker_port = free_port()
        cfg = write_config(
            work, port=0, filters=[],
            rules=[{"name": "store", "enabled": True, "recipients": [RECIPIENT],
                    "actions": [{"s3": {"bucket_name": BUCKET, "object_key_prefix": "in/"}}]}],
            milter={"listen": f"unix:{sock}", "socket_mode": "0666", "reload_interval": 5.0},
            metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
            worker={"threads": args.threads, "retry_max_delay": args.retry_max_delay},
            aws={"region": "us-east-1", "endpoint_url": moto.endpoint_url})
        spool = Spool(str(work / "spool"))
        milter = MilterProcess(cfg, 0, work / "milter.log")
        milter.spawn()
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or milter.proc is None or milter.proc.poll() is not None:
                raise RuntimeError(f"milter not up:\n{milter.log()[-3000:]}")
            time.sleep(0.05)
        worker = WorkerProcess(cfg, worker_port, work / "worker.log", env=moto.aws_env())
        worker.start()
        postfix = Postfix(workdir=instance_dir(), smtp_port=free_port(), milter=f"unix:{sock}",
                          tls=False, extra={"default_transport": "discard:drain",
                                            "relay_transport": "discard:drain"})
        postfix.start()

        intake = Intake(postfix.smtp_port, args.rate, args.size)
        intake.start()
        time.sleep(args.lead)
        print(f"normal flow: {intake.accepted} accepted, spool {counts(spool)}", flush=True)
        moto.stop()
        down = time.monotonic()
        print(f"outage: moto stopped for {outage:g}s", flush=True)
        while time.monotonic() - down < outage:
            time.sleep(min(30.0, outage - (time.monotonic() - down)))
            c = counts(spool)
            print(f"  +{time.monotonic() - down:5.0f}s accepted {intake.accepted}, backlog "
                  f"{sum(c[s] for s in ACTIVE)} ({c})", flush=True)
        moto.start()
        moto.make_bucket(BUCKET)
        recovered = time.monotonic()
        backlog = {job_id for s in ACTIVE for job_id in spool.ids(s)}
        now = time.time()
        due = []
        for job_id in spool.ids("deferred"):
            try:
                due.append(spool.load("deferred", job_id).progress.next_due - now)
            except Exception:  # claimed or finished meanwhile
                continue
        accepted_at_recovery = intake.accepted
        latest = max(due, default=0.0)
        print(f"recovery: backlog {len(backlog)} jobs; latest next attempt due "
              f"{latest:.0f}s after recovery", flush=True)
        while True:
            left = {j for j in backlog if spool.find(j) is not None}
            if not left:
                break
            if time.monotonic() - recovered > args.timeout:
                raise RuntimeError(f"{len(left)} backlog jobs left after {args.timeout:g}s")
            time.sleep(0.2)
        drained = time.monotonic() - recovered
        arrived = intake.accepted - accepted_at_recovery
        intake.finish()
        deadline = time.monotonic() + 120
        while any(counts(spool)[s] for s in ACTIVE):
            if time.monotonic() > deadline:
                raise RuntimeError(f"spool not empty: {counts(spool)}")
            time.sleep(0.2)
        final = counts(spool)
        in_s3 = {k.removeprefix("in/") for k in moto.s3_keys(BUCKET, "in/")}
        spooled = set(SPOOLED.findall(milter.log()))
        done = DONE.findall(worker.log())
        problems = milter.problems()
    finally:
        if intake is not None:
            intake.finish()
        for stop in (postfix.stop if postfix else None, worker.stop if worker else None,
                     milter.stop if milter else None, moto.stop):
            if stop is not None:
                try:
                    stop()
                except Exception as exc:  # keep stopping the others
                    print(f"cleanup: {exc}", file=sys.stderr)
        if postfix is not None:
            shutil.rmtree(postfix.workdir, ignore_errors=True)
        if os.environ.get("MXRULES_BENCH_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rate = (len(backlog) + arrived) / drained if drained else float("inf")
    # Lost: accepted (250) without a job, or a job the worker never finished. moto keeps
    # nothing across its restart, so S3 is checked for what was stored after recovery:
    # every backlog job must be there.
    no_job = intake.accepted - len(spooled)
    not_done = spooled - set(done)
    backlog_missing = backlog - in_s3
    lost = max(0, no_job) + len(not_done) + len(backlog_missing)
    dead = final["failed"] + final["corrupt"]
    print(f"\n{'outage':>7} | {'backlog':>7} | {'drain':>6} | {'latest':>6} | {'drain':>6} | "
          f"{'intake':>6} | {'ratio':>5} | {'accepted':>8} | {'done':>6} | {'dupl':>4} | "
          f"{'lost':>4} | {'dead':>4}")
    print(f"{'s':>7} | {'jobs':>7} | {'s':>6} | {'due s':>6} | {'jobs/s':>6} | {'msg/s':>6} | "
          f"{'':>5} | {'':>8} | {'':>6} | {'':>4} | {'':>4} | {'':>4}")
    print("-" * 100)
    print(f"{outage:>7.0f} | {len(backlog):>7} | {drained:>6.1f} | {latest:>6.0f} | {rate:>6.1f} | "
          f"{args.rate:>6.1f} | {rate / args.rate:>5.1f} | {intake.accepted:>8} | "
          f"{len(set(done)):>6} | {len(done) - len(set(done)):>4} | {lost:>4} | {dead:>4}")
    print(f"accepted without a job: {no_job}; jobs not done: {len(not_done)}; backlog jobs "
          f"missing from S3: {len(backlog_missing)}; refused by the MTA: {len(intake.refused)}; "
          f"sends late on schedule: {intake.late}; milter warnings: {len(problems)}")
    if intake.refused:
        print("  e.g. " + intake.refused[0])
    return 0 if lost == 0 and not dead else 1


if __name__ == "__main__":
    sys.exit(main())
