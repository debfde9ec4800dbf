"""The pymilter class: a thin adapter from libmilter callbacks to `Session`.

Every callback ends at `_edge`: whatever goes wrong inside becomes a logged,
counted 451 instead of pymilter's "untrapped exception".  Header, body and
end-of-header callbacks are `@noreply` (Postfix does not wait for them; their
errors are answered at end of data), which saves a round trip per header.

Not used, on purpose: `@Milter.symlist` (broken on Python 3 in pymilter 1.0.5;
it silently disables every @noreply) -- the macros Postfix sends are set in
main.cf instead (conf/postfix-main.cf).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import Milter

from mxrules.decision import Reply
from mxrules.lifecycle import (
    DeleteRecipient,
    Discard,
    InsertHeader,
    Manipulation,
    Outcome,
    RemoveHeader,
)

from .session import Runtime, Session, postfix_form

F = TypeVar("F", bound=Callable[..., Any])
_conn_ids = itertools.count(1)

_VERB = {"reject": Milter.REJECT, "tempfail": Milter.TEMPFAIL}


def _edge(stage: str, *, noreply: bool = False) -> Callable[[F], F]:
    """Catch everything a callback raises.

    A `noreply` stage may only return CONTINUE (Postfix is not listening), so
    its error is kept on the message and answered with 451 at end of data.
    """
    def wrap(func: F) -> F:
        @functools.wraps(func)
        def guarded(self: MxrulesMilter, *args: Any) -> Any:
            try:
                return func(self, *args)
            except Exception as exc:
                if noreply:
                    self.session.deferred_error(stage, exc)
                    return Milter.CONTINUE
                return self._answer(self.session.error(stage, exc))
        return guarded  # type: ignore[return-value]
    return wrap


@Milter.header_leading_space
class MxrulesMilter(Milter.Base):
    """One instance per SMTP connection (libmilter runs each in its own thread)."""

    runtime: ClassVar[Runtime]

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(self.runtime, f"{next(_conn_ids):x}")

    def _answer(self, reply: Reply) -> int:
        if reply.verb == "continue":
            return Milter.CONTINUE
        # The MTA reads a milter's reply text as a format (`%%` is one `%`), and
        # pymilter raises on a lone `%`: a Bounce message or an address with one
        # would otherwise turn a refusal into a 451.
        self.setreply(reply.code, reply.xcode, reply.text.replace("%", "%%"))
        return _VERB[reply.verb]

    def _macro(self, name: str) -> str:
        value = self.getsymval(name)
        return value if isinstance(value, str) else ""

    @_edge("connect")
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if isinstance(hostaddr, tuple) and hostaddr:
            address = str(hostaddr[0])
        else:  # a unix-domain client: Postfix may still name the client in a macro
            address = self._macro("{client_addr}") or str(hostaddr or "")
        return self._answer(self.session.connect(address, hostname or ""))

    @Milter.noreply
    @_edge("helo", noreply=True)
    def hello(self, hostname: str) -> int:
        self.session.helo(hostname or "", self._macro("{tls_version}"), self._macro("{cipher}"))
        return Milter.CONTINUE

    @_edge("mail")
    def envfrom(self, sender: str, *params: str) -> int:
        # As for RCPT: the address Postfix parsed ({mail_addr}, empty for <>).
        parsed = self._macro("{mail_addr}")
        reply = self.session.mail(f"<{parsed}>" if parsed else sender,
                                  Milter.param2dict(params))
        return self._answer(reply)

    @_edge("rcpt")
    def envrcpt(self, recipient: str, *params: str) -> int:
        tls = bool(self._macro("{tls_version}"))
        # Postfix names the queue file once one recipient is valid
        # (smtpd_delay_open_until_valid_rcpt): later RCPT lines carry its id.
        self.session.queue_id = self._macro("i") or self.session.queue_id
        # Judge the address Postfix parsed and will deliver to, not the client's
        # text: Postfix reads `RCPT TO:<user@example.com>>` as user@example.com.
        # The client's text is what Postfix recorded, and what delrcpt must name.
        parsed = self._macro("{rcpt_addr}")
        return self._answer(self.session.rcpt(f"<{parsed}>" if parsed else recipient, tls=tls,
                                              recorded=postfix_form(recipient)))

    @Milter.decode("bytes")
    @Milter.noreply
    @_edge("header", noreply=True)
    def header(self, name: str, value: bytes) -> int:
        self.session.header(name, value)
        return Milter.CONTINUE

    @Milter.noreply
    @_edge("eoh", noreply=True)
    def eoh(self) -> int:
        self.session.eoh()
        return Milter.CONTINUE

    @Milter.noreply
    @_edge("body", noreply=True)
    def body(self, chunk: bytes) -> int:
        self.session.body(chunk)
        return Milter.CONTINUE

    @_edge("eom")
    def eom(self) -> int:
        result = self.session.eom(self._macro("i"))
        if result.reply.verb != "continue":
            return self._answer(result.reply)
        try:
            self._edit(result)
        except Exception as exc:  # the job is stored: the answer stays "stored"
            self.session.after_commit_failed("bookkeeping", result.message_id, exc)
        return Milter.DISCARD if result.discard else Milter.CONTINUE

    def _edit(self, result: Outcome) -> None:
        """Apply the changes to Postfix's copy of a stored message, in their order.

        The order is the outcome's (mxrules/lifecycle.py says why).  Each change
        is tried on its own: one that fails (libmilter or Postfix refusing it)
        is logged and counted, and the rest still go through.  A discard is
        the reply to end of data, not a call: `eom` answers it.
        """
        for change in result.manipulations:
            try:
                self._encode(change)
            except Exception as exc:
                self.session.after_commit_failed(change.step, result.message_id, exc)

    def _encode(self, change: Manipulation) -> None:
        match change:
            case RemoveHeader(name, occurrence):
                self.chgheader(name, occurrence, None)
            case InsertHeader(name, value, index):
                self.addheader(name, value, index)
            case DeleteRecipient(recipient):
                self.delrcpt(recipient)
            case Discard():
                pass

    @_edge("abort")
    def abort(self) -> int:
        self.session.abort()
        return Milter.CONTINUE

    @_edge("close")
    def close(self) -> int:
        self.session.abort()
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, cmd: str) -> int:
        return Milter.CONTINUE
