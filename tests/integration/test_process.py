"""The harness's managed child process: readiness, early exit, SIGTERM then SIGKILL."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from harness.process import ManagedProcess

# A child that writes its pid, says it is ready, and ignores SIGTERM if told to.
CHILD = """\
import os, signal, sys, time
if sys.argv[1] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def _child(tmp_path: Path, mode: str) -> ManagedProcess:
    child = ManagedProcess(tmp_path / "child.log")
    child.spawn([sys.executable, "-c", CHILD, mode])
    child.wait_ready(lambda: "ready" in child.log(), timeout=30)
    return child


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("mode", "status"), [
    pytest.param("polite", -signal.SIGTERM, id="stops-on-sigterm"),
    pytest.param("deaf", -signal.SIGKILL, id="killed-at-the-deadline"),
])
def test_stop_ends_and_reaps_the_child(tmp_path: Path, mode: str, status: int) -> None:
    child = _child(tmp_path, mode)
    assert child.proc is not None
    pid = child.proc.pid
    assert child.terminate(timeout=1) == status
    assert _gone(pid)  # reaped: not even a zombie is left
    assert not child.running
    assert child.terminate() is None  # a second stop is harmless


def test_early_exit_fails_the_start_with_the_log(tmp_path: Path) -> None:
    child = ManagedProcess(tmp_path / "child.log")
    child.spawn([sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"(?s)exited with 3.*cannot bind"):
        child.wait_ready(lambda: False, timeout=30)
    child.terminate()
