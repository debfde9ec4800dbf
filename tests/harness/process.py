"""One child process the harness owns: started, watched until ready, stopped, reaped.

Every server the tests run as a subprocess (moto, the scanners, Prometheus, the
mxrules programs) goes through this class, so each gets the same guarantees: its
output goes to a log file, ``start`` returns only once a readiness condition holds
(or raises with the log tail, at a deadline or when the child exits early), and
``stop`` sends SIGTERM, then SIGKILL at a deadline, and always reaps the child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any


class ManagedProcess:
    """A child process with its stdout and stderr appended to `log_path`."""

    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start `argv` (extra Popen arguments as given), its output to the log file."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, **popen)
        return self.proc

    def wait_ready(self, ready: Callable[[], bool], timeout: float, *,
                   interval: float = 0.05) -> None:
        """Return once `ready()` is true; RuntimeError if the child exits first,
        TimeoutError after `timeout` s. OSError from `ready` counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.proc
            assert proc is not None
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {proc.returncode} while starting:\n"
                    f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                if ready():
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name} was not ready within {timeout:g}s:\n{self.log_tail()}")
            time.sleep(min(interval, remaining))

    def terminate(self, timeout: float = 10.0, *, wake: Callable[[], object] | None = None,
                  group: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the child is reaped on every path.

        `wake` is called while waiting (for a server that notices the signal only on
        activity); `group` also kills what is left of the child's process group (its
        own, from ``start_new_session=True``). Safe to call twice; returns the exit code.
        """
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    code = self._wait(proc, timeout, wake)
            finally:
                if proc.poll() is None:
                    proc.kill()
                code = proc.wait()
                if group:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes], timeout: float,
              wake: Callable[[], object] | None) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            if wake is not None:
                wake()
            try:
                return proc.wait(timeout=max(0.0, min(0.1 if wake else timeout,
                                                      deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return None

    def log(self) -> str:
        """Everything the child (and earlier starts of it) wrote."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log (every start appends to the same file)."""
        try:
            with self.log_path.open("rb") as f:
                tail = deque(f, maxlen=lines)
        except FileNotFoundError:
            return f"(no {self.name} log)"
        return b"".join(tail).decode("utf-8", "replace")
