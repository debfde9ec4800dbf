"""An error outside an action's own handling backs the job off; it never loops.

The actions' errors are the runner's business (tests/integration/test_actions.py).
Here the runner itself fails, as a bug would: the worker must record the failure
on the job and wait, or, when even that fails, leave the job alone for a while,
instead of taking it again at once from active/.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from harness.jobs import make_job
from mxrules import config as config_mod
from mxrules.actions.retry import RetryPolicy
from mxrules.actions.runner import Runner
from mxrules.actions.worker import Worker
from mxrules.ids import new_message_id
from mxrules.rules import Rule, S3Action
from mxrules.spool import MatchedRule


def _worker(tmp_path: Path) -> Worker:
    path = tmp_path / "mxrules.yaml"
    path.write_text(yaml.safe_dump({
        "spool": {"directory": str(tmp_path / "spool")},
        "metrics": {"worker_listen": ""},
        "worker": {"threads": 1, "scan_interval": 0.01, "retry_initial_delay": 30,
                   "retry_max_delay": 60},
        "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1"},
    }))
    return Worker(config_mod.load(str(path)), CollectorRegistry())


def _spool_one(worker: Worker) -> str:
    message_id = new_message_id()
    rule = Rule(name="store", enabled=True, actions=(S3Action(bucket_name="b"),))
    job = make_job(message_id=message_id, queue_id="Q", mail_from="a@example.net",
                   recipients=("u@example.com",),
                   rules=(MatchedRule(rule, ("u@example.com",)),), message_size=1,
                   message_sha256="")
    writer = worker.spool.new_job(message_id)
    writer.write(b"m")
    writer.commit(job)
    return message_id


def _work_once(worker: Worker) -> threading.Thread:
    """`worker --once` in a thread; a worker that loops is stopped by the caller."""
    thread = threading.Thread(target=worker.work, args=("t", True), daemon=True)
    thread.start()
    thread.join(5)
    return thread


@pytest.mark.parametrize("recording_fails", [
    pytest.param(False, id="recorded-and-deferred"),
    pytest.param(True, id="cannot-record-left-alone"),
])
def test_unexpected_error_backs_the_job_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            recording_fails: bool) -> None:
    worker = _worker(tmp_path)
    worker.spool.ensure()
    message_id = _spool_one(worker)
    calls: list[str] = []

    def broken(self: Runner, claim: object) -> str:
        calls.append(message_id)
        raise TypeError("'>=' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(Runner, "run", broken)
    if recording_fails:
        def unrecordable(self: Runner, claim: object, exc: Exception) -> str:
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(Runner, "unexpected", unrecordable)
    thread = _work_once(worker)
    worker.stopping.set()
    assert not thread.is_alive(), "the worker kept taking the job"
    assert calls == [message_id]
    if recording_fails:
        assert worker.spool.find(message_id) == "active"
        assert worker.next_job() is None  # this process leaves it alone for a while
        return
    assert worker.spool.find(message_id) == "deferred"
    p = worker.spool.load("deferred", message_id).progress
    assert p.attempts == 1 and p.next_due > time.time() + 10
    assert p.last_error.startswith("S3 action: other: '>=' not supported")


@pytest.mark.parametrize("attempts", [20, 1024, 1100, 10**6])
def test_retry_delay_never_overflows(attempts: int) -> None:
    policy = RetryPolicy(window=86400, initial_delay=0.05, max_delay=0.5)
    assert 0.25 <= policy.delay(attempts, lambda: 0.0) <= 0.5
