"""The shared directory fsync of spool commits: no commit returns before an fsync
that started after its rename has completed, and a failed fsync covers no one."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from mxrules import spool as spool_mod


def test_every_sync_returns_after_an_fsync_that_started_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    clock = [0]  # a logical clock: every event gets the next tick
    completed: list[tuple[int, int]] = []  # (start tick, end tick) of successful fsyncs
    calls = [0]

    def tick() -> int:
        with lock:
            clock[0] += 1
            return clock[0]

    def fake_fsync(path: str) -> None:
        start = tick()
        calls[0] += 1
        time.sleep(random.uniform(0, 0.002))
        if random.random() < 0.2:
            raise OSError(5, "injected fsync failure")
        end = tick()
        with lock:
            completed.append((start, end))

    monkeypatch.setattr(spool_mod, "_fsync_dir", fake_fsync)
    shared = spool_mod._SharedDirSync(str(tmp_path))
    violations: list[str] = []
    failures = [0]
    n_threads, per_thread = 20, 40

    def committer() -> None:
        for _ in range(per_thread):
            renamed = tick()  # the commit's rename, just before it asks for the sync
            try:
                shared.sync()
            except OSError:
                with lock:
                    failures[0] += 1
                continue
            returned = tick()
            with lock:
                if not any(renamed < start and end < returned for start, end in completed):
                    violations.append(f"rename at {renamed} returned at {returned} uncovered")

    threads = [threading.Thread(target=committer) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert failures[0] > 0  # the injected failures reached their callers
    # Shared: fewer fsyncs than syncs asked for.
    assert calls[0] < n_threads * per_thread


def test_a_failed_fsync_is_the_callers_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod, "_fsync_dir", failing)
    with pytest.raises(OSError, match="No space"):
        spool_mod._SharedDirSync(str(tmp_path)).sync()


def test_an_fsync_already_running_at_the_rename_does_not_cover_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started: list[int] = []

    def fake_fsync(path: str) -> None:
        started.append(len(started) + 1)
        if len(started) == 1:
            assert release.wait(5)  # the first fsync is slow: B renames meanwhile

    monkeypatch.setattr(spool_mod, "_fsync_dir", fake_fsync)
    shared = spool_mod._SharedDirSync(str(tmp_path))
    a = threading.Thread(target=shared.sync)
    a.start()
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.001)
    assert started == [1]
    b_done: list[int] = []  # how many fsyncs had started when B returned
    b = threading.Thread(target=lambda: (shared.sync(), b_done.append(len(started))))
    b.start()  # B's rename happened after fsync 1 started
    time.sleep(0.05)
    assert b_done == []  # B waits
    release.set()
    a.join(5)
    b.join(5)
    assert b_done == [2]  # B returned only after an fsync of its own (or a later one)
