"""Real spam and virus scanners on loopback: SpamAssassin's spamd, ClamAV's clamd, rspamd.

Each server runs from its own configuration and work directory (nothing in /etc is
edited, no system service is used), offline: no rule updates, no DNS, no network tests.

* spamd: ``spamd -L -x -i 127.0.0.1:PORT -i SOCKET -C /usr/share/spamassassin
  --siteconfigpath SITE ...`` (``-u nobody`` as root: spamd will not scan as root).  SITE
  holds copies of the system's ``*.pre`` files (they load the plugins; without
  ``v320.pre`` spamd cannot scan at all) and our own ``local.cf`` (Bayes off, threshold
  5).  The rules are the ones Debian ships, which include GTUBE (score 1000).  spamd
  reads its configuration after dropping to ``nobody``, so SITE lives in a 0755 directory
  under the system temp dir, not under pytest's 0700 tmp tree.
* clamd: ``clamd -c CONF`` with ``Foreground yes``, TCPSocket/TCPAddr 127.0.0.1 and a
  LocalSocket, and a database directory holding only ``mxrules-test.hdb``: an MD5 hash
  signature of the EICAR test file (``md5:68:Mxrules.Test.EICAR``; clamd reports it as
  ``Mxrules.Test.EICAR.UNOFFICIAL``).  No freshclam, no network.
* rspamd: ``rspamd -f -c CONF --var=LOCAL_CONFDIR=... --var=DBDIR=... --var=RUNDIR=...
  --var=LOGDIR=...`` (plus ``-u root -g root`` as root, which rspamd otherwise refuses).
  CONF is our own top file: the stock ``/etc/rspamd/common.conf`` (rules, modules) with
  only a "normal" worker on a loopback port and a unix socket; LOCAL_CONFDIR is ours (see
  `Rspamd` for what it changes); redis is not configured, so the modules that need it
  disable themselves.

Start-up until the first answer (2 CPUs): clamd 0.1 s, spamd 1-2 s, rspamd about 1 s
(0.3 s on a restart, its hyperscan cache warm).  rspamd gets a short public-suffix list
for that: compiling the stock one takes it 10-20 s at every start with an empty cache.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import os
import pwd
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from harness.ports import free_port, is_listening
from harness.process import ManagedProcess

# -- test content --------------------------------------------------------------------------

# SpamAssassin's Generic Test for Unsolicited Bulk Email; rspamd knows it too.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# Subjects that the test rspamd scores into its greylist and add_header bands.
RSPAMD_GREYLIST_SUBJECT = "mxrules-test-greylist"
RSPAMD_ADD_HEADER_SUBJECT = "mxrules-test-add-header"

# What clamd calls the test signature (it appends .UNOFFICIAL to non-official names).
EICAR_SIGNATURE = "Mxrules.Test.EICAR.UNOFFICIAL"


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file.

    Built from two halves so that this source file is not itself flagged by a virus
    scanner on a developer's machine.
    """
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def message(
    subject: str = "Lunch tomorrow",
    body: str = "Shall we have lunch tomorrow at noon?\n",
    *,
    attachment: tuple[str, bytes] | None = None,
    sender: str = "alice@example.com",
    recipient: str = "bob@example.org",
) -> bytes:
    """A raw message with CRLF line ends, as the milter spools it.

    ``attachment`` (file name, content) makes a multipart/mixed message with the file
    base64-encoded.  The Date is now: rspamd scores a date in the past.
    """
    head = [
        f"From: Alice <{sender}>",
        f"To: Bob <{recipient}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain='example.com')}",
        "MIME-Version: 1.0",
    ]
    text = body.replace("\r\n", "\n").replace("\n", "\r\n")
    if attachment is None:
        head.append("Content-Type: text/plain; charset=utf-8")
        return ("\r\n".join(head) + "\r\n\r\n" + text).encode()
    name, content = attachment
    boundary = "mxrules-boundary-1"
    encoded = base64.encodebytes(content).decode().replace("\n", "\r\n")
    parts = [
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        text,
        f"--{boundary}",
        f'Content-Type: application/octet-stream; name="{name}"',
        f'Content-Disposition: attachment; filename="{name}"',
        "Content-Transfer-Encoding: base64",
        "",
        encoded + f"--{boundary}--",
        "",
    ]
    head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(parts)).encode()


# -- servers -------------------------------------------------------------------------------

_UNPRIVILEGED_USER = "nobody"

# Seconds every start took, per server name, in this process (for the session summary:
# CI time budgets).
STARTUP_TIMES: dict[str, list[float]] = {}
# sockaddr_un.sun_path holds 108 bytes with the NUL; pytest's tmp paths can be long.
_MAX_SOCKET_PATH = 100


def _short_socket_path(preferred: Path, name: str) -> tuple[Path, Path | None]:
    """``preferred`` if it fits in a sockaddr_un, else a path in a new short temp dir.

    Returns (path, directory to remove at the end or None).
    """
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH:
        return preferred, None
    directory = Path(tempfile.mkdtemp(prefix="mxrules-sock-"))
    return directory / name, directory


class ScannerProcess(ManagedProcess):
    """A scanner daemon run in the foreground in its own process group.

    Subclasses give the command (`_command`), write their configuration (`_prepare`)
    and say when the server answers (`_ping`).  ``start`` returns once it answers, or
    raises with the tail of its log; ``stop`` leaves nothing listening.  A restart keeps
    the port unless the port was taken meanwhile (then a new one is picked: read
    ``address`` after starting).
    """

    name = "scanner"

    def __init__(self, workdir: Path, *, start_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / f"{self.name}.log")
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.socket_path: Path = workdir / f"{self.name}.sock"  # subclasses may move it
        self._cleanup: list[Path] = []
        self.last_startup: float | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address}, running={self.running})"

    @property
    def address(self) -> str:
        """The TCP address as the scan functions take it: ``"127.0.0.1:PORT"``."""
        return f"{self.host}:{self.port}"

    @property
    def unix_address(self) -> str:
        """The unix socket address as the scan functions take it: ``"unix:/path"``."""
        return f"unix:{self.socket_path}"

    # -- subclass hooks --

    def _prepare(self) -> None:
        """Write configuration files; called before every start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ping(self) -> bool:
        """True once the server answers its protocol's ping."""
        raise NotImplementedError

    # -- lifecycle --

    def start(self) -> None:
        """Start and return once the server answers (or raise with its log tail)."""
        if self.running:
            return
        for attempt in range(3):
            began = time.monotonic()
            self._prepare()
            # Its own process group: stop() ends its children too.
            self.spawn(self._command(), cwd=self.workdir, start_new_session=True)
            try:
                self._wait_ready()
            except _PortTaken:
                self.stop()
                if attempt == 2:
                    raise
                self.port = free_port(self.host)  # someone took the port meanwhile
                continue
            except BaseException:
                self.stop()
                raise
            self.last_startup = time.monotonic() - began
            STARTUP_TIMES.setdefault(self.name, []).append(self.last_startup)
            return

    def _wait_ready(self) -> None:
        try:
            self.wait_ready(self._ping, self.start_timeout)
        except RuntimeError as exc:
            if "address already in use" in str(exc).lower():
                raise _PortTaken(str(exc)) from None
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, SIGKILL at the deadline); safe to call twice.

        Once this returns, its TCP port refuses connections.
        """
        started = self.proc is not None
        # Children (spamd's, rspamd's workers) normally go with their parent; any
        # left in the group we created would keep the port open.
        self.terminate(timeout, group=True)
        deadline = time.monotonic() + timeout
        while started and is_listening(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temporary directories made outside ``workdir``."""
        self.stop()
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self._cleanup.clear()

    def __enter__(self) -> ScannerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _PortTaken(RuntimeError):
    """The server could not bind its port: another process took it after free_port()."""


def _connect_ping(sock: socket.socket, request: bytes, until: bytes) -> bytes:
    """Send ``request`` and read until ``until`` appears or the peer closes."""
    sock.sendall(request)
    answer = b""
    while until not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


class Spamd(ScannerProcess):
    """SpamAssassin's spamd (see the module docstring); also listens on a unix socket."""

    name = "spamd"
    RULES_DIR = Path("/usr/share/spamassassin")
    SITE_DIRS = (Path("/etc/spamassassin"), Path("/etc/mail/spamassassin"))

    def __init__(self, workdir: Path, *, start_timeout: float = 60.0) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        # Readable by the unprivileged user spamd scans as; short enough for a socket.
        self.rundir = Path(tempfile.mkdtemp(prefix="mxrules-spamd-"))
        self.rundir.chmod(0o755)
        self._cleanup.append(self.rundir)
        self.socket_path = self.rundir / "spamd.sock"

    @staticmethod
    def pre_files() -> list[Path]:
        """The system's ``*.pre`` files (loadplugin lines), from the first site dir with any."""
        for directory in Spamd.SITE_DIRS:
            found = sorted(directory.glob("*.pre"))
            if found:
                return found
        return []

    def _prepare(self) -> None:
        site = self.rundir / "site"
        site.mkdir(exist_ok=True)
        site.chmod(0o755)
        for pre in self.pre_files():
            shutil.copyfile(pre, site / pre.name)
        (site / "local.cf").write_text(
            "# mxrules tests: no learning, no network, the stock threshold.\n"
            "use_bayes 0\n"
            "bayes_auto_learn 0\n"
            "required_score 5.0\n"
        )
        for path in site.iterdir():
            path.chmod(0o644)
        self.socket_path.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        command = [
            shutil.which("spamd") or "/usr/sbin/spamd",
            "--local",  # no DNS or network tests
            "--nouser-config",
            f"--listen={self.host}:{self.port}",
            f"--listen={self.socket_path}",
            f"--pidfile={self.rundir / 'spamd.pid'}",
            "--syslog=stderr",
            f"--configpath={self.RULES_DIR}",
            f"--siteconfigpath={self.rundir / 'site'}",
            "--min-children=1",
            "--max-children=4",
        ]
        if os.geteuid() == 0:
            command.append(f"--username={_UNPRIVILEGED_USER}")
        return command

    def _ping(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            answer = _connect_ping(sock, b"PING SPAMC/1.5\r\n\r\n", b"\r\n")
        return b"PONG" in answer

    @staticmethod
    def unprivileged_user_exists() -> bool:
        try:
            pwd.getpwnam(_UNPRIVILEGED_USER)
        except KeyError:
            return False
        return True


class Clamd(ScannerProcess):
    """ClamAV's clamd with only the test EICAR signature; also listens on a unix socket.

    ``stream_max_length`` is clamd's StreamMaxLength (INSTREAM refuses longer streams);
    ``options`` are further clamd.conf lines (e.g. ``{"MaxFileSize": "1M"}``).
    """

    name = "clamd"

    def __init__(
        self,
        workdir: Path,
        *,
        stream_max_length: str = "64M",
        options: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        self.stream_max_length = stream_max_length
        self.options = dict(options or {})
        self.socket_path, extra = _short_socket_path(workdir / "clamd.sock", "clamd.sock")
        if extra is not None:
            self._cleanup.append(extra)
        self.config_path = workdir / "clamd.conf"

    def _prepare(self) -> None:
        database = self.workdir / "db"
        database.mkdir(exist_ok=True)
        test_file = eicar()
        (database / "mxrules-test.hdb").write_text(
            f"{hashlib.md5(test_file).hexdigest()}:{len(test_file)}:Mxrules.Test.EICAR\n"
        )
        temporary = self.workdir / "tmp"
        temporary.mkdir(exist_ok=True)
        lines = {
            "DatabaseDirectory": str(database),
            "TCPSocket": str(self.port),
            "TCPAddr": self.host,
            "LocalSocket": str(self.socket_path),
            "Foreground": "yes",
            "PidFile": str(self.workdir / "clamd.pid"),
            "TemporaryDirectory": str(temporary),
            "LogFile": str(self.log_path),
            "LogTime": "yes",
            "StreamMaxLength": self.stream_max_length,
            "SelfCheck": "3600",  # no database reloads during a run
            **self.options,
        }
        self.config_path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
        self.socket_path.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        return [shutil.which("clamd") or "/usr/sbin/clamd", "-c", str(self.config_path)]

    def _ping(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            answer = _connect_ping(sock, b"zPING\0", b"\0")
        return answer.startswith(b"PONG")


# rspamd's own top file: the stock rules and modules, only a "normal" worker, our dirs.
_RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"

options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}

logging {{
    type = "console";
    level = "info";
}}

worker "normal" {{
    bind_socket = "{tcp}";
    bind_socket = "{unix} mode=0666";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""

_RSPAMD_OPTIONS = """\
# A few public suffixes instead of the stock list: compiling the stock list takes
# rspamd 10-20 s at every start with an empty cache.
url_tld = "{tld}";
# Lookups go nowhere (nothing listens there): the tests never depend on the network.
dns {{
    nameserver = ["127.0.0.1:1"];
    timeout = 0.5s;
    retransmits = 1;
}}
"""

# Modules whose checks need DNS (or a remote service): offline they only add timeouts
# and "DNS failed" scores, which would make the tests slow and the verdicts vary.
_RSPAMD_DISABLED = ("rbl", "hfilter", "spf", "dkim", "dmarc", "asn", "fuzzy_check",
                    "mx_check", "phishing")

# Test rules landing a message in the greylist and add_header bands of _RSPAMD_ACTIONS.
_RSPAMD_REGEXP = f"""\
MXRULES_TEST_GREYLIST {{
    re = "Subject=/{RSPAMD_GREYLIST_SUBJECT}/iH";
    score = 5.0;
    description = "mxrules tests: between the greylist and add_header thresholds";
}}
MXRULES_TEST_ADD_HEADER {{
    re = "Subject=/{RSPAMD_ADD_HEADER_SUBJECT}/iH";
    score = 8.0;
    description = "mxrules tests: between the add_header and reject thresholds";
}}
"""

# The stock thresholds, pinned so that the tests do not depend on /etc/rspamd.
_RSPAMD_ACTIONS = "reject = 15;\nadd_header = 6;\ngreylist = 4;\n"


class Rspamd(ScannerProcess):
    """rspamd's normal worker on loopback (HTTP) and a unix socket; see the module docstring.

    Its LOCAL_CONFDIR (``workdir/local``) changes the stock configuration so: a short
    public-suffix list, DNS to nowhere, the DNS-based modules off (_RSPAMD_DISABLED), the
    stock action thresholds pinned, two test rules (RSPAMD_GREYLIST_SUBJECT,
    RSPAMD_ADD_HEADER_SUBJECT in the Subject).
    """

    name = "rspamd"
    CONFDIR = Path("/etc/rspamd")

    def __init__(self, workdir: Path, *, start_timeout: float = 90.0) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        self.socket_path, extra = _short_socket_path(workdir / "rspamd.sock", "rspamd.sock")
        if extra is not None:
            self._cleanup.append(extra)
        self.config_path = workdir / "rspamd.conf"
        self.local_confdir = workdir / "local"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _prepare(self) -> None:
        for name in ("db", "run", "log"):
            (self.workdir / name).mkdir(exist_ok=True)
        local_d = self.local_confdir / "local.d"
        local_d.mkdir(parents=True, exist_ok=True)
        tld = self.workdir / "tld.dat"
        tld.write_text("// mxrules tests: a short public suffix list\n"
                       + "".join(f"{s}\n" for s in ("com", "net", "org", "example", "test")))
        (local_d / "options.inc").write_text(_RSPAMD_OPTIONS.format(tld=tld))
        for module in _RSPAMD_DISABLED:
            (local_d / f"{module}.conf").write_text("enabled = false;\n")
        (local_d / "regexp.conf").write_text(_RSPAMD_REGEXP)
        (local_d / "actions.conf").write_text(_RSPAMD_ACTIONS)
        self.config_path.write_text(
            _RSPAMD_CONF.format(tcp=f"{self.host}:{self.port}", unix=self.socket_path)
        )
        self.socket_path.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        command = [
            shutil.which("rspamd") or "/usr/bin/rspamd",
            "-f",
            "-c", str(self.config_path),
            f"--var=LOCAL_CONFDIR={self.local_confdir}",
            f"--var=DBDIR={self.workdir / 'db'}",
            f"--var=RUNDIR={self.workdir / 'run'}",
            f"--var=LOGDIR={self.workdir / 'log'}",
        ]
        if os.geteuid() == 0:
            # rspamd refuses to run its workers as root unless told so explicitly.
            command += ["-u", "root", "-g", "root"]
        return command

    def _ping(self) -> bool:
        url = f"http://{self.address}/ping"
        with self._opener.open(url, timeout=2) as response:
            return bool(response.read().strip() == b"pong")


class HangingServer:
    """A loopback TCP server that accepts connections and never reads or answers.

    Stands for a scanner that is stuck; ``accepted`` counts the connections it got.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        # close() does not wake a thread blocked in accept(): poll the closed flag.
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            self.accepted += 1
            self._connections.append(conn)  # held open, never read: the client must give up

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for conn in self._connections:
            conn.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HangingServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
