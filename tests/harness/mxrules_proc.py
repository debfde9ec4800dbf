"""The real `mxrules milter` and `mxrules worker` programs as subprocesses."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .ports import wait_listening
from .process import ManagedProcess

VENV_BIN = Path(sys.executable).parent
MXRULES = str(VENV_BIN / "mxrules")


class MxrulesProcess(ManagedProcess):
    """`mxrules COMMAND --config PATH` with its output captured to a file."""

    command = "milter"

    def __init__(self, config_path: Path, port: int, log_path: Path,
                 env: dict[str, str] | None = None, user: str | None = None) -> None:
        super().__init__(log_path)
        self.name = f"mxrules {self.command}"
        self.config_path = config_path
        self.port = port
        self.env = env or {}
        # Run as this user (and its group, no others), as the packaged units do with
        # User=mxrules; None: as the test runner.
        self.user = user

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def spawn_mxrules(self) -> None:
        as_user: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.spawn([MXRULES, self.command, "--config", str(self.config_path)],
                   env={**os.environ, "PYTHONSAFEPATH": "1", **self.env}, **as_user)

    def start(self, timeout: float = 20) -> None:
        self.spawn_mxrules()
        try:
            wait_listening("127.0.0.1", self.port, timeout, connect=False)
        except TimeoutError:
            assert self.proc is not None
            code = self.proc.poll()
            raise RuntimeError(
                f"mxrules {self.command} did not listen (exit={code}):\n{self.log()}") from None

    def stop(self) -> None:
        self.terminate(10, wake=self._wake)

    def _wake(self) -> None:
        """Nothing to do: the worker stops on SIGTERM by itself."""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

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
