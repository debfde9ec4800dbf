"""Worker throughput to moto S3 versus a plain boto3 put_object loop, same concurrency.

One moto server (record=False) serves both sides, one after the other, T threads each:

  A  baseline: T threads in this process, each with its own S3 client made exactly as
     the worker makes it (`actions.aws.Clients`), call put_object with an in-memory body
     of the stored copy's size until N objects are stored.
  B  worker: a spool is filled with N jobs (one rule, one S3 action) through JobWriter,
     then the real `mxrules worker --config PATH --once` runs as a subprocess with
     `worker.threads: T` until it exits (every thread found the spool empty); the bench
     then checks that the spool is empty, that the worker logged N "job done" lines and
     no warning, and that N objects exist under the run's prefix.

Throughput is measured the same way on both sides: the time of each completed put
(A: time.monotonic() after put_object returns; B: arrival of the worker's "job done"
log line on its stderr pipe, the log has no timestamps) and jobs/s = (N - 1) / (last
- first).  That span leaves out what happens once per process or thread (interpreter
start, imports, config, client creation) and is the steady-state rate; the wall-clock
numbers (B minus the median start-up of an empty `--once` run) are printed alongside.

Runs are interleaved: each repetition runs every T (in alternating order), and A and B
of one T run back to back, alternating which goes first.  The table shows medians over
the repetitions; B/A is the median of the per-repetition ratios (a pair shares whatever
else the machine was doing at the time).  CPU is the side's process: A this one (client
creation included), B the worker (its start-up included).

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_worker.py
    ... --jobs 1000 --threads 1,4,8 --size 16384 --repeats 5     # the defaults
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import boto3
import botocore

from harness.moto import REGION, MotoServer
from harness.ports import free_port
from harness.stack import write_config
from mxrules import payload
from mxrules.actions.aws import Clients
from mxrules.config import AwsSettings
from mxrules.ids import new_message_id
from mxrules.rules import Rule, S3Action
from mxrules.spool import STATES, Client, Job, MatchedRule, Spool, ses_timestamp

MXRULES = str(Path(sys.executable).parent / "mxrules")
BUCKET = "bench-worker"
RECIPIENT = "user@example.com"


@dataclass
class Run:
    jobs: int
    span: float  # first completed job to the last (s)
    wall: float  # A: threads started to joined; B: Popen to exit (s)
    cpu: float  # CPU seconds of the side's process (A: this one, B: the worker)

    @property
    def rate(self) -> float:
        return (self.jobs - 1) / self.span

    def net_rate(self, startup: float) -> float:
        return self.jobs / max(1e-9, self.wall - startup)


def make_message(size: int) -> bytes:
    head = (b"From: <a@sender.test>\r\nTo: <" + RECIPIENT.encode() + b">\r\n"
            b"Subject: bench\r\nMessage-ID: <bench@sender.test>\r\n"
            b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * (max(0, size - len(head)) // len(line) + 1)
    return (head + body)[:size]


def make_job(message_id: str, data: bytes, prefix: str) -> Job:
    rule = Rule(name="store", enabled=True, recipients=(RECIPIENT,),
                actions=(S3Action(bucket_name=BUCKET, object_key_prefix=prefix),))
    return Job(
        message_id=message_id, queue_id="4Xk2Lq0F3Zz1", received_at=ses_timestamp(),
        rule_set="default", mail_from="a@sender.test", recipients=(RECIPIENT,),
        client=Client(address="192.0.2.1", hostname="mail.sender.test", helo="mail"),
        rules=(MatchedRule(rule, (RECIPIENT,)),), in_stream_headers=(),
        hostname="mx.test", message_size=len(data),
        message_sha256=hashlib.sha256(data).hexdigest(),
        verdicts={"spam": "PASS", "virus": "PASS"})


def fill_spool(root: str, n: int, data: bytes, prefix: str) -> int:
    """N committed jobs in incoming/, written as the milter writes them; the stored copy size."""
    spool = Spool(root)
    size = 0
    for _ in range(n):
        message_id = new_message_id()
        writer = spool.new_job(message_id)
        writer.write(data)
        writer.commit(make_job(message_id, data, prefix))
        if not size:
            copy = payload.StoredCopy(spool.load("incoming", message_id),
                                      spool.message_path("incoming", message_id))
            size = copy.size
            copy.close()
    return size


def count_and_clear(moto: MotoServer, prefix: str) -> int:
    keys = moto.s3_keys(BUCKET, prefix)
    s3 = moto.client("s3")
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={
            "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
    return len(keys)


def baseline(moto: MotoServer, n: int, threads: int, body: bytes, prefix: str) -> Run:
    """T threads, one worker-made S3 client each, put_object until N objects are stored."""
    settings = AwsSettings(region=REGION, endpoint_url=moto.endpoint_url)
    counter = itertools.count()
    done: list[float] = []
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            s3 = Clients(settings).s3  # made in the thread, as the worker's Runner does
            while (i := next(counter)) < n:
                s3.put_object(Bucket=BUCKET, Key=f"{prefix}{i:08d}", Body=body,
                              ContentLength=len(body))
                done.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    cpu0, t0 = time.process_time(), time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if errors:
        raise errors[0]
    stored = count_and_clear(moto, prefix)
    if len(done) != n or stored != n:
        raise RuntimeError(f"baseline: {len(done)} puts, {stored} objects, {n} wanted")
    return Run(n, max(done) - min(done), wall, cpu)


def run_worker(config: Path, env: dict[str, str], log_path: Path) -> tuple[float, float,
                                                                            list[float]]:
    """`mxrules worker --once`: wall time, CPU time, arrival times of its "job done" lines."""
    done: list[float] = []
    with open(log_path, "wb") as log:
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen([MXRULES, "worker", "--config", str(config), "--once"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE,
                                env=env)
        assert proc.stderr is not None
        for line in proc.stderr:  # one thread is enough: this process does nothing else
            if b"job done" in line:
                done.append(time.monotonic())
            log.write(line)
        code = proc.wait()
        wall = time.monotonic() - t0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    if code != 0:
        raise RuntimeError(f"worker exited with {code}:\n{log_path.read_text()[-3000:]}")
    problems = [ln for ln in log_path.read_text(errors="replace").splitlines()
                if ln.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))]
    if problems:
        raise RuntimeError("worker logged problems:\n" + "\n".join(problems[:20]))
    return wall, cpu, done


def worker_config(work: Path, threads: int, endpoint: str) -> Path:
    return write_config(
        work, port=free_port(),
        rules=[{"name": "store", "enabled": True, "recipients": [RECIPIENT],
                "actions": [{"s3": {"bucket_name": BUCKET}}]}],
        metrics={"milter_listen": "", "worker_listen": ""},
        worker={"threads": threads, "scan_interval": 0.05},
        aws={"region": REGION, "endpoint_url": endpoint})


def worker(moto: MotoServer, work: Path, n: int, threads: int, data: bytes, prefix: str,
           env: dict[str, str]) -> tuple[Run, int]:
    """Fill a fresh spool with N jobs, run the worker over it; the run and the copy size."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = worker_config(work, threads, moto.endpoint_url)
    spool_root = str(work / "spool")
    size = fill_spool(spool_root, n, data, prefix)
    wall, cpu, done = run_worker(config, env, work / "worker.log")
    spool = Spool(spool_root)
    left = {s: len(spool.ids(s)) for s in (*STATES, "tmp", "done")}
    stored = count_and_clear(moto, prefix)
    if any(left.values()) or len(done) != n or stored != n:
        raise RuntimeError(f"worker: spool {left}, {len(done)} done lines, {stored} objects, "
                           f"{n} wanted")
    return Run(n, max(done) - min(done), wall, cpu), size


def startup(moto: MotoServer, work: Path, env: dict[str, str]) -> float:
    """Wall time of `mxrules worker --once` over an empty spool (start-up and exit)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = worker_config(work, 1, moto.endpoint_url)
    Spool(str(work / "spool")).ensure()
    wall, _cpu, done = run_worker(config, env, work / "worker.log")
    assert not done
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs (objects) per run")
    ap.add_argument("--threads", default="1,4,8", help="comma-separated concurrencies")
    ap.add_argument("--size", type=int, default=16384, help="message size in bytes")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    args = ap.parse_args()
    concurrencies = [int(t) for t in args.threads.split(",")]
    if args.jobs < 2:
        ap.error("--jobs must be at least 2")

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPython "
          f"{platform.python_version()}, boto3 {boto3.__version__}, botocore "
          f"{botocore.__version__}, moto {moto_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="mxrules-bench-worker-"))
    moto = MotoServer(record=False, workdir=tmp / "moto")
    moto.start()
    aws_env = moto.aws_env()
    os.environ.update(aws_env)  # the baseline's clients find their credentials like the worker's
    env = {**os.environ, "PYTHONSAFEPATH": "1", **aws_env}
    data = make_message(args.size)
    results: dict[int, dict[str, list[Run]]] = {t: {"A": [], "B": []} for t in concurrencies}
    startups: list[float] = []
    copy_size = 0
    try:
        moto.make_bucket(BUCKET)
        # Warm-up (not counted): moto's first requests, the page cache, the worker's imports.
        worker(moto, tmp / "warm", 20, 2, data, "warm/", env)
        copy_size = len(data) + len(payload.stored_copy_prefix(make_job("0" * 40, data, "")))
        body = os.urandom(copy_size)
        print(f"{args.jobs} jobs per run, message {len(data)} bytes, stored copy {copy_size}"
              f" bytes, threads {concurrencies}, {args.repeats} interleaved repetitions")
        for rep in range(args.repeats):
            startups.append(startup(moto, tmp / "empty", env))
            order = concurrencies if rep % 2 == 0 else concurrencies[::-1]
            for threads in order:
                sides = "AB" if rep % 2 == 0 else "BA"
                for side in sides:
                    prefix = f"r{rep}/t{threads}/{side}/"
                    if side == "A":
                        run = baseline(moto, args.jobs, threads, body, prefix)
                    else:
                        run, size = worker(moto, tmp / "run", args.jobs, threads, data,
                                           prefix, env)
                        if size != copy_size:
                            raise RuntimeError(f"stored copy is {size} bytes, not {copy_size}")
                    results[threads][side].append(run)
                    print(f"  rep {rep + 1} T={threads} {side}: {run.rate:7.1f} jobs/s "
                          f"(span {run.span:.2f}s, wall {run.wall:.2f}s, "
                          f"cpu {1000 * run.cpu / run.jobs:.2f} ms/job)", flush=True)
    finally:
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    start = statistics.median(startups)
    print(f"\nworker start-up (empty --once run), median of {len(startups)}: {start:.2f}s "
          f"({', '.join(f'{s:.2f}' for s in startups)})")
    print(f"medians of {args.repeats}; jobs/s = (N-1) / (first to last completed job); "
          "wall-net = N / (wall - start-up) for B, N / wall for A; B/A = median of the "
          "per-repetition ratios")
    head = (f"{'T':>3} | {'baseline A':>10} | {'worker B':>9} | {'B/A':>5} | "
            f"{'A wall-net':>10} | {'B wall-net':>10} | {'B/A':>5} | "
            f"{'A cpu':>6} | {'B cpu':>6}")
    print(head)
    print(f"{'':>3} | {'jobs/s':>10} | {'jobs/s':>9} | {'':>5} | {'jobs/s':>10} | "
          f"{'jobs/s':>10} | {'':>5} | {'ms/job':>6} | {'ms/job':>6}")
    print("-" * len(head))
    for threads in concurrencies:
        a, b = results[threads]["A"], results[threads]["B"]
        ra = statistics.median(r.rate for r in a)
        rb = statistics.median(r.rate for r in b)
        ratio = statistics.median(y.rate / x.rate for x, y in zip(a, b, strict=True))
        wa = statistics.median(r.net_rate(0.0) for r in a)
        wb = statistics.median(r.net_rate(start) for r in b)
        wratio = statistics.median(y.net_rate(start) / x.net_rate(0.0)
                                   for x, y in zip(a, b, strict=True))
        ca = statistics.median(1000 * r.cpu / r.jobs for r in a)
        cb = statistics.median(1000 * r.cpu / r.jobs for r in b)
        print(f"{threads:>3} | {ra:>10.1f} | {rb:>9.1f} | {ratio:>5.2f} | {wa:>10.1f} | "
              f"{wb:>10.1f} | {wratio:>5.2f} | {ca:>6.2f} | {cb:>6.2f}")
    return 0


def moto_version() -> str:
    from harness.moto import MOTO_VENV

    out = subprocess.run([str(MOTO_VENV / "bin" / "python"), "-c",
                          "import moto; print(moto.__version__)"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
