"""The shared directory fsync of spool commits: no commit returns before an fsync
that started after its rename has completed, and a failed fsync covers no one.
A commit whose rename cannot be made durable takes the job back, unless a
worker already has it."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.jobs import make_job
from mxrules import spool_files
from mxrules.errors import SpoolError
from mxrules.ids import new_message_id
from mxrules.spool import Spool, ses_timestamp


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

    monkeypatch.setattr(spool_files, "fsync_dir", fake_fsync)
    shared = spool_files.SharedDirSync(str(tmp_path))
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

    monkeypatch.setattr(spool_files, "fsync_dir", failing)
    with pytest.raises(OSError, match="No space"):
        spool_files.SharedDirSync(str(tmp_path)).sync()


def test_an_fsync_already_running_at_the_rename_does_not_cover_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started: list[int] = []

    def fake_fsync(path: str) -> None:
        started.append(len(started) + 1)
        if len(started) == 1:
            assert release.wait(5)  # the first fsync is slow: B renames meanwhile

    monkeypatch.setattr(spool_files, "fsync_dir", fake_fsync)
    shared = spool_files.SharedDirSync(str(tmp_path))
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


# -- a commit whose rename cannot be made durable ---------------------------------

def _commit_with_failing_fsync(root: Path, monkeypatch: pytest.MonkeyPatch, failing: str,
                               meanwhile: Callable[[Spool, str], object] = lambda s, i: None
                               ) -> tuple[Spool, str, str | SpoolError]:
    """Commit one job while every fsync of the `failing` directory fails with EIO."""
    spool = Spool(str(root))
    spool.ensure()
    writer = spool.new_job(new_message_id())
    real = spool_files.fsync_dir

    def fsync(path: str) -> None:
        if os.path.basename(path) == failing:
            meanwhile(spool, writer.message_id)
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_files, "fsync_dir", fsync)
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    job = make_job(message_id=writer.message_id, queue_id="Q1", received_at=ses_timestamp(),
                   mail_from="a@example.net", recipients=("b@example.com",),
                   message_size=writer.size, message_sha256=writer.sha256)
    try:
        return spool, writer.message_id, writer.commit(job)
    except SpoolError as exc:
        return spool, writer.message_id, exc


def test_a_rename_into_incoming_that_cannot_be_made_durable_is_taken_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _, outcome = _commit_with_failing_fsync(tmp_path, monkeypatch, "incoming")
    assert isinstance(outcome, SpoolError)  # 451: and no worker will ever run it
    assert spool.ids("incoming") == [] and spool.ids("tmp") == []


def test_a_job_a_worker_took_before_the_failed_fsync_stays_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answering 451 for a job that runs anyway would duplicate it on the client's retry."""
    def worker_takes_it(spool: Spool, job_id: str) -> None:
        assert spool.claim("incoming", job_id) is not None

    spool, job_id, outcome = _commit_with_failing_fsync(tmp_path, monkeypatch, "incoming",
                                                        worker_takes_it)
    assert outcome == str(tmp_path / "incoming" / job_id)
    assert spool.ids("active") == [job_id]


def test_a_failed_fsync_of_tmp_after_the_job_is_durable_does_not_fail_the_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, job_id, outcome = _commit_with_failing_fsync(tmp_path, monkeypatch, "tmp")
    assert outcome == str(tmp_path / "incoming" / job_id)
    assert spool.ids("incoming") == [job_id]
