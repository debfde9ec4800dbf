"""A real Exim, for a trusted forwarder that writes Exim's own Received header.

Debian's exim4 packages conflict with postfix, so `./run setup` unpacks
exim4-daemon-light (and any library the host lacks) into .cache/exim with
`apt-get download` and `dpkg -x`: nothing is installed.  The binary looks up
its compiled-in user, Debian-exim, as it starts; each run gets a passwd and a
group file that name it (with the ids of the `mail` account), bind-mounted
over /etc in a mount namespace of its own (unshare -m), so the host's files
are never touched.

A message is taken with `exim -bs` (SMTP on standard input) and `-oMa`, so
Exim writes its Received header exactly as for a client at that address,
and queued; `deliver()` then runs one delivery attempt (`exim -M`) over SMTP
to the given port on loopback.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

from harness import components

ROOT = Path(__file__).resolve().parents[2] / ".cache" / "exim" / "root"
BINARY = ROOT / "usr" / "sbin" / "exim4"
LIBRARIES = ROOT / "usr" / "lib" / "x86_64-linux-gnu"
HOSTNAME = "exim-relay.example.net"
_QUEUED = re.compile(r"^250 OK id=(\S+)", re.MULTILINE)


def require_exim() -> None:
    components.require("Exim (./run setup unpacks it into .cache/exim)", str(BINARY),
                       "unshare", "mount")
    if os.geteuid() != 0:
        components.unavailable("running Exim with its own passwd file needs root")


class Exim:
    """One Exim configuration in `workdir` that relays everything to 127.0.0.1:`relay_port`."""

    def __init__(self, workdir: Path, relay_port: int) -> None:
        self.workdir = workdir
        self.relay_port = relay_port
        self.config = workdir / "exim.conf"
        self.spool = workdir / "spool"
        self.log_dir = workdir / "log"

    def setup(self) -> None:
        mail = pwd.getpwnam("mail")
        for directory in (self.spool, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, mail.pw_uid, mail.pw_gid)
        with open("/etc/passwd") as fh:
            passwd = fh.read()
        with open("/etc/group") as fh:
            group = fh.read()
        (self.workdir / "passwd").write_text(
            passwd + f"Debian-exim:x:{mail.pw_uid}:{mail.pw_gid}::{self.spool}:/bin/false\n")
        (self.workdir / "group").write_text(group + f"Debian-exim:x:{mail.pw_gid}:\n")
        self.config.write_text(f"""\
primary_hostname = {HOSTNAME}
exim_path = {BINARY}
keep_environment = LD_LIBRARY_PATH
spool_directory = {self.spool}
log_file_path = {self.log_dir}/%slog
never_users =
host_lookup =
rfc1413_hosts =
acl_smtp_rcpt = accept_all

begin acl
accept_all:
  accept

begin routers
to_mx:
  driver = manualroute
  route_list = * 127.0.0.1::{self.relay_port}
  transport = remote_smtp
  self = send

begin transports
remote_smtp:
  driver = smtp
  allow_localhost
  hosts_avoid_tls = *
""")

    def _run(self, args: list[str], stdin: bytes = b"") -> str:
        script = ('mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 '
                  '&& exec "$@"')
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(self.workdir / "passwd"),
                str(self.workdir / "group"), str(BINARY), "-C", str(self.config), *args]
        env = {**os.environ, "LD_LIBRARY_PATH": str(LIBRARIES)}
        proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=60)
        return (proc.stdout + proc.stderr).decode("utf-8", "replace")

    def take(self, client_ip: str, helo: str, sender: str, rcpts: list[str], msg: bytes) -> str:
        """One SMTP session as from `client_ip`; the id of the message Exim queued."""
        dialog = [f"EHLO {helo}", f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in rcpts),
                  "DATA"]
        data = msg.replace(b"\r\n.", b"\r\n..")
        stdin = "".join(f"{line}\r\n" for line in dialog).encode() + data + b".\r\nQUIT\r\n"
        # -odq: queue only; -oMt '': no ident (a network client would have none).
        out = self._run(["-odq", "-bs", "-oMa", client_ip, "-oMt", ""], stdin)
        match = _QUEUED.search(out)
        if match is None:
            raise RuntimeError(f"Exim did not take the message:\n{out}")
        return match.group(1)

    def deliver(self, message_id: str) -> str:
        """One delivery attempt, in the foreground; Exim's account of it."""
        return self._run(["-v", "-M", message_id])

    def mainlog(self) -> str:
        try:
            return (self.log_dir / "mainlog").read_text(errors="replace")
        except FileNotFoundError:
            return ""
