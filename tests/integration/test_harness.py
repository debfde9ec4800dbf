"""Prove the harness against a real Postfix: relaying, a live milter, and a dead milter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.fixtures import PostfixFactory
from harness.ports import free_port, wait_listening
from harness.sink import SmtpSink
from harness.smtp import send

pytestmark = pytest.mark.postfix

# A throwaway milter: records what it sees, rejects RCPT reject@*, continues otherwise.
# (Milter.symlist/setsymlist are avoided: broken on Python 3 in pymilter 1.0.5.)
PROBE_MILTER = '''\
"""Harness probe milter: argv = port, records file (JSON lines)."""
import json
import sys

import Milter

PORT, RECORDS = sys.argv[1], sys.argv[2]


class Probe(Milter.Base):
    def __init__(self):
        self.conn = Milter.uniqueID()

    def record(self, **fields):
        with open(RECORDS, "a", encoding="utf-8") as out:
            out.write(json.dumps({"conn": self.conn, **fields}) + "\\n")

    def connect(self, hostname, family, hostaddr):
        ip = hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr)
        self.record(event="connect", ip=ip, hostname=hostname)
        return Milter.CONTINUE

    def hello(self, heloname):
        version = self.getsymval("{tls_version}")
        self.record(event="hello", helo=heloname, tls=bool(version), tls_version=version)
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        if to.strip("<>").lower().startswith("reject@"):
            self.setreply("550", "5.1.1", "no such user")
            return Milter.REJECT
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def header(self, field, value):
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.CONTINUE


Milter.factory = Probe
Milter.runmilter("harness-probe", f"inet:{PORT}@127.0.0.1", timeout=60)
'''

MESSAGE = (
    b"From: Sender <sender@example.test>\r\n"
    b"To: rcpt@other.test\r\n"
    b"Subject: harness check\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
)
BODY = b"first line\r\n.a line that starts with a dot\r\n8-bit: caf\xc3\xa9\r\n\r\nlast line\r\n"


@dataclass
class ProbeMilter:
    """The probe milter subprocess and where it writes what it saw."""

    port: int
    records_path: Path
    process: subprocess.Popen[bytes]

    @property
    def spec(self) -> str:
        """The smtpd_milters value that reaches this milter."""
        return f"inet:127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """Everything the milter recorded so far, in order (one dict per callback)."""
        if not self.records_path.exists():
            return []
        lines = self.records_path.read_text().splitlines()
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        """SIGKILL the milter and reap it (on SIGTERM libmilter lingers ~5 s)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def probe_milter(tmp_path: Path) -> Iterator[ProbeMilter]:
    """Run the probe milter with this interpreter (the venv's, which sees pymilter)."""
    script = tmp_path / "probe_milter.py"
    script.write_text(PROBE_MILTER)
    port = free_port()
    log_path = tmp_path / "probe_milter.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(port), str(tmp_path / "records.jsonl")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    milter = ProbeMilter(port, tmp_path / "records.jsonl", process)
    try:
        wait_listening("127.0.0.1", port, timeout=15, connect=False)
    except TimeoutError as exc:
        milter.kill()
        raise RuntimeError(f"probe milter did not start: {log_path.read_text()}") from exc
    yield milter
    milter.kill()


def test_relays_to_sink_without_milter(
    postfix_factory: PostfixFactory, smtp_sink: SmtpSink
) -> None:
    """Without a milter, Postfix relays to the sink and the body arrives byte for byte."""
    postfix = postfix_factory(relay_port=smtp_sink.port)

    result = send(
        postfix.host, postfix.smtp_port, "sender@example.test", ["rcpt@other.test"], MESSAGE + BODY
    )

    assert result.connect[0] == 220
    assert result.mail == (250, "2.1.0 Ok")
    assert result.rcpts == {"rcpt@other.test": (250, "2.1.5 Ok")}
    assert result.data is not None and result.data[0] == 250
    (message,) = smtp_sink.wait_for(1)
    assert message.mail_from == "sender@example.test"
    assert message.rcpt_tos == ("rcpt@other.test",)
    headers, _, body = message.data.partition(b"\r\n\r\n")
    assert body == BODY
    assert b"Subject: harness check" in headers
    postfix.wait_for_log(r"status=sent .*250 2\.0\.0 Ok: recorded")
    postfix.wait_for_log(r": removed$")
    assert postfix.queue_empty()


def test_milter_sees_xclient_rejects_rcpt_and_gets_tls_macros(
    postfix_factory: PostfixFactory, smtp_sink: SmtpSink, probe_milter: ProbeMilter
) -> None:
    """The milter sees the XCLIENT address, its RCPT reject reaches the client, and
    {tls_version} is set at the HELO after STARTTLS (not before)."""
    postfix = postfix_factory(milter=probe_milter.spec, relay_port=smtp_sink.port)

    result = send(
        postfix.host,
        postfix.smtp_port,
        "sender@example.test",
        ["reject@other.test", "ok@other.test"],
        MESSAGE + BODY,
        client_ip="192.0.2.7",
        tls=True,
    )

    assert result.xclient is not None and result.xclient[0] == 220
    assert result.starttls is not None and result.starttls[0] == 220
    assert result.rcpts["reject@other.test"] == (550, "5.1.1 no such user")
    assert result.rcpts["ok@other.test"][0] == 250
    assert result.data is not None and result.data[0] == 250
    (message,) = smtp_sink.wait_for(1)
    assert message.rcpt_tos == ("ok@other.test",)

    records = probe_milter.records()
    connects = [r for r in records if r["event"] == "connect"]
    assert connects[-1]["ip"] == "192.0.2.7", records
    session = [r for r in records if r["conn"] == connects[-1]["conn"]]
    hellos = [r["tls"] for r in session if r["event"] == "hello"]
    assert hellos == [False, True], records


def test_dead_milter_means_tempfail(
    postfix_factory: PostfixFactory, smtp_sink: SmtpSink, probe_milter: ProbeMilter
) -> None:
    """milter_default_action=tempfail: with the milter gone, MAIL FROM gets a 4xx."""
    postfix = postfix_factory(milter=probe_milter.spec, relay_port=smtp_sink.port)
    args = (postfix.host, postfix.smtp_port, "sender@example.test", ["ok@other.test"])
    alive = send(*args, MESSAGE + BODY)
    assert alive.data is not None and alive.data[0] == 250
    smtp_sink.wait_for(1)

    probe_milter.kill()
    offset = postfix.log_size()
    result = send(*args, MESSAGE + BODY)

    assert result.connect[0] == 220
    assert result.mail is not None and 400 <= result.mail[0] < 500, result
    assert result.data is None
    postfix.wait_for_log("connect to Milter service " + re.escape(probe_milter.spec), since=offset)
    assert len(smtp_sink.wait_for(1)) == 1
