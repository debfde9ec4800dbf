"""An SMTP sink on loopback that records what Postfix relays to it.

Postfix under test delivers everything to smtp:[127.0.0.1]:port; this server is
that port, so a test can assert on exactly what left Postfix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from harness.ports import free_port

# Above Postfix's message_size_limit (60 MiB) plus the headers Postfix adds.
DATA_SIZE_LIMIT = 80 * 1024 * 1024


@dataclass(frozen=True)
class Message:
    """One received message: envelope plus the raw DATA bytes (CRLF line ends, unstuffed)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class _Recorder:
    """aiosmtpd handler; runs on the controller's event-loop thread."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content
            raw = content.encode() if isinstance(content, str) else (content or b"")
        message = Message(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(raw),
        )
        self._sink._record(message)
        return "250 2.0.0 Ok: recorded"


class SmtpSink:
    """Records every message it receives; ``wait_for`` blocks on a Condition, not a poll."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._controller: Controller | None = None

    def start(self) -> None:
        """Start serving; Controller.start() returns once the server answers."""
        if self._controller is not None:
            return
        controller = Controller(
            _Recorder(self),
            hostname=self.host,
            port=self.port,
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
            decode_data=False,
            ident="harness-sink",
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def clear(self) -> None:
        """Forget what was received so far."""
        with self._cond:
            self.messages.clear()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Message]:
        """Wait until at least ``count`` messages arrived; return a snapshot of them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                got = [(m.mail_from, m.rcpt_tos) for m in self.messages]
                raise TimeoutError(
                    f"sink on port {self.port} got {len(got)} of {count} messages"
                    f" within {timeout:g}s: {got}"
                )
            return list(self.messages)
