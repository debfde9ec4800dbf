"""SMTP throughput: Postfix alone, Postfix + a no-op milter, Postfix + mxrules.

Postfix's own load generator, smtp-source(1), sends 10 KB messages with 5
recipients each over 1, 5 and 20 parallel sessions (one message per
connection, as mail arrives at an MX) to three throwaway Postfix instances on
loopback, started side by side and identical but for their milter:

  postfix  no milter
  noop     bench/noop_milter.py: pymilter, every callback CONTINUE (the floor)
  mxrules  the real `mxrules milter`: one rule matching every recipient with
           an AddHeader action and an S3 action, in `delivery: consume` mode;
           every message is spooled (job fsync'd before the 250) and gets the
           added header; no scans, and no SPF/DKIM/DMARC (scan.authentication:
           never; bench_auth.py measures them)

Where the mail ends, in all three: it is accepted (250 after DATA) and then
dropped by Postfix. `postfix` and `noop` queue it and deliver it to Postfix's
discard(8) transport (`default_transport = discard:`); `mxrules` answers
DISCARD at end of data, so Postfix's cleanup drops it before the queue (the
copy is in the mxrules spool), as consume mode does in production. The
mxrules worker does not run (its actions are not part of SMTP throughput);
the bench empties the spool between runs, after checking that every message
has its job. The spool is on local disk (ext4, like the Postfix queues).

Runs are interleaved so that whatever else the machine does hits the three
alike: each repetition runs every session count (alternating direction) and
every configuration for it, rotating which goes first. msg/s is messages /
smtp-source's wall time; the table shows medians, and a ratio is the median
of the per-repetition ratios. Postfix's queue is drained between runs, so a
run never pays for the previous one's deliveries.

    ./run setup && PYTHONSAFEPATH=1 .venv/bin/python bench/bench_throughput.py
    ... --sessions 1,5,20 --messages 1000 --repeats 3 --transport unix   # the defaults
    ... --profile 20            # also: py-spy the mxrules milter during a 20-session run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine

from harness.fixtures import instance_dir
from harness.mxrules_proc import MilterProcess
from harness.ports import free_port, wait_listening
from harness.postfix import Postfix
from harness.stack import write_config

BENCH = Path(__file__).resolve().parent
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
CONFIGS = ("postfix", "noop", "mxrules")
SENDER = "a@sender.test"
RECIPIENT = "user@example.com"  # smtp-source -r N sends to 1user@..., 2user@..., ...
DISCARD = {"default_transport": "discard:bench", "relay_transport": "discard:bench"}
RULE = {"name": "bench", "enabled": True, "recipients": ["example.com"],
        "actions": [{"add_header": {"header_name": "X-Bench", "header_value": "mxrules"}},
                    {"s3": {"bucket_name": "bench-bucket", "object_key_prefix": "in/"}}]}


@dataclass
class Run:
    config: str
    sessions: int
    messages: int
    wall: float
    milter_cpu: float  # CPU seconds of the milter process (0 for `postfix`)
    milter_sys: float  # of which in the kernel
    busy: float  # share of the machine's CPU time that was not idle during the run

    @property
    def rate(self) -> float:
        return self.messages / self.wall


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads), from /proc/PID/stat."""
    if pid is None:
        return 0.0, 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Rig:
    """The three Postfix instances and two milters, started once and stopped on any exit."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.work = Path(tempfile.mkdtemp(prefix="mxrules-bench-tp-"))
        self.work.chmod(0o711)  # smtpd (user postfix) reaches the unix sockets in here
        self.postfix: dict[str, Postfix] = {}
        self.noop: subprocess.Popen[bytes] | None = None
        self.mxrules: MilterProcess | None = None
        self.spool = self.work / "spool"

    def _listen(self, name: str) -> tuple[str, str, int]:
        """(libmilter listen spec, Postfix milter spec, TCP port or 0) for one milter."""
        if self.transport == "unix":
            path = self.work / f"{name}.sock"
            return f"unix:{path}", f"unix:{path}", 0
        port = free_port()
        return f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}", port

    def start(self) -> None:
        noop_listen, noop_spec, noop_port = self._listen("noop")
        with open(self.work / "noop.log", "ab") as log:
            self.noop = subprocess.Popen(
                [sys.executable, str(BENCH / "noop_milter.py"), noop_listen],
                stdout=log, stderr=log, env={**os.environ, "PYTHONSAFEPATH": "1"})
        mx_listen, mx_spec, mx_port = self._listen("mxrules")
        milter: dict[str, object] = {"listen": mx_listen, "reload_interval": 5.0}
        if self.transport == "unix":
            milter["socket_mode"] = "0666"
        # No SPF/DKIM/DMARC either (their cost, on against off: bench_auth.py), so these
        # figures stay comparable with the runs recorded before they ran on every message.
        cfg = write_config(self.work, port=mx_port, rules=[RULE], filters=[], milter=milter,
                           scan={"authentication": "never"})
        self.mxrules = MilterProcess(cfg, mx_port, self.work / "mxrules.log")
        self.mxrules.spawn()
        self._wait_milter(noop_listen, noop_port, self.noop, self.work / "noop.log")
        assert self.mxrules.proc is not None
        self._wait_milter(mx_listen, mx_port, self.mxrules.proc, self.work / "mxrules.log")
        for config, spec in (("postfix", None), ("noop", noop_spec), ("mxrules", mx_spec)):
            # What mxrules does not consume (nothing, here) would end at discard(8) too.
            p = Postfix(workdir=instance_dir(), smtp_port=free_port(), milter=spec, tls=False,
                        extra=DISCARD)
            self.postfix[config] = p
            p.start()

    @staticmethod
    def _wait_milter(listen: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"milter {listen} exited:\n{log.read_text()[-3000:]}")
            if port:
                try:
                    wait_listening("127.0.0.1", port, 0.2, connect=False)
                    return
                except TimeoutError:
                    pass
            elif Path(listen.removeprefix("unix:")).exists():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"milter {listen} not up:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    def milter_pid(self, config: str) -> int | None:
        if config == "noop" and self.noop is not None:
            return self.noop.pid
        if config == "mxrules" and self.mxrules is not None and self.mxrules.proc is not None:
            return self.mxrules.proc.pid
        return None

    def stop(self) -> None:
        for p in self.postfix.values():
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {p}: {exc}", file=sys.stderr)
            else:
                shutil.rmtree(p.workdir, ignore_errors=True)
        if self.noop is not None and self.noop.poll() is None:
            self.noop.terminate()
            try:
                self.noop.wait(10)
            except subprocess.TimeoutExpired:
                self.noop.kill()
                self.noop.wait()
        if self.mxrules is not None:
            self.mxrules.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- one run ----------------------------------------------------------------------

    def run(self, config: str, sessions: int, messages: int, size: int, rcpts: int) -> Run:
        p = self.postfix[config]
        pid = self.milter_pid(config)
        log_from = p.log_size()
        argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                "-r", str(rcpts), "-f", SENDER, "-t", RECIPIENT, "-M", "client.test",
                f"127.0.0.1:{p.smtp_port}"]
        user0, sys0 = cpu_seconds(pid)
        busy0, total0 = machine_times()
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        wall = time.monotonic() - t0
        busy1, total1 = machine_times()
        user1, sys1 = cpu_seconds(pid)
        if out.returncode != 0 or out.stderr.strip():
            raise RuntimeError(f"smtp-source against {config} exited {out.returncode}:\n"
                               f"{out.stderr[-2000:]}\nmaillog tail:\n{p.log_tail(20)}")
        self._settle(config, messages, rcpts, log_from)
        return Run(config, sessions, messages, wall, user1 - user0 + sys1 - sys0, sys1 - sys0,
                   (busy1 - busy0) / max(1, total1 - total0))

    def _settle(self, config: str, messages: int, rcpts: int, log_from: int) -> None:
        """Check where every message ended, and leave nothing behind for the next run."""
        p = self.postfix[config]
        if config == "mxrules":
            incoming = self.spool / "incoming"
            jobs = list(incoming.iterdir())
            leftover = [e for e in (self.spool / "tmp").iterdir()] if (
                self.spool / "tmp").is_dir() else []
            discards = _wait_count(p, r"milter triggers DISCARD action", messages, log_from)
            if len(jobs) != messages or leftover or discards != messages:
                raise RuntimeError(f"mxrules: {len(jobs)} jobs, {len(leftover)} in tmp/, "
                                   f"{discards} discards, {messages} messages sent")
            for job in jobs:
                shutil.rmtree(job)
            assert self.mxrules is not None
            problems = self.mxrules.problems()
            if problems:
                raise RuntimeError("mxrules milter logged problems:\n" + "\n".join(problems[:20]))
        else:
            sent = _wait_count(p, r"status=sent \(bench\)", messages * rcpts, log_from)
            if sent != messages * rcpts:
                raise RuntimeError(f"{config}: {sent} recipients discarded, "
                                   f"{messages * rcpts} sent")
        deadline = time.monotonic() + 60
        while not p.queue_empty():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{config}: Postfix queue not empty after 60 s")
            time.sleep(0.1)


def _wait_count(p: Postfix, pattern: str, want: int, since: int, timeout: float = 60) -> int:
    """How many maillog lines after `since` match, once `want` do or `timeout` passed."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        n = len(regex.findall(p.maillog(), since))
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def profile(rig: Rig, sessions: int, messages: int, size: int, rcpts: int, out: Path) -> None:
    """py-spy record the mxrules milter (all threads, on-CPU samples) during one run.

    A .txt output is py-spy's raw format (collapsed stacks), anything else an SVG flame graph.
    """
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = rig.milter_pid("mxrules")
    assert pid is not None
    spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--rate", "200",
                            "--format", "raw" if out.suffix == ".txt" else "flamegraph",
                            "--output", str(out), "--threads"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    r = rig.run("mxrules", sessions, messages, size, rcpts)
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not out.exists():
        print(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-2000:]}")
        return
    print(f"profiled {r.messages} messages at {r.rate:.1f} msg/s with py-spy -> {out}")


def chart(results: dict[tuple[str, int], list[Run]], sessions: list[int], path: Path,
          title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"no chart: matplotlib is missing (apt-get install python3-matplotlib); "
                f"{path} not written")
    labels = {"postfix": "Postfix alone", "noop": "Postfix + no-op pymilter",
              "mxrules": "Postfix + mxrules milter"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in CONFIGS:
        ys = [statistics.median(r.rate for r in results[config, s]) for s in sessions]
        line = ax.plot(sessions, ys, marker="o", label=labels[config])[0]
        for s in sessions:  # every repetition, faintly
            ax.scatter([s] * len(results[config, s]), [r.rate for r in results[config, s]],
                       color=line.get_color(), alpha=0.3, s=12)
    ax.set_xlabel("parallel SMTP sessions (smtp-source -s)")
    ax.set_ylabel("messages/s (median)")
    ax.set_xticks(sessions)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def table(results: dict[tuple[str, int], list[Run]], sessions: list[int]) -> list[str]:
    head = (f"{'sessions':>8} | {'postfix':>8} | {'noop':>8} | {'mxrules':>8} | "
            f"{'mx/noop':>7} | {'mx/postfix':>10} | {'noop cpu':>8} | {'mx cpu':>7} | "
            f"{'busy':>5}")
    lines = [head,
             f"{'':>8} | {'msg/s':>8} | {'msg/s':>8} | {'msg/s':>8} | {'':>7} | {'':>10} | "
             f"{'ms/msg':>8} | {'ms/msg':>7} | {'':>5}",
             "-" * len(head)]
    for s in sessions:
        pf, no, mx = (results[c, s] for c in CONFIGS)

        def med(runs: list[Run]) -> float:
            return statistics.median(r.rate for r in runs)

        r_noop = statistics.median(m.rate / n.rate for m, n in zip(mx, no, strict=True))
        r_pf = statistics.median(m.rate / p.rate for m, p in zip(mx, pf, strict=True))
        c_no = statistics.median(1000 * r.milter_cpu / r.messages for r in no)
        c_mx = statistics.median(1000 * r.milter_cpu / r.messages for r in mx)
        busy = statistics.median(r.busy for r in pf + no + mx)
        lines.append(f"{s:>8} | {med(pf):>8.1f} | {med(no):>8.1f} | {med(mx):>8.1f} | "
                     f"{r_noop:>7.2f} | {r_pf:>10.2f} | {c_no:>8.2f} | {c_mx:>7.2f} | "
                     f"{busy:>5.0%}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1,5,20", help="comma-separated parallel sessions")
    ap.add_argument("--messages", type=int, default=1000, help="messages per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--size", type=int, default=10240, help="message payload bytes (-l)")
    ap.add_argument("--rcpts", type=int, default=5, help="recipients per message (-r)")
    ap.add_argument("--transport", choices=("unix", "inet"), default="unix",
                    help="how Postfix reaches both milters (default: unix socket)")
    ap.add_argument("--chart", default=str(BENCH / "throughput.png"),
                    help="PNG chart of msg/s against sessions ('' for none)")
    ap.add_argument("--profile", type=int, default=0, metavar="SESSIONS",
                    help="after the runs, py-spy the mxrules milter over one run at SESSIONS")
    ap.add_argument("--profile-out", type=Path, default=Path("mxrules-milter-profile.svg"),
                    help="py-spy output: .svg flame graph or .txt collapsed stacks")
    args = ap.parse_args()
    sessions = [int(s) for s in args.sessions.split(",")]
    if not os.access(SMTP_SOURCE, os.X_OK):
        ap.error(f"{SMTP_SOURCE} not found (Debian: postfix's smtp-source, in package postfix)")

    for line in machine.describe():
        print(line)
    print(f"{args.messages} messages per run, {args.size} bytes payload, {args.rcpts} "
          f"recipients, sessions {sessions}, {args.repeats} interleaved repetitions, "
          f"milters on {'a unix socket' if args.transport == 'unix' else 'TCP (loopback)'}; "
          "mxrules worker not running")
    print(f"before: {machine.load()}", flush=True)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the finally below stops every Postfix and milter

    signal.signal(signal.SIGTERM, terminate)
    rig = Rig(args.transport)
    results: dict[tuple[str, int], list[Run]] = {(c, s): [] for c in CONFIGS for s in sessions}
    try:
        rig.start()
        for config in CONFIGS:  # warm-up, not counted: page cache, imports, first connections
            rig.run(config, 5, 50, args.size, args.rcpts)
        turn = 0
        for rep in range(args.repeats):
            order = sessions if rep % 2 == 0 else sessions[::-1]
            for s in order:
                configs = CONFIGS[turn % 3:] + CONFIGS[:turn % 3]
                turn += 1
                for config in configs:
                    r = rig.run(config, s, args.messages, args.size, args.rcpts)
                    results[config, s].append(r)
                    print(f"  rep {rep + 1} sessions={s:<3} {config:<8} {r.rate:7.1f} msg/s "
                          f"(wall {r.wall:.2f}s, milter cpu "
                          f"{1000 * r.milter_cpu / r.messages:.2f} ms/msg of which sys "
                          f"{1000 * r.milter_sys / r.messages:.2f}, machine busy "
                          f"{r.busy:.0%})", flush=True)
        during = machine.load()
        if args.profile:
            profile(rig, args.profile, args.messages, args.size, args.rcpts, args.profile_out)
    finally:
        rig.stop()

    print(f"after: {during}")
    print(f"\nmedians of {args.repeats}; ratio = median of the per-repetition ratios; cpu = "
          "the milter process's CPU per message; busy = share of both cores in use")
    lines = table(results, sessions)
    print("\n".join(lines))
    if args.chart:
        print(chart(results, sessions, Path(args.chart),
                    f"smtp-source, {args.size // 1024} KB, {args.rcpts} rcpts, "
                    f"milter on {args.transport}, {os.cpu_count()} cores"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
