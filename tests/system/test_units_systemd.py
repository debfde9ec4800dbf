"""The packaged units under a real systemd, in a booted Debian 12 container.

`./run test` runs this after the package stage (the .deb it built is passed as
MXRULES_DEB); `./run test tests/system` runs it alone and builds the .deb itself.
The container (tests/harness/nspawn.py) is a cached debootstrap root with the
package's dependencies and Postfix, booted with systemd-nspawn on a throwaway
overlay, without a network of its own (only its loopback).  Inside it the tests
install the .deb with apt and drive the units with systemctl, as an operator would;
an AWS endpoint (moto, from the project's .venv-moto) runs inside too.

The tests run in file order and share the container: install, start, a message,
what the services may do, reload, a bad config at start, stop.

Not checked here: MemoryMax= and the other resource limits.  The container's cgroup
tree has no controllers (the host delegates none), so systemd cannot enforce them;
test_memory_limit says so as a skip, and checks the limit where it can.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import components, nspawn
from harness.moto import MOTO_SERVER, MOTO_VENV, REPO_ROOT
from harness.waiting import wait_until

MILTER, WORKER = "mxrules-milter.service", "mxrules-worker.service"
UNITS = (MILTER, WORKER)
METRICS_PORT = {MILTER: 9901, WORKER: 9902}
MOTO_PORT = 5000
ENDPOINT = f"http://127.0.0.1:{MOTO_PORT}"
BUCKET = "systemd-test"
CONFIG = "/etc/mxrules/mxrules.yaml"
SOCKET = "/var/spool/postfix/mxrules/milter.sock"
AWS_ENV = ("AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing",
           "AWS_DEFAULT_REGION=us-east-1")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb under test: MXRULES_DEB, or one built from this tree."""
    nspawn.require_tools()
    given = os.environ.get("MXRULES_DEB")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    built = nspawn.sh(str(REPO_ROOT / "packaging/build-deb"), str(out), timeout=900)
    return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def box(deb: Path) -> Iterator[nspawn.Container]:
    """A booted container with the .deb copied in (not yet installed)."""
    if not MOTO_SERVER.exists():
        components.unavailable(f"{MOTO_SERVER} is missing (./run setup makes it)")
    # A TERM (a cancelled CI job) must still stop debootstrap or apt, and unmount and
    # remove the container: as an exception, it runs every cleanup on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        nspawn.sweep_stale()
        depends = nspawn.sh("dpkg-deb", "--field", str(deb), "Depends").stdout.strip()
        root = nspawn.cached_root(depends)
        with nspawn.Container(root, binds_ro=[MOTO_VENV]) as container:
            shutil.copy(deb, container.merged / "root" / "mxrules.deb")
            yield container
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---- helpers ---------------------------------------------------------------------------


def show(box: nspawn.Container, unit: str, *props: str) -> dict[str, str]:
    out = box.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(box: nspawn.Container, unit: str) -> int:
    """The unit's main process, as a host PID (its PID inside is systemctl's MainPID)."""
    pids = box.host_pids(unit)
    inner = show(box, unit, "MainPID")["MainPID"]
    for pid in pids:
        nspid = _status(pid).get("NSpid", "").split()
        if nspid[-1:] == [inner]:
            return pid
    raise AssertionError(f"{unit}: no process with MainPID {inner} among {pids}")


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def python(box: nspawn.Container, code: str, *args: str, timeout: float = 120) -> Any:
    """Run `code` with the container's python3 (AWS credentials set); its stdout as JSON."""
    out = box.run("env", *AWS_ENV, "python3", "-c", code, *args, timeout=timeout).stdout
    return json.loads(out)


def counters(box: nspawn.Container, unit: str) -> dict[str, float]:
    """mxrules_config_reloads_total by result, scraped inside the container."""
    text = python(box, "import json, urllib.request, sys\n"
                  "print(json.dumps(urllib.request.urlopen("
                  "f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=10).read().decode()))",
                  str(METRICS_PORT[unit]))
    found = re.findall(r'^mxrules_config_reloads_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {result: float(value) for result, value in found}


def config_doc() -> dict[str, Any]:
    return {
        "milter": {"listen": f"unix:{SOCKET}", "socket_mode": "0660"},
        "spool": {"directory": "/var/spool/mxrules"},
        "domains": ["example.com"],
        "delivery": "consume",
        "active_rule_set": "default",
        "rule_sets": {"default": [{
            "name": "to-s3", "enabled": True, "recipients": ["user@example.com"],
            "actions": [
                {"add_header": {"header_name": "X-Routed-By", "header_value": "systemd-test"}},
                {"s3": {"bucket_name": BUCKET, "object_key_prefix": "in/"}}]}]},
        "metrics": {"milter_listen": f"127.0.0.1:{METRICS_PORT[MILTER]}",
                    "worker_listen": f"127.0.0.1:{METRICS_PORT[WORKER]}"},
        "aws": {"region": "us-east-1", "endpoint_url": ENDPOINT},
    }


GOOD = yaml.safe_dump(config_doc())
BAD = yaml.safe_dump({**config_doc(), "delivery": "sideways"})  # not consume or deliver


def write_config(box: nspawn.Container, text: str) -> None:
    """Replace the config in one step (the milter watches it), keeping owner and mode."""
    box.run("sh", "-c", 'f=$1; cat >"$f.new" && chown --reference="$f" "$f.new" && '
            'chmod --reference="$f" "$f.new" && mv "$f.new" "$f"', "sh", CONFIG, input=text)


def journal(box: nspawn.Container, *args: str) -> str:
    return box.run("journalctl", "--no-pager", "-n", "40", *args).stdout


def start(box: nspawn.Container, *units: str) -> None:
    """`systemctl start`, which returns once each unit is ready (Type=notify: READY=1 after
    the config is loaded and the service serves): active, and metrics at the first try."""
    box.run("systemctl", "start", *units, timeout=180)
    for unit in units:
        assert show(box, unit, "ActiveState")["ActiveState"] == "active", journal(box)
        assert "ok" in counters(box, unit), unit  # at the first try: it serves already


SEND = r"""
import json, smtplib, sys
subject = sys.argv[1]
msg = (f"From: a@sender.test\r\nTo: user@example.com\r\nSubject: {subject}\r\n"
       f"Message-ID: <{subject}@sender.test>\r\n\r\nA message through the units.\r\n")
with smtplib.SMTP("127.0.0.1", 25, timeout=60) as s:
    s.ehlo("client.test")
    replies = [s.mail("a@sender.test"), s.rcpt("user@example.com")]
    if replies[-1][0] == 250:
        replies.append(s.data(msg.encode()))
print(json.dumps([[code, reply.decode()] for code, reply in replies]))
"""

S3_OBJECTS = r"""
import json, sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
deadline = time.monotonic() + float(sys.argv[3])
while True:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=sys.argv[2]).get("Contents", [])]
    if keys or time.monotonic() > deadline:
        break
    time.sleep(0.2)
bodies = {k: s3.get_object(Bucket=sys.argv[2], Key=k)["Body"].read().decode() for k in keys}
print(json.dumps(bodies))
"""

MAKE_BUCKET = r"""
import json, sys, time, urllib.request, boto3
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])
print(json.dumps(True))
"""


# ---- the tests, in order ---------------------------------------------------------------


def test_install_enables_the_units_without_starting_them(box: nspawn.Container) -> None:
    box.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "/root/mxrules.deb",
            timeout=300)
    for unit in UNITS:
        assert box.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert show(box, unit, "ActiveState")["ActiveState"] == "inactive"
        assert box.host_pids(unit) == []
    assert box.run("systemctl", "is-active", "postfix").stdout.strip() == "active"


def test_start_and_one_message_through_postfix_milter_and_worker(
        box: nspawn.Container) -> None:
    """Postfix -> the milter's socket -> spool -> worker -> S3, both under their units."""
    box.run("systemd-run", "--unit=moto", f"--setenv=MOTO_PORT={MOTO_PORT}",
            str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(MOTO_PORT))
    python(box, MAKE_BUCKET, ENDPOINT, BUCKET)
    write_config(box, GOOD)
    # The worker's credentials, where the README says an operator puts them.
    box.run("sh", "-c", 'printf "%s\\n" "$@" >>/etc/default/mxrules', "sh", *AWS_ENV[:2])
    # Postfix as the README says: the shipped example appended, the domain relayed.
    box.run("sh", "-c", "cat /usr/share/doc/mxrules/examples/postfix-main.cf "
            ">>/etc/postfix/main.cf")
    box.run("postconf", "-e", "relay_domains = example.com")
    box.run("systemctl", "reload", "postfix")

    start(box, *UNITS)
    assert (box.merged / SOCKET.lstrip("/")).exists()  # READY=1 came after it listened

    replies = python(box, SEND, "through-the-units")
    assert [code for code, _ in replies] == [250, 250, 250], (replies, journal(box))
    bodies = python(box, S3_OBJECTS, ENDPOINT, BUCKET, "60")
    assert len(bodies) == 1, (bodies, journal(box))
    (key, body), = bodies.items()
    assert key.startswith("in/")
    assert "Subject: through-the-units" in body
    assert "X-Routed-By: systemd-test" in body  # the milter's add_header, in-stream
    assert box.run("ls", "-A", "/var/spool/mxrules/incoming").stdout == ""


@pytest.mark.parametrize("unit", UNITS)
def test_services_run_as_mxrules_without_privileges(box: nspawn.Container, unit: str) -> None:
    uid = box.run("id", "-u", "mxrules").stdout.strip()
    gid = box.run("id", "-g", "mxrules").stdout.strip()
    pids = box.host_pids(unit)
    assert pids, f"{unit} has no processes"
    for pid in pids:
        status = _status(pid)
        assert status["Uid"].split() == [uid] * 4, status["Uid"]
        assert status["Gid"].split() == [gid] * 4, status["Gid"]
        assert status["NoNewPrivs"] == "1"
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["Seccomp"] == "2"  # a filter: SystemCallFilter=
    # nspawn's own filter is off (SYSTEMD_SECCOMP=0): the one above is the unit's.
    assert _status(box.pid1)["Seccomp"] == "0"


@pytest.mark.parametrize("unit", UNITS)
def test_protect_system_strict_seen_from_the_service(box: nspawn.Container, unit: str) -> None:
    """In the service's mount namespace only its ReadWritePaths= take writes (even as root)."""
    pid = str(main_pid(box, unit))

    def touch(directory: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", pid, "-m", "--", "sh", "-c",
             'touch "$1/.probe" && rm "$1/.probe"', "sh", directory],
            capture_output=True, text=True, timeout=30, check=False)

    for directory in ("/usr", "/etc", "/var/lib", "/var/cache", "/"):
        probe = touch(directory)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (
            directory, probe)
    writable = ["/var/spool/mxrules"] + (["/var/spool/postfix/mxrules"] if unit == MILTER else [])
    for directory in writable:
        probe = touch(directory)
        assert probe.returncode == 0, (directory, probe)
    if unit == WORKER:
        assert "Read-only file system" in touch("/var/spool/postfix/mxrules").stderr
    # ProtectHome=: root's home, where the .deb was copied, is empty for the service.
    assert (box.merged / "root/mxrules.deb").exists()
    listing = subprocess.run(["nsenter", "-t", pid, "-m", "--", "ls", "-A", "/root"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert listing.stdout == "", listing


@pytest.mark.parametrize("unit", UNITS)
def test_device_policy_is_enforced(box: nspawn.Container, unit: str) -> None:
    """PrivateDevices= implies DevicePolicy=closed: in the unit's cgroup an unlisted device
    node cannot be opened, even by root, while outside it the same node opens."""
    node = "/root/fuse-probe"  # not /run: a nodev tmpfs
    box.run("sh", "-c", f"[ -e {node} ] || mknod {node} c 10 229")
    opener = ["nsenter", "-t", str(box.pid1), "-m", "--", "sh", "-c", 'exec 3<"$1"', "sh",
              node]
    outside = subprocess.run(opener, capture_output=True, text=True, timeout=30, check=False)
    assert outside.returncode == 0, outside
    procs = box.cgroup(unit) / "cgroup.procs"
    inside = subprocess.run(["sh", "-c", 'echo $$ >"$1" && shift && exec "$@"', "sh",
                             str(procs), *opener],
                            capture_output=True, text=True, timeout=30, check=False)
    assert inside.returncode != 0 and "Operation not permitted" in inside.stderr, inside


def test_memory_limit(box: nspawn.Container) -> None:
    wanted = {unit: show(box, unit, "MemoryMax")["MemoryMax"] for unit in UNITS}
    controllers = box.run("cat", "/sys/fs/cgroup/cgroup.controllers").stdout.split()
    if "memory" not in controllers:
        pytest.skip("MemoryMax= cannot be enforced in this container: its cgroup tree has "
                    f"no memory controller (controllers: {controllers or 'none'}); "
                    f"the units ask for {wanted}")
    for unit in UNITS:
        actual = (box.cgroup(unit) / "memory.max").read_text().strip()
        assert actual == ("max" if wanted[unit] == "infinity" else wanted[unit]), (
            unit, actual, wanted)


@pytest.mark.parametrize("unit", UNITS)
def test_reload_keeps_the_process_and_refuses_a_bad_config(
        box: nspawn.Container, unit: str) -> None:
    pid = show(box, unit, "MainPID")["MainPID"]
    before = counters(box, unit)
    box.run("systemctl", "reload", unit)  # the file is unchanged: only the signal reloads
    wait_until(lambda: counters(box, unit)["ok"] > before["ok"], f"{unit} to reload")
    assert show(box, unit, "MainPID")["MainPID"] == pid
    try:
        write_config(box, BAD)
        box.run("systemctl", "reload", unit)
        wait_until(lambda: counters(box, unit)["failed"] > before["failed"],
                   f"{unit} to refuse the bad config")
        state = show(box, unit, "MainPID", "ActiveState", "NRestarts")
        assert state == {"MainPID": pid, "ActiveState": "active", "NRestarts": "0"}
        assert counters(box, unit)["ok"] == before["ok"] + 1
    finally:
        write_config(box, GOOD)


@pytest.mark.parametrize("unit", UNITS)
def test_bad_config_at_start_exits_78_and_is_not_restarted(
        box: nspawn.Container, unit: str) -> None:
    box.run("systemctl", "stop", unit)
    try:
        write_config(box, BAD)
        # It exits before READY=1: the start itself fails.
        assert box.run("systemctl", "start", unit, check=False).returncode != 0
        # After the exit systemd either schedules a restart (auto-restart) or gives up.
        wait_until(lambda: show(box, unit, "ActiveState", "SubState") in (
            {"ActiveState": "failed", "SubState": "failed"},
            {"ActiveState": "activating", "SubState": "auto-restart"}),
            f"{unit} to exit", timeout=60)
        state = show(box, unit, "ActiveState", "SubState", "Result", "ExecMainStatus",
                     "NRestarts")
        assert state == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                         "ExecMainStatus": "78", "NRestarts": "0"}
        log = journal(box, "-u", unit)
        assert "delivery" in log and "sideways" in log, log
    finally:
        write_config(box, GOOD)
    box.run("systemctl", "reset-failed", unit)
    start(box, unit)


# systemd's journal message IDs (sd-messages.h): a unit stopped cleanly; a process exited.
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"
PROCESS_EXIT = "98e322203f7a4ed290d09fe03c09fe15"


STOPPED = {MILTER: "INFO mxrules.milter: milter stopped",
           WORKER: "INFO mxrules.worker: worker stopped"}


def test_stop(box: nspawn.Container) -> None:
    """Both stop cleanly, through their own code: the "stopped" line, no failure, no process
    left.  (An inactive unit may be unloaded at once, and `systemctl show` then reports
    defaults: the journal says how each ended.)"""
    cursor = box.run("journalctl", "--show-cursor", "-n", "0", "-q").stdout.split("cursor: ")[1]
    box.run("systemctl", "stop", *UNITS, timeout=180)
    for unit in UNITS:
        state = box.run("systemctl", "is-active", unit, check=False).stdout.strip()
        assert state == "inactive", f"{unit}: {state}\n{journal(box, '-u', unit)}"
        assert box.host_pids(unit) == []
        out = box.run("journalctl", "-o", "json", f"--after-cursor={cursor.strip()}",
                      f"UNIT={unit}").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        ids = [entry.get("MESSAGE_ID") for entry in entries]
        assert UNIT_SUCCESS in ids and PROCESS_EXIT not in ids, (
            unit, journal(box, "-u", unit))
        # The service's own last words (its stderr, in the journal as the unit's).
        wait_until(lambda u=unit: STOPPED[u] in service_lines(box, cursor.strip(), u),
                   f"{unit}: {STOPPED[unit]!r} in the journal", timeout=30)


def service_lines(box: nspawn.Container, cursor: str, unit: str) -> list[str]:
    """What the service itself logged after `cursor`.  (Filtered here: journalctl's
    --after-cursor together with a _SYSTEMD_UNIT= match was seen to return nothing.)"""
    out = box.run("journalctl", "-o", "json", f"--after-cursor={cursor}").stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return [str(e.get("MESSAGE")) for e in entries if e.get("_SYSTEMD_UNIT") == unit]


def test_a_failed_run_leaves_nothing_behind(deb: Path) -> None:
    """A test that fails inside a container still leaves no mount, cgroup or directory."""
    root = nspawn.cached_root(
        nspawn.sh("dpkg-deb", "--field", str(deb), "Depends").stdout.strip())
    container = nspawn.Container(root)
    with pytest.raises(RuntimeError, match="a failing test"), container:
        assert nspawn.mounts_under(container.merged)
        assert container.host_pids("dbus.service")
        raise RuntimeError("a failing test")
    assert not container.scratch.exists()
    assert nspawn.mounts_under(container.scratch) == []
    for top in nspawn.cgroup_hierarchies():
        assert not (top / container.name).exists()
    assert container.proc is not None and container.proc.poll() is not None
