"""Fault injection: a whole chain (Postfix + milter + worker + moto S3), a switchable
AWS endpoint, parallel senders and the bookkeeping that proves nothing was lost.

Every fault test asks one question at the end: for each message the client was
given 250 for, did its S3 object land, or is it a dead letter in the spool's
failed/?  `account()` answers it from the real outcomes (the objects in moto's
bucket, the files in failed/, the PutObject requests moto recorded), never from
what the programs say about themselves.

Loaded as a pytest plugin from tests/conftest.py for the ``make_chain`` and
``aws_proxy`` fixtures.
"""

from __future__ import annotations

import collections
import contextlib
import email.parser
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port, wait_listening
from harness.postfix import Postfix
from harness.smtp import DISCONNECTED, Result, send
from harness.stack import write_config
from mxrules.spool import STATES, Spool

BUCKET = "mail-bucket"
PREFIX = "mail/"
RCPT = "user@example.com"
SENDER = "a@sender.test"


# -- messages ---------------------------------------------------------------------------------

def mail(tag: str, n: int, body: bytes = b"Hello.\r\n") -> tuple[str, bytes]:
    """A small numbered message; returns (its Message-ID, its bytes)."""
    mid = f"<{tag}-{n}@sender.test>"
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {tag} {n}\r\n"
            f"Message-ID: {mid}\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n")
    return mid, head.encode() + body


def message_id_of(raw: bytes) -> str:
    """The Message-ID header of a stored message ("" when there is none)."""
    headers = email.parser.BytesHeaderParser().parsebytes(raw[:8192])
    return str(headers.get("Message-ID", "")).strip()


# -- the chain --------------------------------------------------------------------------------

def s3_rules(bucket: str = BUCKET) -> list[dict[str, Any]]:
    """One rule, one action: store in S3 (the action every fault test counts)."""
    return [{"name": "store", "enabled": True, "recipients": [RCPT],
             "actions": [{"s3": {"bucket_name": bucket, "object_key_prefix": PREFIX}}]}]


@dataclass
class Chain:
    """Postfix -> mxrules milter -> spool -> mxrules worker -> S3 (moto, or a proxy to it)."""

    dir: Path
    config_path: Path
    config: dict[str, Any]  # write_config's keyword arguments, to write it again
    moto: MotoServer
    milter: MilterProcess
    worker: WorkerProcess
    postfix: Postfix
    spool: Spool
    milter_metrics_port: int

    def send(self, msg: bytes, rcpts: tuple[str, ...] = (RCPT,)) -> Result:
        return send("127.0.0.1", self.postfix.smtp_port, SENDER, rcpts, msg)

    def rewrite_config(self) -> None:
        """Write the good config again (atomically), e.g. over a broken one."""
        write_config(self.dir, **self.config)

    def counts(self) -> dict[str, int]:
        return {s: len(self.spool.ids(s)) for s in ("tmp", *STATES)}

    def wait_idle(self, timeout: float = 60) -> dict[str, int]:
        """Wait until no job is incoming, active or deferred (each is done or dead).

        The states are listed one after another, so a job renamed from deferred/ to
        active/ in between is missed by one look: idle must be seen three times running.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            counts = self.counts()
            idle = counts["incoming"] == counts["active"] == counts["deferred"] == 0
            seen = seen + 1 if idle else 0
            if seen == 3:
                return counts
            if time.monotonic() > deadline:
                raise TimeoutError(f"spool not idle: {counts}\n{self.worker.log()[-3000:]}")
            time.sleep(0.05)

    def worker_metrics(self) -> Samples:
        return scrape(self.worker.port)

    def milter_metrics(self) -> Samples:
        return scrape(self.milter_metrics_port)

    def account(self, accepted: set[str]) -> Tally:
        return account(self, accepted)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of a Prometheus endpoint, keyed by (name, sorted labels)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when it is absent (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def make_chain(moto_server: MotoServer, postfix_factory: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Chain]]:
    """Build a started chain; `endpoint_url`, `spool_dir`, `worker` and `aws` can be changed."""
    procs: list[MilterProcess | WorkerProcess] = []

    def make(*, endpoint_url: str | None = None, spool_dir: Path | None = None,
             worker: dict[str, Any] | None = None, aws: dict[str, Any] | None = None,
             milter: dict[str, Any] | None = None,
             rules: list[dict[str, Any]] | None = None) -> Chain:
        directory = tmp_path_factory.mktemp("chain")
        moto_server.make_bucket(BUCKET)
        milter_port, worker_port, milter_metrics = free_port(), free_port(), free_port()
        config: dict[str, Any] = {
            "port": milter_port,
            "rules": rules or s3_rules(),
            "metrics": {"milter_listen": f"127.0.0.1:{milter_metrics}",
                        "worker_listen": f"127.0.0.1:{worker_port}"},
            "aws": {"region": "us-east-1", "endpoint_url": endpoint_url or moto_server.endpoint_url,
                    "connect_timeout": 1, "read_timeout": 5, **(aws or {})},
            "worker": {"threads": 2, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                       "retry_max_delay": 0.5, "drain_timeout": 10, **(worker or {})},
        }
        if milter:
            config["milter"] = {"listen": f"inet:{milter_port}@127.0.0.1",
                                "reload_interval": 0.2, **milter}
        if spool_dir is not None:
            config["spool"] = {"directory": str(spool_dir)}
        path = write_config(directory, **config)
        m = MilterProcess(path, milter_port, directory / "milter.log")
        w = WorkerProcess(path, worker_port, directory / "worker.log", env=moto_server.aws_env())
        procs.extend([m, w])  # before start(): stopped at teardown whatever happens
        m.start()
        w.start()
        postfix = postfix_factory(milter=m.postfix_spec)
        return Chain(directory, path, config, moto_server, m, w, postfix,
                     Spool(str(spool_dir or directory / "spool")), milter_metrics)

    yield make
    for p in procs:
        p.stop()


# -- senders ----------------------------------------------------------------------------------

@dataclass
class Sent:
    """What one message's client saw: every try's result, and whether it ended in 250."""

    message_id: str
    tries: list[Result] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return bool(self.tries) and _data_code(self.tries[-1]) == 250

    @property
    def uncertain(self) -> int:
        """Tries that sent the whole message and got no reply or a 4xx: the server may
        have kept it all the same (a session cut after the milter committed its job)."""
        return sum(1 for r in self.tries
                   if r.data is not None and (r.data[0] == DISCONNECTED or 400 <= r.data[0] < 500))


def _data_code(result: Result) -> int | None:
    return None if result.data is None else result.data[0]


def transient(result: Result) -> bool:
    """A failure a real client retries later: no connection, a drop, or a 4xx."""
    replies = [result.connect, result.ehlo, result.mail, *result.rcpts.values(), result.data]
    return any(r is not None and (r[0] == DISCONNECTED or 400 <= r[0] < 500) for r in replies)


def send_all(chain: Chain, messages: list[tuple[str, bytes]], *, sessions: int = 4,
             resend_for: float = 0.0, progress: Progress | None = None,
             pause: float = 0.0) -> list[Sent]:
    """Send every message over `sessions` parallel SMTP sessions, one message per session.

    With `resend_for` > 0 a message that met a transient failure is sent again (as a real
    client would, after a short wait) until accepted or that many seconds have passed.
    `progress` is given the running count of accepted messages.
    """
    count = 0
    lock = threading.Lock()

    def one(item: tuple[str, bytes]) -> Sent:
        nonlocal count
        mid, raw = item
        sent = Sent(mid)
        deadline = time.monotonic() + resend_for
        while True:
            result = chain.send(raw)
            sent.tries.append(result)
            if sent.accepted or not transient(result) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if sent.accepted:
            with lock:
                count += 1
                n = count
            if progress is not None:
                progress.set(n)
        if pause:
            time.sleep(pause)
        return sent

    with ThreadPoolExecutor(sessions) as pool:
        return list(pool.map(one, messages))


# -- accounting -------------------------------------------------------------------------------

@dataclass
class Tally:
    """Where every accepted message ended up."""

    accepted: set[str]
    landed: collections.Counter[str]  # Message-ID -> S3 objects holding it
    dead: collections.Counter[str]  # Message-ID -> dead letters in failed/
    puts: collections.Counter[str]  # S3 key -> PutObject requests moto received for it

    @property
    def lost(self) -> set[str]:
        return {m for m in self.accepted if not self.landed[m] and not self.dead[m]}

    @property
    def strangers(self) -> set[str]:
        """Stored messages no client sent (or none that the client was told of)."""
        return set(self.landed) - self.accepted

    @property
    def extra_objects(self) -> int:
        """Messages stored more than once (a resend after a lost 250)."""
        return sum(n - 1 for n in self.landed.values() if n > 1)

    @property
    def repeated_puts(self) -> int:
        """Actions run again for the same job (a worker killed mid-action)."""
        return sum(n - 1 for n in self.puts.values() if n > 1)

    @property
    def duplicates(self) -> int:
        return self.extra_objects + self.repeated_puts

    def summary(self) -> str:
        return (f"accepted={len(self.accepted)} landed={sum(self.landed.values())} "
                f"dead={sum(self.dead.values())} lost={len(self.lost)} "
                f"extra_objects={self.extra_objects} repeated_puts={self.repeated_puts}")


def account(chain: Chain, accepted: set[str]) -> Tally:
    """Read back every S3 object and dead letter (call once the spool is idle)."""
    keys = chain.moto.s3_keys(BUCKET, PREFIX)
    s3 = chain.moto.client("s3")

    def mid_of(key: str) -> str:
        body = s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-8191")["Body"].read()
        return message_id_of(body)

    with ThreadPoolExecutor(4) as pool:
        landed = collections.Counter(pool.map(mid_of, keys))
    dead: collections.Counter[str] = collections.Counter()
    for job_id in chain.spool.ids("failed"):
        with open(chain.spool.message_path("failed", job_id), "rb") as fh:
            dead[message_id_of(fh.read(8192))] += 1
    return Tally(accepted, landed, dead, recorded_puts(chain.moto))


def recorded_puts(moto: MotoServer) -> collections.Counter[str]:
    """PutObject requests per key, from moto's request recording."""
    import json
    puts: collections.Counter[str] = collections.Counter()
    marker = f"/{BUCKET}/".encode()
    with moto.recording_path.open("rb") as fh:
        for line in fh:
            if marker not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # the line moto is writing right now
                continue
            url = rec.get("url", "")
            if rec.get("method") == "PUT" and f"/{BUCKET}/" in url:
                puts[url.split(f"/{BUCKET}/", 1)[1].split("?", 1)[0]] += 1
    return puts


# -- a switchable AWS endpoint --------------------------------------------------------------

_ERROR_500 = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
_ERROR_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>"
               b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class AwsProxy:
    """A loopback endpoint for the worker's AWS calls whose behaviour a test switches.

    Modes: ``refuse`` (nothing listens: connections are refused), ``hang`` (connections
    are accepted, requests read, never answered), ``error`` (every request is answered
    500 InternalError) and ``forward`` (a plain TCP relay to the real backend).  A
    mode applies to connections accepted after the switch; switching away from
    ``hang`` closes the held connections.
    """

    MODES = ("refuse", "hang", "error", "forward")

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.port = free_port()
        self.mode = "refuse"
        self.seen: collections.Counter[str] = collections.Counter()  # connections per mode
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in self.MODES, mode
        with self._lock:
            self.mode = mode
            held, self._held = self._held, []
        for conn in held:
            _close(conn)
        if mode == "refuse":
            self._stop_listening()
        elif self._listener is None:
            listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR
            listener.settimeout(0.1)  # close() does not wake accept(): poll
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
            wait_listening("127.0.0.1", self.port, 5, connect=False)

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                mode = self.mode
                self.seen[mode] += 1
            handler = {"hang": self._hang, "error": self._error, "forward": self._forward}[mode]
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _hang(self, conn: socket.socket) -> None:
        with self._lock:
            self._held.append(conn)
        try:
            while conn.recv(65536):  # read whatever comes, answer nothing
                pass
        except OSError:
            pass

    def _error(self, conn: socket.socket) -> None:
        try:
            _read_request(conn)
            conn.sendall(_ERROR_500 % (len(_ERROR_BODY), _ERROR_BODY))
        except OSError:
            pass
        finally:
            _close(conn)

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.backend, timeout=5)
        except OSError:
            _close(conn)
            return
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def close(self) -> None:
        self._stop_listening()
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            _close(conn)


def _read_request(conn: socket.socket) -> None:
    """Read one HTTP request's head, and its body unless it waits for 100-continue."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    if fields.get(b"expect", b"").lower() == b"100-continue":
        return  # botocore reads a final status in place of 100 and skips the body
    length = int(fields.get(b"content-length", b"0") or 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        rest += chunk


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def aws_proxy(moto_server: MotoServer) -> Iterator[AwsProxy]:
    """An AwsProxy in front of the test's moto server, refusing connections at first."""
    proxy = AwsProxy((moto_server.host, moto_server.port))
    yield proxy
    proxy.close()


# -- a raw SMTP session, for a client that stops half-way through DATA ------------------------

class RawSession:
    """SMTP over a plain socket, so a test can send part of a message and wait."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; (-1, error) when the connection drops."""
        lines: list[bytes] = []
        try:
            while True:
                while b"\r\n" not in self.buf:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        return DISCONNECTED, "connection closed"
                    self.buf += chunk
                line, self.buf = self.buf.split(b"\r\n", 1)
                lines.append(line)
                if len(line) < 4 or line[3:4] != b"-":
                    break
        except OSError as exc:
            return DISCONNECTED, str(exc)
        return int(lines[-1][:3]), "\n".join(x[4:].decode(errors="replace") for x in lines)

    def command(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.command("QUIT")
        self.sock.close()


# -- a small filesystem for the spool ---------------------------------------------------------

def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file in `directory` until the filesystem has no space left."""
    path = directory / name
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
        for size in (4096, 512, 1):  # the last partial block too
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                continue
    return path


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted for the test (skipped locally, failed in CI, if mount is refused)."""
    import subprocess

    from harness import components
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if proc.returncode != 0:
        components.unavailable(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# -- reporting ---------------------------------------------------------------------------------

class Progress:
    """A count other threads can wait for (accepted messages, as a sender goes on)."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()

    def set(self, value: int) -> None:
        with self._cond:
            self.value = max(self.value, value)
            self._cond.notify_all()

    def wait_for(self, value: int, timeout: float = 60) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self.value >= value, timeout):
                raise TimeoutError(f"count stayed at {self.value}, wanted {value}")
            return self.value


REPORTS: list[str] = []


def report(test: str, tally: Tally, **facts: object) -> None:
    """Keep one line per fault test for the end-of-run summary (duplicates, retries...)."""
    extra = " ".join(f"{k}={v}" for k, v in facts.items())
    REPORTS.append(f"{test}: {tally.summary()} {extra}".rstrip())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What each fault test counted, printed at the end of the run."""
    if REPORTS:
        terminalreporter.section("fault injection")
        for line in REPORTS:
            terminalreporter.write_line(line)
