"""A hostile spool, hostile job files and hostile envelopes, through the real programs.

Real Postfix -> `mxrules milter` -> spool -> `mxrules worker` -> moto, and the
real `mxrules spool` command, as root, against a spool owned by an unprivileged
user (`nobody` stands in for the packaged `mxrules` user; the milter and the
worker run as it, as the units run them):

- a link planted in a dead letter by the spool's owner never makes root's
  `spool requeue` write through it, and a root requeue leaves nothing the worker
  cannot take (its lock);
- job.json files with a good checksum and a field of the wrong type, or that
  are directories, go to corrupt/ with their cause; the worker neither loops on
  them nor holds them silently;
- ESC in a quoted local part, which Postfix accepts, never reaches the
  operator's terminal through `mxrules spool list` / `show`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.moto import MotoServer
from harness.mxrules_proc import MXRULES, MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.smtp import send
from harness.stack import message, write_config
from harness.waiting import wait_until
from mxrules.spool import STATES, Spool

pytestmark = pytest.mark.postfix

OWNER = "nobody"  # the spool's owner: unprivileged, as the packaged mxrules user
BUCKET = "mail-bucket"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@dataclass
class Site:
    dir: Path
    config: Path
    milter: MilterProcess
    worker: WorkerProcess
    spool: Spool
    smtp_port: int
    moto: MotoServer

    def send(self, sender: str = "a@sender.test", rcpt: str = "user@example.com",
             subject: str = "test") -> None:
        r = send("127.0.0.1", self.smtp_port, sender, [rcpt],
                 message("a@sender.test", [rcpt], subject=subject))
        assert r.data is not None and r.data[0] == 250, r

    def counts(self) -> dict[str, int]:
        return {s: len(self.spool.ids(s)) for s in STATES}

    def spool_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`mxrules spool ...` as the test runner: root."""
        return subprocess.run([MXRULES, "spool", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})

    def objects(self) -> list[str]:
        return self.moto.s3_keys(BUCKET)


@pytest.fixture
def make_site(moto_server: MotoServer, postfix_factory: Any) -> Iterator[Any]:
    procs: list[MilterProcess | WorkerProcess] = []
    dirs: list[Path] = []

    def make(owner: str | None = None, **worker: Any) -> Site:
        # Outside pytest's 0700 temporary tree: the owner must reach its config and spool.
        directory = Path(tempfile.mkdtemp(prefix="mxrules-hostile-"))
        dirs.append(directory)
        directory.chmod(0o755)
        spool_dir = directory / "spool"
        spool_dir.mkdir(mode=0o700)
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(spool_dir, entry.pw_uid, entry.pw_gid)
        milter_port, worker_port = free_port(), free_port()
        config = write_config(
            directory, port=milter_port,
            rules=[{"name": "store", "enabled": True, "recipients": ["example.com"],
                    "actions": [{"s3": {"bucket_name": BUCKET}}]}],
            metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
            aws={"region": "us-east-1", "endpoint_url": moto_server.endpoint_url,
                 "connect_timeout": 1, "read_timeout": 5},
            worker={"threads": 2, "scan_interval": 0.05, "retry_initial_delay": 0.05,
                    "retry_max_delay": 0.5, "drain_timeout": 10, **worker})
        env = {**moto_server.aws_env(), "HOME": str(directory)}
        milter = MilterProcess(config, milter_port, directory / "milter.log", env=env,
                               user=owner)
        worker_proc = WorkerProcess(config, worker_port, directory / "worker.log", env=env,
                                    user=owner)
        procs.extend([milter, worker_proc])
        milter.start()
        postfix = postfix_factory(milter=milter.postfix_spec)
        return Site(directory, config, milter, worker_proc, Spool(str(spool_dir)),
                    postfix.smtp_port, moto_server)

    yield make
    for p in procs:
        p.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _dead_letter(site: Site) -> str:
    """One job dead-lettered by the real worker (no bucket yet), the worker stopped."""
    site.worker.start()
    site.send()
    wait_until(lambda: site.counts()["failed"] == 1, "a dead letter", timeout=60)
    site.worker.stop()
    [job_id] = site.spool.ids("failed")
    site.moto.make_bucket(BUCKET)
    return job_id


def _owned_by(path: Path, owner: str) -> bool:
    return path.lstat().st_uid == pwd.getpwnam(owner).pw_uid


# -- `mxrules spool` as root ------------------------------------------------------------


def test_root_requeue_never_writes_through_a_link_the_spool_owner_planted(
        make_site: Any) -> None:
    site: Site = make_site(owner=OWNER, retry_window=1)
    job_id = _dead_letter(site)
    # Root's own file, which the spool's owner can neither read nor write.
    victim = site.dir / "root-only"
    victim.write_text("root's own\n")
    victim.chmod(0o600)
    job_dir = Path(site.spool.path("failed", job_id))
    planted = job_dir / "job.json.tmp"
    planted.symlink_to(victim)
    owner = pwd.getpwnam(OWNER)
    os.lchown(planted, owner.pw_uid, owner.pw_gid)  # planted by the owner

    done = site.spool_cli("requeue", "--all-failed")
    assert done.returncode == 0, done.stderr
    assert f"requeued 1 job(s)\n  {job_id}" in done.stdout

    assert victim.read_text() == "root's own\n"
    job_dir = Path(site.spool.path("incoming", job_id))
    meta = job_dir / "job.json"
    assert meta.is_file() and not meta.is_symlink()
    assert not (job_dir / "job.json.tmp").exists()
    assert _owned_by(meta, OWNER) and _owned_by(job_dir / "lock", OWNER)
    # And the worker, as the owner, takes it and runs it.
    site.worker.start()
    wait_until(lambda: site.objects() == [job_id], "the requeued job stored", timeout=60)


def test_root_requeue_leaves_a_lock_the_worker_can_take(make_site: Any) -> None:
    """A dead letter without a lock file (restored from a backup, or its lock removed by
    an operator): root's requeue used to create it root-owned 0600, and the worker,
    which runs as the spool's owner, could then never claim the job again."""
    site: Site = make_site(owner=OWNER, retry_window=1)
    job_id = _dead_letter(site)
    (Path(site.spool.path("failed", job_id)) / "lock").unlink()

    done = site.spool_cli("requeue", job_id)
    assert done.returncode == 0, done.stderr
    assert _owned_by(Path(site.spool.path("incoming", job_id)) / "lock", OWNER)

    site.worker.start()
    wait_until(lambda: site.objects() == [job_id], "the requeued job stored", timeout=60)
    wait_until(lambda: site.counts() == dict.fromkeys(STATES, 0), "an empty spool")
    assert "Permission denied" not in site.worker.log()


# -- hostile job files -----------------------------------------------------------------


def _reseal(meta: Path, change: Any) -> None:
    """Rewrite a job.json with a changed body and a checksum that matches it."""
    body = json.loads(meta.read_bytes())["job"]
    change(body)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    check = hashlib.sha256(text.encode()).hexdigest()
    meta.write_text(json.dumps({"job": body, "sha256": check}))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_badly_typed_and_directory_job_files_go_to_corrupt_without_a_loop(
        make_site: Any) -> None:
    site: Site = make_site()
    site.moto.make_bucket(BUCKET)
    for subject in ("typed", "directory", "good"):
        site.send(subject=subject)
    typed, directory, good = site.spool.ids("incoming")
    # A valid checksum over a progress whose rule index is a string.
    _reseal(Path(site.spool.path("incoming", typed)) / "job.json",
            lambda body: body["progress"].update(rule="0"))
    meta = Path(site.spool.path("incoming", directory)) / "job.json"
    meta.unlink()
    meta.mkdir()

    site.worker.start()
    assert site.worker.proc is not None
    wait_until(lambda: site.objects() == [good], "the good job stored")
    wait_until(lambda: sorted(site.spool.ids("corrupt")) == sorted([typed, directory]),
               f"both bad jobs in corrupt/; worker log tracebacks: "
               f"{site.worker.log().count('Traceback')}", timeout=20)
    # Idle now: over the next second the worker only scans (a loop would burn it all).
    before = _cpu_seconds(site.worker.proc.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        site.worker.proc.wait(1.0)  # it stays up
    spent = _cpu_seconds(site.worker.proc.pid) - before
    log = site.worker.log()
    assert log.count("Traceback") == 0, log[-3000:]
    assert f"job {typed}: cannot decode job.json: progress.rule: expected an integer" in log
    assert f"job {directory}: job.json is not a regular file" in log
    assert site.counts() == {**dict.fromkeys(STATES, 0), "corrupt": 2}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{site.worker.port}/metrics",
                                     timeout=5).read().decode()
    assert 'mxrules_jobs_total{result="corrupt"} 2.0' in metrics
    assert spent < 0.5, f"{spent:.2f} s of CPU in 1 s of idling"


# -- hostile envelopes reach the operator's terminal escaped ----------------------------


def test_esc_in_a_quoted_local_part_is_escaped_by_spool_list_and_show(
        make_site: Any) -> None:
    site: Site = make_site()
    sender = '"evil\x1b[31m\x1b]0;owned\x07"@sender.test'
    rcpt = '"who\x1b[31m"@example.com'
    site.send(sender=sender, rcpt=rcpt)  # Postfix accepts both: the milter spools them
    [job_id] = site.spool.ids("incoming")
    assert "\x1b" in site.spool.load("incoming", job_id).mail_from  # as Postfix passed it

    shown = site.spool_cli("show", job_id)
    listed = site.spool_cli("list")
    for proc in (shown, listed):
        assert proc.returncode == 0, proc.stderr
        assert not RAW_CONTROL.search(proc.stdout + proc.stderr), proc.stdout
    assert '<"evil\\x1b[31m\\x1b]0;owned\\x07"@sender.test>' in shown.stdout, shown.stdout
    assert '"who\\x1b[31m"@example.com' in shown.stdout
    assert job_id in listed.stdout
