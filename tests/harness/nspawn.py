"""A booted Debian 12 container (systemd-nspawn) for testing the units under a real systemd.

The root is made once and cached outside the repository, in two layers keyed by a
hash of what goes into each:

- ``base-<key>``: ``debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus
  bookworm`` from the mirror the host's apt uses (read from apt at run time);
- ``root-<key>``: a copy of it with the given dependencies and Postfix added by
  ``apt-get satisfy`` (debootstrap's ``--include`` cannot resolve dependencies).

Each boot runs on a throwaway overlay of the cached root, in a cgroup of its own
(there is no host systemd to make one), and everything it made -- the container's
processes, its cgroups, the overlay mount, the scratch directory -- is removed when
it stops, whatever the test did.  A run that was killed outright leaves them behind:
the next boot removes those of runs whose process is gone.

With ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` the container's systemd gets a cgroup v2
tree and enforces ``DevicePolicy=`` (on a hybrid host without it, it silently does
not); ``SYSTEMD_SECCOMP=0`` keeps nspawn's own seccomp filter off, so the filter a
service shows is the one its unit asked for.  The tree has no controllers, so
``MemoryMax=`` and the other resource limits are not enforced in the container.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from harness import components
from harness.waiting import wait_until

CACHE_DIR = Path(os.environ.get("MXRULES_TEST_CACHE", "/var/cache/mxrules-test"))
RUN_DIR = Path("/var/tmp")
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = "systemd,systemd-sysv,dbus"
# Postfix as an MX ("Internet Site"); the test attaches the milter.
PRESEED = ("postfix postfix/main_mailer_type select Internet Site\n"
           "postfix postfix/mailname string mx.example.test\n")
# Bump when the steps below change in a way their inputs do not show.
RECIPE = "1"
PREFIX = "mxrules-test"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "SYSTEMD_SECCOMP": "0"}
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "apt-get", "mount", "umount")


def require_tools() -> None:
    """Skip (fail in CI) unless we are root with debootstrap and systemd-nspawn."""
    if os.geteuid() != 0:
        components.unavailable("booting a container needs root")
    components.require("debootstrap and systemd-container", *TOOLS)
    if not cgroup_hierarchies():
        components.unavailable(f"no writable cgroup hierarchy under {CGROUP_ROOT}")


def sh(*argv: str, timeout: float = 600,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host command; an error names it with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def apt_mirror() -> str:
    """The Debian mirror the host's apt takes bookworm's main component from."""
    uris = sh("apt-get", "indextargets", "--format", "$(REPO_URI)", "Identifier: Packages",
              f"Codename: {SUITE}", "Component: main", "Origin: Debian").stdout.split()
    if not uris:
        components.unavailable(f"the host's apt has no Debian {SUITE} main source "
                               "(see /etc/apt/sources.list*) to debootstrap from")
    return uris[0]


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# ---- mounts and the cache --------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Unmount whatever is mounted below `path`, then delete it (never through a mount)."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if mounts_under(path):
        raise RuntimeError(f"{path}: still has mounts {mounts_under(path)}, not deleting it")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """CACHE_DIR/name, made by build(tmpdir) if absent; the caller holds the lock."""
    final = CACHE_DIR / name
    if not final.is_dir():
        # A build that did not finish (a killed run) is never used.
        for stale in CACHE_DIR.glob(f".build-{name}-*"):
            remove_tree(stale)
        tmp = CACHE_DIR / f".build-{name}-{os.getpid()}"
        try:
            build(tmp)
            # What the build left in /tmp is not part of the root.
            remove_tree(tmp / "tmp")
            (tmp / "tmp").mkdir(mode=0o1777)
            tmp.rename(final)
        finally:
            if tmp.exists():
                remove_tree(tmp)
    os.utime(final)  # the prune below keeps what is in use
    return final


def _prune(kind: str, keep: str, days: int = 14) -> None:
    cutoff = time.time() - days * 86400
    for old in CACHE_DIR.glob(f"{kind}-*"):
        if old.name != keep and old.stat().st_mtime < cutoff:
            remove_tree(old)


def _debootstrap(target: Path, mirror: str) -> None:
    sh("debootstrap", f"--variant={VARIANT}", f"--include={INCLUDE}", SUITE, str(target),
       mirror, timeout=1200)


def _satisfy(base: Path, target: Path, depends: str) -> None:
    sh("cp", "-a", "--reflink=auto", str(base), str(target))
    # No service may start while packages are installed: nothing runs systemd here.
    policy = target / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    script = ("set -e; debconf-set-selections <<'EOF'\n" + PRESEED + "EOF\n"
              "apt-get update -qq\n"
              'DEBIAN_FRONTEND=noninteractive apt-get satisfy -y -qq --no-install-recommends "$1"\n'
              "apt-get clean\n")
    with _own_cgroup(f"{PREFIX}-{os.getpid()}-build") as procs_files:
        sh("sh", "-c", _ENTER_CGROUP, "sh", *procs_files, "--",
           "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(target),
           "--pipe", "bash", "-c", script, "satisfy", depends,
           timeout=1200, env={**os.environ, **NSPAWN_ENV})
    policy.unlink()


def cached_root(depends: str) -> Path:
    """A Debian 12 root with systemd, `depends` (a Depends field) and Postfix; cached."""
    mirror = apt_mirror()
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    tool = sh("dpkg-query", "-W", "-f=${Version}", "debootstrap").stdout
    base_name = "base-" + _key(RECIPE, SUITE, VARIANT, INCLUDE, mirror, arch, tool)
    root_name = "root-" + _key(base_name, depends, "postfix", PRESEED)
    with _cache_lock():
        base = _cached(base_name, lambda tmp: _debootstrap(tmp, mirror))
        root = _cached(root_name, lambda tmp: _satisfy(base, tmp, f"{depends}, postfix"))
        _prune("base", base_name)
        _prune("root", root_name)
    return root


# ---- cgroups ---------------------------------------------------------------------------

# Moves the shell into each cgroup named before "--", then runs the rest.
_ENTER_CGROUP = ('while [ "$1" != -- ]; do echo $$ >"$1" || exit 1; shift; done; shift; '
                 'exec "$@"')


def cgroup_hierarchies() -> list[Path]:
    """Where a cgroup of our own must be made: the v2 tree, and systemd's v1 tree if hybrid."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / name for name in ("unified", "systemd")
            if (CGROUP_ROOT / name / "cgroup.procs").exists()]


def _kill_cgroup(name: str) -> None:
    """Kill every process in cgroup `name`, then remove it and its children everywhere."""
    for top in cgroup_hierarchies():
        group = top / name
        if not group.is_dir():
            continue
        kill = group / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        else:
            for procs in group.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        wait_until(functools.partial(_empty, group), f"{group} to empty", timeout=20)
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        group.rmdir()


def _empty(group: Path) -> bool:
    return not any(procs.read_text().strip() for procs in group.rglob("cgroup.procs"))


@contextlib.contextmanager
def _own_cgroup(name: str) -> Iterator[list[str]]:
    """A fresh cgroup `name` in every hierarchy; yields the cgroup.procs files to enter."""
    _kill_cgroup(name)
    procs = []
    try:
        for top in cgroup_hierarchies():
            (top / name).mkdir()
            procs.append(str(top / name / "cgroup.procs"))
        yield procs
    finally:
        _kill_cgroup(name)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep_stale() -> None:
    """Remove what runs that were killed outright left: their cgroups and overlays."""
    pattern = re.compile(rf"^{PREFIX}-(\d+)-")
    for top in cgroup_hierarchies():
        for group in top.glob(f"{PREFIX}-*"):
            m = pattern.match(group.name)
            if m and not _pid_alive(int(m.group(1))):
                _kill_cgroup(group.name)
    for run in RUN_DIR.glob(f"{PREFIX}-*"):
        m = pattern.match(run.name)
        if m and not _pid_alive(int(m.group(1))):
            remove_tree(run)


# ---- the container ---------------------------------------------------------------------


class Container:
    """A booted systemd-nspawn container on an overlay of `root`.

    ``run()`` executes a command inside (all of its namespaces, through ``nsenter``);
    ``host_pids()`` maps a unit to the host's PIDs of its processes, for reading /proc.
    """

    def __init__(self, root: Path, binds_ro: Sequence[Path] = ()) -> None:
        self.root = root
        self.binds_ro = list(binds_ro)
        self.name = f"{PREFIX}-{os.getpid()}-{int(time.monotonic() * 1000) % 10**8}"
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=RUN_DIR))
        self.merged = self.scratch / "merged"
        self.console = self.scratch / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self._cgroup_cm: contextlib.AbstractContextManager[list[str]] | None = None

    # -- lifecycle

    def boot(self, timeout: float = 120) -> None:
        for sub in ("upper", "work", "merged"):
            (self.scratch / sub).mkdir()
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={self.root},upperdir={self.scratch / 'upper'},"
           f"workdir={self.scratch / 'work'}", str(self.merged))
        self._cgroup_cm = _own_cgroup(self.name)
        procs_files = self._cgroup_cm.__enter__()
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network",
                "--boot", "--console=read-only", f"--machine={self.name}",
                *(f"--bind-ro={path}" for path in self.binds_ro), "-D", str(self.merged)]
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", _ENTER_CGROUP, "sh", *procs_files, "--", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **NSPAWN_ENV})
        self.pid1 = wait_until(self._find_pid1, f"the container's PID 1\n{self.log_tail()}",
                               timeout=timeout)
        wait_until(self._booted, f"the container to boot\n{self.log_tail()}", timeout=timeout)

    def _find_pid1(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if (fields.get("PPid") == str(self.proc.pid)
                    and fields.get("NSpid", "").split()[-1:] == ["1"]):
                return int(entry.name)
        return None

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
        return state.stdout.strip() in {"running", "degraded"}

    def stop(self) -> None:
        """Shut down and remove everything this container made; safe on any path."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # nspawn: an orderly poweroff
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            try:
                if self._cgroup_cm is not None:
                    self._cgroup_cm.__exit__(None, None, None)
            finally:
                remove_tree(self.scratch)
                with contextlib.suppress(OSError):
                    Path(f"/run/systemd/nspawn/propagate/{self.name}").rmdir()

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- inside

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the container (all its namespaces), as root."""
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container: {argv} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def cgroup(self, unit: str) -> Path:
        """The host path of `unit`'s cgroup in the container's v2 tree."""
        return cgroup_hierarchies()[0] / self.name / "payload" / "system.slice" / unit

    def host_pids(self, unit: str) -> list[int]:
        """Host PIDs of `unit`'s processes (empty if it has none)."""
        try:
            return [int(p) for p in (self.cgroup(unit) / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []
