"""A throwaway, real Postfix instance on loopback, living entirely in one directory.

The instance has its own config, queue and data directories and log file; nothing in
/etc/postfix is changed (postfix-script only reads its postfix-files metadata and the
default main.cf's multi_instance_directories).  Starting it needs root, as Postfix does.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from harness.components import which
from harness.ports import wait_listening

HOST = "127.0.0.1"
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
# Every queue that can hold a message (showq(8) reports the same set).
QUEUE_NAMES = ("maildrop", "hold", "incoming", "active", "deferred")
QUEUE_ID = re.compile(r"[0-9A-Za-z]+")

# Written from scratch: no port 25, loopback only, nothing chrooted (the paths live
# outside any chroot), and the postlog service that maillog_file needs.
# service type private unpriv chroot wakeup maxproc command
_MASTER_SERVICES = """\
pickup     unix  n  -  n  60     1  pickup
cleanup    unix  n  -  n  -      0  cleanup
qmgr       unix  n  -  n  300    1  qmgr
tlsmgr     unix  -  -  n  1000?  1  tlsmgr
rewrite    unix  -  -  n  -      -  trivial-rewrite
bounce     unix  -  -  n  -      0  bounce
defer      unix  -  -  n  -      0  bounce
trace      unix  -  -  n  -      0  bounce
verify     unix  -  -  n  -      1  verify
flush      unix  n  -  n  1000?  0  flush
proxymap   unix  -  -  n  -      -  proxymap
proxywrite unix  -  -  n  -      1  proxymap
smtp       unix  -  -  n  -      -  smtp
relay      unix  -  -  n  -      -  smtp
showq      unix  n  -  n  -      -  showq
error      unix  -  -  n  -      -  error
retry      unix  -  -  n  -      -  error
discard    unix  -  -  n  -      -  discard
local      unix  -  n  n  -      -  local
lmtp       unix  -  -  n  -      -  lmtp
anvil      unix  -  -  n  -      1  anvil
scache     unix  -  -  n  -      1  scache
postlog    unix-dgram n  -  n  -  1  postlogd
"""


class PostfixError(RuntimeError):
    """A postfix command failed; the message carries its output and the maillog tail."""


def unsearchable_ancestor(path: Path, user: str = MAIL_OWNER) -> Path | None:
    """Return the first directory from / down to ``path`` that ``user`` cannot enter, if any.

    master(8) opens data_directory/master.lock as mail_owner by absolute path, and
    smtpd reaches a unix-socket milter the same way, so the whole chain must be
    searchable by that user, not only by root.  pytest's temporary dirs are 0700.
    """
    account = pwd.getpwnam(user)
    gids = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in [*reversed(path.resolve().parents), path.resolve()]:
        if not directory.exists():
            return None
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None


class Postfix:
    """One throwaway Postfix: smtpd on 127.0.0.1:smtp_port, relaying everything to a sink.

    ``milter`` is a Postfix milter spec ("inet:127.0.0.1:9900", "unix:/path"); with
    ``relay_port`` None all deliveries are deferred (they stay queued); ``extra`` adds
    or overrides main.cf parameters.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        smtp_port: int,
        milter: str | None = None,
        relay_port: int | None = None,
        tls: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.host = HOST
        self.smtp_port = smtp_port
        self.milter = milter
        self.relay_port = relay_port
        self.tls = tls
        self.extra: dict[str, str] = dict(extra or {})
        self.conf_dir = self.workdir / "conf"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.tls_dir = self.workdir / "tls"
        self.maillog_path = self.workdir / "maillog"
        self._postfix = which("postfix") or "/usr/sbin/postfix"
        self._postconf = which("postconf") or "/usr/sbin/postconf"

    def __repr__(self) -> str:
        return f"Postfix(workdir={str(self.workdir)!r}, smtp_port={self.smtp_port})"

    # -- configuration -------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this instance runs with (extra applied last)."""
        if self.relay_port is None:
            # A socket that never exists: every attempt is deferred and the message stays
            # queued.  (An error:/retry: transport would make smtpd refuse the RCPT.)
            transport = f"lmtp:unix:{self.workdir / 'no-relay'}"
        else:
            transport = f"smtp:[{HOST}]:{self.relay_port}"
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            "myhostname": "mx.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "default_transport": transport,
            "relay_transport": transport,
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            # smtpd refuses a bare "permit" (fatal: it wants reject_unauth_destination or
            # similar), and XCLIENT fakes non-local clients; so every domain is a relay domain.
            "relay_domains": "static:ALL",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_error_sleep_time": "0s",
            "smtpd_milters": self.milter or "",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_connect_timeout": "10s",
            "milter_connect_macros": "j {daemon_name} {client_addr} {client_name} v",
            "milter_helo_macros": (
                "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"
            ),
            "milter_mail_macros": (
                "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"
            ),
            "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
            "milter_end_of_data_macros": "i",
            "message_size_limit": str(60 * 1024 * 1024),
            # local(8) refuses to start when this is below message_size_limit.
            "mailbox_size_limit": "0",
            "virtual_mailbox_limit": "0",
            "delay_warning_time": "0",
            # As in conf/postfix-main.cf: mail the milter consumes (DISCARD) never
            # reaches the queue manager, which is what refills the flow-control
            # tokens; without this every message waits 1 s once they run out.
            "in_flow_delay": "0",
            "smtpd_tls_security_level": "may" if self.tls else "none",
        }
        if self.tls:
            params["smtpd_tls_chain_files"] = (
                f"{self.tls_dir / 'key.pem'}, {self.tls_dir / 'cert.pem'}"
            )
            params["smtpd_tls_loglevel"] = "1"
        params.update(self.extra)
        return params

    # smtpd chrooted into the queue directory, as Debian's own master.cf has it.
    chroot_smtpd = False

    def master_cf(self) -> str:
        """The complete master.cf: one smtpd on the loopback test port plus internal services."""
        chroot = "y" if self.chroot_smtpd else "n"
        smtpd = f"{HOST}:{self.smtp_port} inet n - {chroot} - - smtpd\n"
        return smtpd + _MASTER_SERVICES

    def chroot(self) -> None:
        """Run smtpd chrooted from now on, with the files Debian copies into the jail."""
        etc = self.queue_dir / "etc"
        etc.mkdir(exist_ok=True)
        for name in ("localtime", "services", "resolv.conf", "hosts", "nsswitch.conf",
                     "host.conf"):
            if Path("/etc", name).is_file():
                shutil.copy(Path("/etc", name), etc / name)
        self.chroot_smtpd = True
        self.reload()

    def write_config(self) -> None:
        """Write main.cf/master.cf and reject parameter names Postfix does not know (typos)."""
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{name} = {value}".rstrip() for name, value in self.main_cf().items()]
        (self.conf_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.conf_dir / "master.cf").write_text(self.master_cf())
        check = self._run([self._postconf, "-c", str(self.conf_dir), "-n"])
        unused = [line for line in check.stderr.splitlines() if "unused parameter" in line]
        if unused:
            raise ValueError("unknown main.cf parameters:\n" + "\n".join(unused))

    def _make_certificate(self) -> None:
        """Create a self-signed cert+key once; smtpd loads them as root, before the jail."""
        key, cert = self.tls_dir / "key.pem", self.tls_dir / "cert.pem"
        if key.exists() and cert.exists():
            return
        self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        openssl = which("openssl") or "openssl"
        args = [openssl, "req", "-x509", "-nodes", "-days", "7", "-subj", "/CN=mx.test"]
        args += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        args += ["-addext", "subjectAltName=DNS:mx.test", "-keyout", str(key), "-out", str(cert)]
        self._run(args, check=True)
        key.chmod(0o600)

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Configure, create the queue (post-install does it on start) and wait for smtpd's port."""
        blocked = unsearchable_ancestor(self.workdir)
        if blocked is not None:
            raise PostfixError(
                f"user {MAIL_OWNER!r} cannot enter {blocked}; master(8) opens"
                f" {self.data_dir}/master.lock as that user (chmod o+x the directory)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self._make_certificate()
        self.write_config()
        # postfix-script runs "post-install create-missing", which makes every queue
        # subdirectory with the ownership Postfix wants; only the root must exist.
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self._postfix_cmd("start")
        wait_listening(HOST, self.smtp_port, timeout, connect=False)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop master and its children and wait until master is gone; a no-op when stopped."""
        pid = self.master_pid()
        if pid is None or not _alive(pid):
            return
        # "postfix stop" itself escalates to SIGKILL after 5 s.
        self._postfix_cmd("stop", check=False)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Postfix master (pid {pid}) still running after {timeout:g}s")
            time.sleep(0.05)

    def reload(self, timeout: float = 20.0) -> None:
        """Rewrite the config from the attributes (milter, extra, ...) and make Postfix reload.

        Returns once master has logged the reload; sessions already open keep the old config.
        """
        self.write_config()
        offset = self.log_size()
        self._postfix_cmd("reload")
        self.wait_for_log(r"postfix/master\[\d+\]: reload --", timeout, since=offset)

    def flush(self) -> None:
        """Ask the queue manager to retry every queued message now."""
        self._postfix_cmd("flush")

    def submit(self, sender: str, rcpts: list[str], msg: bytes) -> None:
        """Hand a message to this instance's sendmail(1), as a local program does (pickup)."""
        sendmail = which("sendmail") or "/usr/sbin/sendmail"
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        subprocess.run([sendmail, "-C", str(self.conf_dir), "-i", "-f", sender, "--", *rcpts],
                       input=msg, env=env, check=True, capture_output=True, timeout=60)

    def set_milter(self, spec: str | None) -> None:
        """Point smtpd_milters at ``spec`` (None: no milter), reloading a running instance."""
        self.milter = spec
        if self.running:
            self.reload()

    # -- inspection ----------------------------------------------------------------

    def master_pid(self) -> int | None:
        """PID recorded by master, or None if it never started."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        """True while the master process is alive."""
        pid = self.master_pid()
        return pid is not None and _alive(pid)

    def maillog(self) -> str:
        """The whole log file written by postlogd (empty before the first line)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Current length of the maillog (characters): ``since`` for ``wait_for_log``."""
        return len(self.maillog())

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the maillog, for failure reports."""
        return "\n".join(self.maillog().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 20.0, *, since: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a multiline regex) matches the maillog after offset ``since``.

        Polls the file (postlogd writes it asynchronously) until the deadline.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.maillog(), since)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no maillog line matched {pattern!r} within {timeout:g}s; tail:\n"
                    + self.log_tail(20)
                )
            time.sleep(0.05)

    def queue_ids(self) -> list[str]:
        """IDs of all queued messages, read from the queue directories (we are root).

        Directory listing works whether or not Postfix runs and needs neither showq nor
        the set-gid postqueue; deferred/ is hashed into one level of subdirectories.
        """
        ids: list[str] = []
        for name in QUEUE_NAMES:
            queue = self.queue_dir / name
            if not queue.is_dir():
                continue
            for entry in queue.rglob("*"):
                if entry.is_file() and QUEUE_ID.fullmatch(entry.name):
                    ids.append(entry.name)
        return sorted(ids)

    def queue_empty(self) -> bool:
        """True when no message is queued anywhere."""
        return not self.queue_ids()

    # -- helpers ---------------------------------------------------------------------

    def _postfix_cmd(self, action: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([self._postfix, "-c", str(self.conf_dir), action], check=check)

    def _run(self, argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}\nmaillog tail:\n{self.log_tail(20)}"
            )
        return proc


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an exited, not yet reaped daemon)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"
