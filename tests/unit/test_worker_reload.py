"""The worker's config reload (SIGUSR1 / `systemctl reload mxrules-worker`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mxrules import config as config_mod
from mxrules.actions.worker import Worker


def _write(path: Path, endpoint: str, retry_window: int = 600) -> None:
    path.write_text(yaml.safe_dump({
        "spool": {"directory": str(path.parent / "spool")},
        "metrics": {"worker_listen": ""},
        "worker": {"retry_window": retry_window},
        "aws": {"region": "us-east-1", "endpoint_url": endpoint},
    }))


def test_reload_swaps_settings_for_the_next_job(tmp_path: Path) -> None:
    path = tmp_path / "mxrules.yaml"
    _write(path, "http://127.0.0.1:1")
    worker = Worker(config_mod.load(str(path)), CollectorRegistry())
    generation, runner = worker._runner()
    assert worker.generation == generation == 0

    _write(path, "http://127.0.0.1:2", retry_window=1200)
    assert worker.reload(str(path)) is True
    assert worker.generation == 1
    assert worker.cfg.aws.endpoint_url == "http://127.0.0.1:2"
    assert worker.policy.window == 1200
    new_generation, new_runner = worker._runner()
    assert new_generation == 1 and new_runner is not runner


def test_broken_reload_keeps_the_old_config(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mxrules.yaml"
    _write(path, "http://127.0.0.1:1")
    worker = Worker(config_mod.load(str(path)), CollectorRegistry())
    path.write_text("aws: [unclosed\n")
    with caplog.at_level(logging.ERROR):
        assert worker.reload(str(path)) is False
    assert worker.generation == 0
    assert worker.cfg.aws.endpoint_url == "http://127.0.0.1:1"
    assert "config reload refused" in caplog.text and "mxrules.yaml:" in caplog.text


def test_settings_that_need_a_restart_are_named(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mxrules.yaml"
    _write(path, "http://127.0.0.1:1")
    worker = Worker(config_mod.load(str(path)), CollectorRegistry())
    doc = yaml.safe_load(path.read_text())
    doc["worker"]["threads"] = 9
    path.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING):
        assert worker.reload(str(path)) is True
    assert "worker.threads changed (4 -> 9)" in caplog.text


@pytest.mark.parametrize(("last_error", "waits_on"), [
    ("S3 action: connection: Could not connect to the endpoint URL", "S3"),
    ("Lambda action: timeout: Read timeout on endpoint URL", "Lambda"),
    ("SNS notification: throttled: Rate exceeded", "SNS"),
    ("S3 notification: connection: Could not connect", "SNS"),  # its topic_arn publish
    ("Lambda notification: access-denied: ...", ""),
    ("S3 action: server-error: An error occurred (InternalError)", "S3"),
    ("S3 action: not-found: NoSuchBucket", ""),  # the job's own problem: its backoff stands
    ("Bounce action: access-denied: ...", ""),
    ("", ""),
])
def test_which_deferred_jobs_a_recovery_wakes(last_error: str, waits_on: str) -> None:
    """Read from the failure record; a job saved before there was one gets it from its text."""
    from mxrules.actions.worker import _waits_on
    from mxrules.job import _progress
    assert _waits_on(_progress({"last_error": last_error}, ())) == waits_on


def test_an_unexpected_error_while_looking_for_work_does_not_end_the_thread(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mxrules.yaml"
    _write(path, "http://127.0.0.1:1")
    cfg = config_mod.load(str(path))
    worker = Worker(cfg, CollectorRegistry())
    calls = []

    def next_job() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        worker.stopping.set()  # the second look: the thread is still alive

    worker.next_job = next_job  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        worker.work("worker-0")
    assert len(calls) == 2
    assert "unexpected error in worker-0 while looking for work" in caplog.text


def test_an_unexpected_error_in_a_reload_is_refused_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mxrules.yaml"
    _write(path, "http://127.0.0.1:1")
    worker = Worker(config_mod.load(str(path)), CollectorRegistry())

    def broken(_path: str) -> None:
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(config_mod, "load", broken)
    assert worker.reload(str(path)) is False  # the reloading thread lives on
    assert worker.generation == 0
