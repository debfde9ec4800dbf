"""The installed Debian package: files, units, manuals, one message end to end, remove/purge.

Runs only against an installed package (`./run test` builds it, installs it with
`apt-get install ./dist/mxrules_*.deb` and runs this file under Debian's own
/usr/bin/python3 with MXRULES_INSTALLED=1).  Everything here uses the installed
code: /usr/bin/mxrules, /usr/share/mxrules, the shipped config and units, the
`mxrules` system user and /var/spool/mxrules.  The tests run in file order; the
last one removes, purges and reinstalls the package.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.dns import shared_server
from harness.moto import MotoServer
from harness.smtp import send
from harness.stack import message

pytestmark = pytest.mark.skipif(
    os.environ.get("MXRULES_INSTALLED") != "1",
    reason="needs the installed package (./run test installs it)")

MXRULES = "/usr/bin/mxrules"
SPOOL = Path("/var/spool/mxrules")
CONFIG = Path("/etc/mxrules/mxrules.yaml")
ENV_FILE = Path("/etc/default/mxrules")  # where the README says AWS keys go
UNITS = [Path("/lib/systemd/system/mxrules-milter.service"),
         Path("/lib/systemd/system/mxrules-worker.service")]


def run(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_runs_the_installed_code_under_debians_python() -> None:
    import mxrules
    assert mxrules.__file__.startswith("/usr/share/mxrules/"), mxrules.__file__
    assert Path(MXRULES).read_text().startswith("#!/usr/bin/python3\n")
    # A private module directory: nothing named mxrules on Python's own path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = run("/usr/bin/python3", "-c", "import importlib.util as u; "
                "print(u.find_spec('mxrules'))", cwd="/", env=env)
    assert probe.stdout.strip() == "None"


def test_shipped_config_checks_and_manages_nothing() -> None:
    out = run(MXRULES, "check-config").stdout  # the default path, /etc/mxrules/mxrules.yaml
    assert f"{CONFIG}: ok" in out
    assert "managed domains: none" in out
    conffiles = run("dpkg-query", "--showformat=${Conffiles}", "--show", "mxrules").stdout
    assert "/etc/mxrules/mxrules.yaml" in conffiles


def test_user_spool_and_files() -> None:
    user = pwd.getpwnam("mxrules")
    st = SPOOL.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o700)
    schema = json.loads(Path("/usr/share/mxrules/mxrules.schema.json").read_text())
    assert schema["title"]
    for path in ("/usr/share/man/man8/mxrules.8.gz", "/usr/share/man/man5/mxrules.yaml.5.gz",
                 "/usr/share/doc/mxrules/examples/postfix-main.cf",
                 "/usr/share/mxrules/prometheus/mxrules-alerts.yml",
                 "/usr/share/mxrules/grafana/mxrules.json", *map(str, UNITS)):
        assert Path(path).is_file(), path
    page = run("man", "8", "mxrules", env={**os.environ, "MANWIDTH": "80"}).stdout
    assert "check-config" in page and "SIGUSR1" in page


def _env_file_state() -> tuple[int, str, str]:
    st = ENV_FILE.stat()
    return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name)


def test_environment_file_for_aws_keys_is_not_world_readable() -> None:
    assert _env_file_state() == (0o640, "root", "mxrules")
    conffiles = run("dpkg-query", "--showformat=${Conffiles}", "--show", "mxrules").stdout
    assert str(ENV_FILE) in conffiles


def test_an_upgrade_mends_the_mode_of_an_edited_environment_file_unless_overridden() -> None:
    """An edited conffile is kept by dpkg with its mode: the one earlier packages gave
    it (0644) must not survive the upgrade; an operator's dpkg-statoverride must."""
    deb = os.environ.get("MXRULES_DEB")
    if not deb:
        pytest.fail("MXRULES_DEB must name the .deb to reinstall")
    original = ENV_FILE.read_text()
    keys = "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=example-secret\n"
    try:
        ENV_FILE.write_text(original + keys)
        os.chown(ENV_FILE, 0, 0)
        ENV_FILE.chmod(0o644)
        run("apt-get", "install", "--reinstall", "-y", os.path.abspath(deb))
        assert ENV_FILE.read_text() == original + keys  # the operator's edit is kept
        assert _env_file_state() == (0o640, "root", "mxrules")

        run("dpkg-statoverride", "--update", "--add", "root", "root", "0600", str(ENV_FILE))
        try:
            run("apt-get", "install", "--reinstall", "-y", os.path.abspath(deb))
            assert _env_file_state() == (0o600, "root", "root")
        finally:
            run("dpkg-statoverride", "--remove", str(ENV_FILE))
    finally:
        ENV_FILE.write_text(original)
        os.chown(ENV_FILE, 0, grp.getgrnam("mxrules").gr_gid)
        ENV_FILE.chmod(0o640)


def test_units_pass_systemd_analyze() -> None:
    verify = run("systemd-analyze", "verify", *map(str, UNITS), check=False)
    # Outside a booted systemd (a container, CI) verify cannot load the default
    # dependencies (sysinit.target); everything about our own files must be clean.
    problems = [line for line in verify.stderr.splitlines()
                if "mxrules" in line and "sysinit.target" not in line]
    assert problems == [], verify.stderr
    for unit in UNITS:
        text = unit.read_text()
        for setting in ("User=mxrules", "NoNewPrivileges=yes", "ProtectSystem=strict",
                        "PrivateTmp=yes", "RestartPreventExitStatus=78",
                        "ExecReload=/bin/kill -USR1 $MAINPID"):
            assert setting in text, (unit, setting)
        if unit.name == "mxrules-milter.service":  # scans are bounded; so is the whole
            assert "\nMemoryMax=512M\n" in text, unit
        security = run("systemd-analyze", "security", "--offline=true", str(unit),
                       check=False)
        assert "Overall exposure level" in security.stdout, security.stdout + security.stderr


def smtpd_roots(port: int) -> set[str]:
    """The root directories of the smtpd processes serving `port`."""
    roots = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmdline[0].endswith(b"smtpd") and f":{port}".encode() in b" ".join(cmdline):
                roots.add(os.readlink(f"/proc/{pid}/root"))
        except OSError:
            continue
    return roots


@pytest.fixture
def socket_dir_factory() -> Iterator[Any]:
    made: list[Path] = []

    def make(queue_dir: Path) -> Path:
        # As postinst does for /var/spool/postfix/mxrules.
        path = queue_dir / "mxrules"
        run("install", "-d", "-o", "mxrules", "-g", "postfix", "-m", "2750", str(path))
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("chroot", [False, True], ids=["smtpd", "chrooted-smtpd"])
def test_one_message_end_to_end_over_the_unix_socket(
        moto_server: MotoServer, postfix_factory: Any, socket_dir_factory: Any,
        chroot: bool) -> None:
    """Postfix -> unix socket -> installed milter (as user mxrules) -> spool -> worker -> S3."""
    bucket = moto_server.make_bucket("installed-package")
    # Postfix names the socket relative to its queue directory, as conf/postfix-main.cf
    # does: the same line works for an smtpd chrooted into that directory.
    postfix = postfix_factory(milter="unix:mxrules/milter.sock")
    if chroot:
        postfix.chroot()
    sock_dir = socket_dir_factory(postfix.queue_dir)
    workdir = Path(tempfile.mkdtemp(prefix="mxrules-pkgtest-"))
    workdir.chmod(0o755)  # readable by the mxrules user, like /etc/mxrules
    doc = yaml.safe_load(CONFIG.read_text())  # the shipped config, with a domain and a rule
    doc["milter"]["listen"] = f"unix:{sock_dir}/milter.sock"
    doc["domains"] = ["example.com"]
    doc["active_rule_set"] = "default"
    doc["rule_sets"] = {"default": [{
        "name": "to-s3", "enabled": True, "recipients": ["user@example.com"],
        "actions": [{"s3": {"bucket_name": bucket, "object_key_prefix": "in/"}}]}]}
    doc["metrics"] = {"milter_listen": "", "worker_listen": ""}
    doc["aws"] = {"region": "us-east-1", "endpoint_url": moto_server.endpoint_url}
    # Every message is authenticated (SPF, DKIM, DMARC): against the local test DNS
    # server, so the message never waits on the host's resolver.
    doc.setdefault("scan", {})["dns"] = {"nameservers": [shared_server().address]}
    config = workdir / "mxrules.yaml"
    config.write_text(yaml.safe_dump(doc))
    env = {"PATH": "/usr/bin:/bin", **moto_server.aws_env()}
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: workdir / f"{name}.log" for name in ("milter", "worker")}
    try:
        for name in ("milter", "worker"):
            with open(logs[name], "wb") as log:
                procs.append(subprocess.Popen(
                    ["/usr/sbin/runuser", "-u", "mxrules", "--", MXRULES, name,
                     "--config", str(config)],
                    stdout=log, stderr=log, env=env))
        sock = sock_dir / "milter.sock"
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert procs[0].poll() is None, logs["milter"].read_text()
            assert time.monotonic() < deadline, logs["milter"].read_text()
            time.sleep(0.1)
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == pwd.getpwnam("postfix").pw_gid  # from the setgid directory

        subject = f"installed chroot={chroot}"
        msg = message("a@sender.test", ["user@example.com"], subject=subject)
        result = send("127.0.0.1", postfix.smtp_port, "a@sender.test",
                      ["user@example.com"], msg)
        assert result.data is not None and result.data[0] == 250, result
        s3 = moto_server.client("s3")
        deadline = time.monotonic() + 30
        keys: list[str] = []
        while not keys:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
            if not keys:
                assert time.monotonic() < deadline, logs["worker"].read_text()
                time.sleep(0.2)
        body = s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
        assert keys[0].startswith("in/") and f"Subject: {subject}".encode() in body
        # The job left the spool the packaged way: owned by mxrules, under /var/spool/mxrules.
        assert not list((SPOOL / "incoming").iterdir())
        # The session really ran in the jail (or not): smtpd lingers, its root says where.
        roots = smtpd_roots(postfix.smtp_port)
        assert roots, "no smtpd process of this instance left to look at"
        assert roots == {str(postfix.queue_dir) if chroot else "/"}
        assert (SPOOL / "done").stat().st_uid == pwd.getpwnam("mxrules").pw_uid
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_remove_keeps_spool_and_config_purge_deletes_them_reinstall_works() -> None:
    deb = os.environ.get("MXRULES_DEB")
    if not deb:
        pytest.fail("MXRULES_DEB must name the .deb to reinstall")
    marker = SPOOL / "failed" / "marker"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("a dead letter an operator has not looked at yet\n")
    with CONFIG.open("a") as f:
        f.write("# edited by the operator\n")

    run("apt-get", "remove", "-y", "mxrules")
    assert not Path(MXRULES).exists()
    assert marker.read_text().startswith("a dead letter")
    assert CONFIG.read_text().endswith("# edited by the operator\n")

    run("apt-get", "purge", "-y", "mxrules")
    assert not SPOOL.exists()
    assert not CONFIG.exists() and not CONFIG.parent.exists()

    run("apt-get", "install", "-y", "--no-install-recommends", os.path.abspath(deb))
    assert SPOOL.is_dir() and stat.S_IMODE(SPOOL.stat().st_mode) == 0o700
    assert _env_file_state() == (0o640, "root", "mxrules")
    assert "managed domains: none" in run(MXRULES, "check-config").stdout
