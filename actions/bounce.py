"""Bounce: tell the envelope sender, in an RFC 3464 DSN, that a message failed.

SES's Bounce action, for a message Postfix has already accepted (the SMTP reply
cannot change any more, exactly as in SES): the DSN that actions.dsn composes
(RFC 3464, no I/O there), from the action's `sender` to the job's envelope
sender.  It is sent only to an authenticated sender and within rate
limits (actions.bounce_limit): anything else would mail whoever a forger
names.  Where the milter can, it refuses the recipient at RCPT instead and
no DSN is needed (mxrules.decision.rcpt_bounce).

The DSN is sent with an empty envelope sender (`MAIL FROM:<>`) so that a DSN
that itself fails is dropped instead of bouncing back and forth, and a message
whose envelope sender is empty is never bounced at all (RFC 3464 §2, RFC 5321
§4.5.5): that is the one case with nobody to tell, not an error.

SETTINGS (read from `ctx.settings`, provided by the worker)

    bounce_relay: str    "host:port" of the SMTP relay that takes the DSN
                         (config `bounce.smtp_relay`, default in the
                         schema).  "[v6addr]:port" for IPv6; a missing port
                         means 25.
    smtp_timeout: float  seconds allowed for the connect and for each SMTP
                         command (smtplib's socket timeout; `bounce.timeout`).
    bounce_require_authenticated, bounce_rate_per_sender, bounce_rate_per_client,
    bounce_rate_period   when a DSN may be sent at all (actions.bounce_limit).

DIAGNOSTICS

    Returns Outcome(CONTINUE): bounced, skipped because the envelope sender
    is empty, or suppressed (`Outcome.suppressed` names the reason: the
    sender is not authenticated, or a rate limit is reached); the detail
    says which.
    PermanentActionError: the relay answered 5xx to MAIL, RCPT or DATA; the
    envelope sender cannot be written in an SMTP command (control
    characters); a non-ASCII address and a relay without SMTPUTF8.  No retry
    can mend these.
    RelayError: the relay could not be reached, timed out, dropped the
    connection or answered 4xx (or refused us at the greeting or EHLO, which is
    the relay's state, not this DSN's).  The runner retries.
    ValueError: a malformed `bounce_relay`.  Retried, so jobs wait in the
    spool while an operator mends the config.

Hostile input is expected here: the envelope addresses and the header block
come from the Internet.  actions.dsn escapes what goes into the DSN; here an
envelope sender with a control character never reaches an SMTP command.
"""

from __future__ import annotations

import contextlib
import smtplib
from typing import Any, NoReturn

from mxrules.actionspec import narrow
from mxrules.errors import MxrulesError
from mxrules.headblock import whole_header_lines
from mxrules.hostport import split_host_port
from mxrules.rules import BounceAction
from mxrules.text import CONTROLS, one_line

from .base import ActionContext, Outcome, PermanentActionError
from .bounce_limit import authenticated_by
from .dsn import MAX_ADDRESS, build_dsn, hostname, status_for

# Postfix's header_size_limit is 102400: a header block bigger than that was
# already cut by Postfix, so more would only make the DSN heavier.
HEADER_LIMIT = 100 * 1024


class RelayError(MxrulesError):
    """A transient failure to hand the DSN to the relay; the runner retries it."""


# -- sending -----------------------------------------------------------------------


def parse_relay(relay: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `host` or `[v6]` -> (host, port); port 25 by default."""
    try:
        return split_host_port(relay, default_port=25)
    except ValueError as exc:
        raise ValueError(f"bounce relay {relay!r} is not host:port: {exc}") from None


def check_envelope_address(addr: str) -> None:
    """Refuse an address that cannot go into `RCPT TO:<...>` as it is.

    A control character (CR, LF, NUL...) would end the SMTP command or corrupt
    it; Postfix never hands one over, so seeing one means a damaged or forged
    job, and no retry changes the address: PermanentActionError.
    """
    if not addr:
        raise ValueError("a DSN is never sent to the null sender <>")
    if CONTROLS.search(addr) or len(addr.encode("utf-8")) > MAX_ADDRESS:
        raise PermanentActionError(
            f"cannot bounce to {addr!r}: not an address an SMTP command can carry")


def send_dsn(relay: str, to_addr: str, dsn: bytes, *, timeout: float,
             helo_name: str = "localhost") -> None:
    """Hand `dsn` to the relay as `MAIL FROM:<>` / `RCPT TO:<to_addr>`.

    The recipient goes on the wire verbatim (smtplib's quoteaddr would
    reparse it and could change an odd but valid address).  5xx to MAIL, RCPT
    or DATA: PermanentActionError; anything else that is not 2xx (refused,
    timeout, 4xx, dropped connection): RelayError, to be retried.
    """
    check_envelope_address(to_addr)
    host, port = parse_relay(relay)
    utf8 = not to_addr.isascii() or not dsn.isascii()
    try:
        smtp = smtplib.SMTP(host, port, local_hostname=hostname(helo_name), timeout=timeout)
    except smtplib.SMTPConnectError as exc:
        raise RelayError(f"bounce relay {relay} refused the session: "
                         f"{exc.smtp_code} {_reply_text(exc.smtp_error)}") from exc
    except OSError as exc:
        raise RelayError(f"cannot connect to bounce relay {relay}: {exc}") from exc
    try:
        _transaction(smtp, relay, to_addr, dsn, utf8)
    finally:
        # A polite end, after a rejection too; smtplib has already closed a
        # broken connection, so this never waits on a dead one.
        with contextlib.suppress(OSError):
            smtp.quit()
        smtp.close()


def _transaction(smtp: smtplib.SMTP, relay: str, to_addr: str, dsn: bytes, utf8: bool) -> None:
    try:
        smtp.ehlo_or_helo_if_needed()
        options: list[str] = []
        if utf8:
            if not smtp.has_extn("smtputf8"):
                raise PermanentActionError(
                    f"bounce relay {relay} does not offer SMTPUTF8, which the DSN to "
                    f"{to_addr!r} needs for its non-ASCII addresses")
            options.append("SMTPUTF8")
        _expect(relay, "MAIL FROM:<>", *smtp.mail("", options))
        _expect(relay, "RCPT TO", *smtp.docmd("RCPT", f"TO:<{to_addr}>"))
        _expect(relay, "end of DATA", *smtp.data(dsn))
    except smtplib.SMTPHeloError as exc:
        raise RelayError(f"bounce relay {relay} refused EHLO/HELO: "
                         f"{exc.smtp_code} {_reply_text(exc.smtp_error)}") from exc
    except smtplib.SMTPDataError as exc:  # DATA itself answered other than 354
        _fail(relay, "DATA", exc.smtp_code, exc.smtp_error)
    except OSError as exc:  # refused, timeout, dropped connection (SMTPException too)
        raise RelayError(f"bounce relay {relay}: {exc!r}") from exc


def _expect(relay: str, step: str, code: int, reply: bytes | str) -> None:
    if not 200 <= code < 300:
        _fail(relay, step, code, reply)


def _fail(relay: str, step: str, code: int, reply: bytes | str) -> NoReturn:
    """5xx: the relay will never take this DSN.  Anything else may pass on a retry."""
    text = f"bounce relay {relay} answered {code} {_reply_text(reply)} to {step}"
    if 500 <= code < 600:
        raise PermanentActionError(text)
    raise RelayError(text)


def _reply_text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return one_line(reply)


# -- the action ----------------------------------------------------------------------


def run(ctx: ActionContext) -> Outcome:
    """Bounce the job's matched recipients to its envelope sender, unless suppressed.

    A bounce to an unauthenticated sender, or over a rate limit, sends
    nothing: the Outcome says why (`suppressed`), and the runner logs and
    counts it.  See actions.bounce_limit.
    """
    return bounce(ctx, narrow(ctx.action, BounceAction))


def too_big(ctx: ActionContext, size: int, limit: int, *, notification: bool = False
            ) -> Outcome:
    """SES's answer to an email over an action's size limit: it bounces.

    A DSN for the rule's recipients (552 5.3.4), sent as a Bounce action's is
    (to an authenticated sender only, within the rate limits), instead of a
    dead letter that no retry could ever deliver.  With `notification`, `size`
    is that of the SNS notification that could not fit.
    """
    if notification:
        why = (f"The message cannot be published: its notification would be {size} bytes, "
               f"over the {limit} bytes the receiving system's SNS action accepts.")
    else:
        why = (f"The message ({size} bytes with the headers added on receipt) is larger "
               f"than the {limit} bytes the receiving system's {ctx.action.TYPE} action "
               "accepts.")
    outcome = bounce(ctx, BounceAction(smtp_reply_code="552", status_code="5.3.4",
                                       message=why))
    what = "notification" if notification else "message"
    return Outcome(detail=f"{what} of {size} bytes, over the {ctx.action.TYPE} limit of "
                          f"{limit}: {outcome.detail}", suppressed=outcome.suppressed,
                   bounced=True)


def bounce(ctx: ActionContext, action: BounceAction) -> Outcome:
    """Send `action`'s DSN for the rule's recipients to the envelope sender, unless
    suppressed (an unauthenticated sender, a rate limit)."""
    limiter = ctx.bounce_limiter
    if limiter is None:
        raise TypeError("bounce.run needs the worker's BounceLimiter")
    job = ctx.job
    sender = job.mail_from.strip()
    if not sender or sender == "<>":
        return Outcome(detail="not bounced: the envelope sender is empty (<>)")
    recipients = ctx.matched.recipients
    if not recipients:
        return Outcome(detail="not bounced: the rule matched no recipients")
    settings = ctx.settings
    if settings.bounce_require_authenticated and not authenticated_by(job):
        return _suppressed("unauthenticated", sender,
                           "neither SPF nor aligned DMARC passed for the sender")
    reason = limiter.acquire(sender, job.client.address, settings)
    if reason:
        return _suppressed(reason, sender, f"more than {_limit(reason, settings)} DSNs in "
                                           f"{settings.bounce_rate_period:g} s")
    try:
        return _send(ctx, action, sender, recipients)
    except BaseException:
        limiter.release(sender, job.client.address)  # not sent: the retry may count it
        raise


def _send(ctx: ActionContext, action: BounceAction, sender: str,
          recipients: tuple[str, ...]) -> Outcome:
    job = ctx.job
    check_envelope_address(sender)
    relay = ctx.settings.bounce_relay
    headers = whole_header_lines(ctx.message_path, HEADER_LIMIT)
    dsn = build_dsn(job, action, recipients, headers)
    send_dsn(relay, sender, dsn, timeout=float(ctx.settings.smtp_timeout),
             helo_name=job.hostname)
    count = len(set(recipients))
    return Outcome(detail=f"bounced {count} recipient{'s' if count != 1 else ''} to "
                          f"<{sender}> ({status_for(action)}) via {relay}")


def _suppressed(reason: str, sender: str, why: str) -> Outcome:
    return Outcome(detail=f"not bounced: suppressed ({reason}: {why}) for <{sender}>",
                   suppressed=reason)


def _limit(reason: str, settings: Any) -> int:
    if reason == "sender-rate":
        return int(settings.bounce_rate_per_sender)
    return int(settings.bounce_rate_per_client)
