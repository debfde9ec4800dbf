"""The real `mxrules milter` and `mxrules worker` programs as subprocesses."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .ports import wait_listening
from .waiting import wait_until

VENV_BIN = Path(sys.executable).parent
MXRULES = str(VENV_BIN / "mxrules")


class MxrulesProcess:
    """`mxrules COMMAND --config PATH` with its output captured to a file."""

    command = "milter"

    def __init__(self, config_path: Path, port: int, log_path: Path,
                 env: dict[str, str] | None = None, user: str | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.env = env or {}
        # Run as this user (and its group, no others), as the packaged units do with
        # User=mxrules; None: as the test runner.
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def spawn(self) -> None:
        as_user: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [MXRULES, self.command, "--config", str(self.config_path)],
                stdout=log, stderr=log,
                env={**os.environ, "PYTHONSAFEPATH": "1", **self.env},
                **as_user,
            )

    def start(self, timeout: float = 20) -> None:
        self.spawn()
        assert self.proc is not None
        try:
            wait_listening("127.0.0.1", self.port, timeout, connect=False)
        except TimeoutError:
            code = self.proc.poll()
            raise RuntimeError(
                f"mxrules {self.command} did not listen (exit={code}):\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        proc = self.proc
        try:
            wait_until(lambda: self._wake() or proc.poll() is not None,
                       f"mxrules {self.command} to stop", timeout=10, interval=0.1)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait(10)

    def _wake(self) -> None:
        """Nothing to do: the worker stops on SIGTERM by itself."""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 20, after: int = 0) -> re.Match[str]:
        """Wait for a log line matching `pattern` (searching from offset `after`)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while True:
            m = rx.search(self.log(), after)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line matching {pattern!r} in:\n{self.log()[-3000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.command} exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """Log lines at WARNING or above (a happy path must have none)."""
        return [line for line in self.log().splitlines()
                if line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))]


class MilterProcess(MxrulesProcess):
    command = "milter"

    def _wake(self) -> None:
        """Connect, as Postfix would: libmilter's listener sees a stop request within its
        5 s poll or at the next connection (tests/integration/test_milter_stop.py waits
        the 5 s; a teardown need not)."""
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", self.port), timeout=1):
            pass


class WorkerProcess(MxrulesProcess):
    """The worker; `port` is its metrics port, which tells when it is up."""

    command = "worker"
