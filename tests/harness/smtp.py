"""A small SMTP client for tests: every reply is returned as (code, text), never raised.

smtplib raises on many error replies and on dropped connections; a test of a
milter wants to *see* those replies.  A connection that is closed or refused is
recorded as code -1 with the error text.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType

Reply = tuple[int, str]
DISCONNECTED = -1

_BARE_LF = re.compile(rb"(?<!\r)\n")
CRLF = b"\r\n"


def _text(msg: bytes | str) -> str:
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def xtext(value: str) -> str:
    """Encode an XCLIENT attribute value as RFC 3461 xtext."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in value
    )


def is_positive(reply: Reply | None) -> bool:
    """True for a 2xx reply."""
    return reply is not None and 200 <= reply[0] < 300


class Client:
    """One SMTP session; the greeting is in ``greeting`` (code -1 if the connect failed)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.helo_name = "client.test"
        # Connecting in the constructor would raise on a non-220 greeting and lose it.
        self._smtp = smtplib.SMTP(timeout=timeout)
        # What SMTP(host) would set; starttls() sends it as SNI.
        self._smtp._host = host  # type: ignore[attr-defined]
        self.greeting: Reply = self._call(lambda: self._smtp.connect(host, port))

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.quit()

    def _call(self, command: Callable[[], tuple[int, bytes | str]]) -> Reply:
        """Run one smtplib command, turning exceptions into replies."""
        try:
            code, msg = command()
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, _text(exc.smtp_error)
        except smtplib.SMTPNotSupportedError:
            raise  # the test asked for an extension the server lacks: not a reply
        except OSError as exc:  # SMTPServerDisconnected, refused, reset, timed out, TLS
            self._smtp.close()
            return DISCONNECTED, str(exc) or type(exc).__name__
        return code, _text(msg)

    def ehlo(self, name: str = "client.test") -> Reply:
        """Send EHLO; the name is remembered for the re-EHLO after XCLIENT/STARTTLS."""
        self.helo_name = name
        return self._call(lambda: self._smtp.ehlo(name))

    def xclient(self, addr: str, name: str = "[UNAVAILABLE]", helo: str | None = None) -> Reply:
        """Pretend to be another client (Postfix XCLIENT), then EHLO in the new session.

        Postfix answers 220 and restarts the session: milters see a new connect.
        """
        attrs = {"ADDR": addr, "NAME": name}
        if helo is not None:
            attrs["HELO"] = helo
        args = " ".join(f"{key}={xtext(value)}" for key, value in attrs.items())
        reply = self._call(lambda: self._smtp.docmd("XCLIENT", args))
        if reply[0] == 220:
            self.ehlo(helo or self.helo_name)
        return reply

    def starttls(self) -> Reply:
        """STARTTLS without certificate checks (the server cert is self-signed), then EHLO."""
        if not self._smtp.has_extn("starttls"):
            # Let the server give its own answer rather than smtplib's exception.
            return self._call(lambda: self._smtp.docmd("STARTTLS"))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        reply = self._call(lambda: self._smtp.starttls(context=context))
        if reply[0] == 220:
            self.ehlo(self.helo_name)
        return reply

    def mail(self, sender: str, size: int | None = None, *, options: Sequence[str] = ()) -> Reply:
        """MAIL FROM, with SIZE= when given; extra ESMTP ``options`` such as "SMTPUTF8"."""
        opts = [*options, *([f"SIZE={size}"] if size is not None else [])]
        return self._call(lambda: self._smtp.mail(sender, opts))

    def rcpt(self, addr: str) -> Reply:
        """RCPT TO."""
        return self._call(lambda: self._smtp.rcpt(addr))

    def data(self, msg: bytes, *, raw: bool = False) -> Reply:
        """DATA plus the message; the reply to DATA itself is returned if it is not 354.

        Bare LF becomes CRLF unless ``raw`` (SMTP lines end in CRLF); dots are stuffed.
        """
        body = msg if raw else _BARE_LF.sub(b"\r\n", msg)
        return self._call(lambda: self._smtp.data(body))

    def rset(self) -> Reply:
        """RSET."""
        return self._call(self._smtp.rset)

    def quit(self) -> Reply:
        """QUIT and close; harmless on a closed connection."""
        if self._smtp.sock is None:
            return DISCONNECTED, "not connected"
        reply = self._call(self._smtp.quit)
        self._smtp.close()
        return reply


@dataclass(frozen=True)
class Result:
    """Every reply of one ``send`` session; None marks a step that was not reached."""

    connect: Reply
    ehlo: Reply | None = None
    xclient: Reply | None = None
    starttls: Reply | None = None
    mail: Reply | None = None
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None


def send(
    host: str,
    port: int,
    sender: str,
    rcpts: Iterable[str],
    msg: bytes,
    *,
    client_ip: str | None = None,
    tls: bool = False,
    helo: str = "client.test",
) -> Result:
    """Run one whole session and record each reply instead of raising.

    It stops on a dropped connection, a failed XCLIENT/STARTTLS (the session would not
    be the one asked for) or a refused MAIL; DATA is sent only if a recipient was
    accepted.  SMTPUTF8 is requested when an address is not ASCII.
    """
    recipients = list(rcpts)
    smtputf8 = not all(addr.isascii() for addr in [sender, *recipients])
    with Client(host, port) as client:
        result = Result(connect=client.greeting)
        # Not 220 is no reason to stop: after a connect-time milter reject Postfix greets
        # with 554 and only shows the milter's own reply text at MAIL FROM.
        if client.greeting[0] == DISCONNECTED:
            return result
        ehlo = client.ehlo(helo)
        result = replace(result, ehlo=ehlo)
        if ehlo[0] == DISCONNECTED:
            return result
        if client_ip is not None:
            xclient = client.xclient(client_ip)
            result = replace(result, xclient=xclient)
            if xclient[0] != 220:
                return result
        if tls:
            starttls = client.starttls()
            result = replace(result, starttls=starttls)
            if starttls[0] != 220:
                return result
        mail = client.mail(sender, options=["SMTPUTF8"] if smtputf8 else ())
        result = replace(result, mail=mail)
        if not is_positive(mail):
            return result
        for addr in recipients:
            result.rcpts[addr] = client.rcpt(addr)
            if result.rcpts[addr][0] == DISCONNECTED:
                return result
        if any(map(is_positive, result.rcpts.values())):
            result = replace(result, data=client.data(msg))
        return result


class Raw:
    """An SMTP session with bytes on the wire exactly as given (8-bit, odd quoting).

    smtplib re-quotes addresses and refuses bytes that are not ASCII; a test
    of what Postfix and the milter make of a client's exact text needs this.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            while CRLF not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return -1, b"".join(lines) or b"connection closed"
                self.buf += chunk
            line, self.buf = self.buf.split(CRLF, 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else -1, b"\n".join(lines)

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + CRLF)
        return self.reply()

    def data(self, message: bytes) -> tuple[int, bytes]:
        code, text = self.cmd(b"DATA")
        if code != 354:
            return code, text
        stuffed = b"".join(b"." + line if line.startswith(b".") else line
                           for line in message.splitlines(keepends=True))
        if not stuffed.endswith(CRLF):
            stuffed += CRLF
        self.sock.sendall(stuffed + b".\r\n")
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.cmd(b"QUIT")
        self.sock.close()
