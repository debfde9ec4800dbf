"""Bounce: tell the envelope sender, in an RFC 3464 DSN, that a message failed.

SES's Bounce action, for a message Postfix has already accepted (the SMTP reply
cannot change any more, exactly as in SES): a `multipart/report;
report-type=delivery-status` from the action's `sender` to the job's envelope
sender, with three parts -- the action's `message` for people, a
`message/delivery-status` with one block per matched recipient, and the
original message's header block as `text/rfc822-headers` -- of at most
MAX_DSN bytes.  It is sent only to an authenticated sender and within rate
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
come from the Internet.  Every header line this module writes is built from
validated or escaped text (no CR, LF or other control character can reach
one); addresses that cannot be written as they are become RFC 6533
`utf-8;` xtext in the report and `undisclosed-recipients:;` in `To`; the
attached headers are quoted-printable as soon as they are not plain 7-bit
text, so 8-bit junk, NULs and bare CRs cannot break the MIME structure.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import textwrap
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from secrets import token_hex
from typing import Any, NoReturn

from mxrules.errors import MxrulesError
from mxrules.rules import BounceAction
from mxrules.spool import Job

from .base import ActionContext, Outcome, PermanentActionError
from .bounce_limit import authenticated_by

# Postfix's header_size_limit is 102400: a header block bigger than that was
# already cut by Postfix, so more would only make the DSN heavier.
HEADER_LIMIT = 100 * 1024
_READ_CHUNK = 8192

# A DSN is never larger than this.  The recipients listed (in the human part
# and the report) and the attached headers each have a budget; the rest (the
# action's message, at most MESSAGE_LIMIT characters, and the MIME frame) fits
# in what is left even when every character of it has to be escaped.
MAX_DSN = 64 * 1024
RECIPIENTS_BUDGET = 24 * 1024
HEADERS_BUDGET = 16 * 1024
MESSAGE_LIMIT = 2048  # the schema's limit for a Bounce message

SUBJECT = "Delivery Status Notification (Failure)"
CRLF = "\r\n"
_MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
_MAX_ADDRESS = 900  # an address must fit on one header line with its field name
_WRAP = 76

# RFC 5322 atext, plus RFC 6532's UTF-8 (any non-ASCII character).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_QUOTED_STRING = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*"')
_DOMAIN_LITERAL = re.compile(r"\[[!-Z^-~]*\]")
# C0, DEL, C1 and lone surrogates (what surrogateescape makes of undecodable bytes).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_REPLY = re.compile(r"[45][0-9][0-9]")
_HOST_JUNK = re.compile(r"[^A-Za-z0-9.\-_]")
_HEADER_END = re.compile(rb"(?:\A|\n)(\r?\n)")


class RelayError(MxrulesError):
    """A transient failure to hand the DSN to the relay; the runner retries it."""


# -- the DSN -----------------------------------------------------------------------


def build_dsn(
    job: Job,
    action: BounceAction,
    recipients: Iterable[str],
    original_headers: bytes,
    *,
    now: datetime | None = None,
) -> bytes:
    """The complete DSN (headers and body, CRLF line ends), ready for DATA.

    `recipients` are the rule's matched recipients (one report block each,
    repeats collapsed); `original_headers` is the header block as read by
    read_header_block; `now` sets Date (default: the current time; naive
    means UTC).

    At most MAX_DSN bytes, whatever the input: the recipients are listed
    while they fit in RECIPIENTS_BUDGET (always at least one) and whole
    header fields are attached while they fit in HEADERS_BUDGET; the human
    part says when either was cut.  (900 recipients and 40 KB of headers
    would otherwise make a DSN of over 200 KB, most of it the client's text.)

    Pure: no I/O, so every hostile case can be tested without a socket.  The
    result is 7-bit unless `action.sender` or `job.mail_from` is non-ASCII, in
    which case the From/To lines carry UTF-8 (RFC 6532) and send_dsn asks the
    relay for SMTPUTF8.
    """
    rcpts = list(dict.fromkeys(recipients))
    listed = _fitting_recipients(job, action, rcpts)
    headers, headers_cut = _cut_headers(_crlf(original_headers), HEADERS_BUDGET)
    dsn = _assemble(job, action, rcpts, listed, headers, headers_cut, now)
    # The budgets leave room for everything else; should a pathological action
    # message still push the DSN over, the attached headers go, then recipients.
    while len(dsn) > MAX_DSN and (headers or listed > 1):
        if headers:
            headers, headers_cut = b"", True
        else:
            listed = max(1, listed // 2)
        dsn = _assemble(job, action, rcpts, listed, headers, headers_cut, now)
    return dsn


def _assemble(job: Job, action: BounceAction, rcpts: list[str], listed: int, headers: bytes,
              headers_cut: bool, now: datetime | None) -> bytes:
    """The DSN listing the first `listed` of `rcpts` and attaching `headers`."""
    host = _hostname(job.hostname)
    status = status_for(action)
    reply = _reply_code(action, status)
    message = (action.message or "")[:MESSAGE_LIMIT]
    shown = rcpts[:listed]
    human_cte, human = _encode_text(_human_text(
        host, shown, len(rcpts) - len(shown), reply, status, message, headers_cut))
    report = _delivery_status(job, host, shown, reply, status, _one_line(message))
    attached_cte, attached = _encode_text(headers)
    charset = "us-ascii" if human_cte == "7bit" else "utf-8"
    parts = [
        ([f"Content-Type: text/plain; charset={charset}",
          f"Content-Transfer-Encoding: {human_cte}",
          "Content-Description: Notification"], human),
        (["Content-Type: message/delivery-status",
          "Content-Description: Delivery report"], report),
        (["Content-Type: text/rfc822-headers",
          f"Content-Transfer-Encoding: {attached_cte}",
          "Content-Description: Undelivered message headers"], attached),
    ]
    boundary = _boundary(body for _, body in parts)

    sender = _header_address(action.sender or "") or f"MAILER-DAEMON@{host}"
    to = _header_address(job.mail_from) or "undisclosed-recipients:;"
    when = now or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    head = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {SUBJECT}",
        f"Date: {format_datetime(when)}",
        f"Message-ID: <{_safe_token(job.message_id)}.{token_hex(8)}.dsn@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    out = [(CRLF.join(head) + CRLF + CRLF).encode("utf-8"),
           b"This is a delivery status notification in MIME format.\r\n"]
    for part_head, body in parts:
        out.append(f"\r\n--{boundary}\r\n".encode("ascii"))
        out.append((CRLF.join(part_head) + CRLF + CRLF).encode("ascii"))
        out.append(body)
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _reply_code(action: BounceAction, status: str) -> str:
    reply = action.smtp_reply_code or ""
    if not _REPLY.fullmatch(reply):  # the schema forbids this; a hand-made job may not
        reply = "451" if status.startswith("4") else "554"
    return reply


def _fitting_recipients(job: Job, action: BounceAction, rcpts: list[str]) -> int:
    """How many of `rcpts` fit in RECIPIENTS_BUDGET, counting both places each is listed.

    A line's cost is its quoted-printable size, which is never less than its
    7bit size, so the count holds whichever encoding the human part gets.
    """
    status = status_for(action)
    reply = _reply_code(action, status)
    diagnostic = _one_line((action.message or "")[:MESSAGE_LIMIT])
    used = 0
    for n, rcpt in enumerate(rcpts):
        line = len(_qp_line(f"    {_printable(rcpt)}".encode()))
        block = len(_recipient_block(rcpt, reply, status, diagnostic)) + 4
        used += line + block
        if n and used > RECIPIENTS_BUDGET:
            return n
    return len(rcpts)


def _cut_headers(block: bytes, budget: int) -> tuple[bytes, bool]:
    """The leading whole header fields of `block` that fit in `budget` bytes, encoded.

    Each line is counted at its quoted-printable size (never less than as
    7bit).  A field is kept whole or not at all, so no half field (a folded
    line without its start) is attached.  The second value: something was cut.
    """
    lines = block.split(b"\r\n")[:-1] if block else []
    used = 0
    field_start = 0
    for i, line in enumerate(lines):
        if line[:1] not in (b" ", b"\t"):
            field_start = i
        used += len(_qp_line(line))
        if used > budget:
            return b"".join(kept + b"\r\n" for kept in lines[:field_start]), True
    return block, False


def status_for(action: BounceAction) -> str:
    """The enhanced status code: the action's, or one derived from its reply code.

    SES lets status_code be omitted; RFC 3464 requires a Status field, so the
    class follows the reply code (5xx -> 5.0.0, 4xx -> 4.0.0), as Postfix does.
    """
    given = action.status_code or ""
    if _STATUS.fullmatch(given):
        return given
    return "4.0.0" if (action.smtp_reply_code or "").startswith("4") else "5.0.0"


def _human_text(host: str, rcpts: list[str], omitted: int, reply: str, status: str,
                message: str, headers_cut: bool) -> bytes:
    text = _printable(" ".join(message.split()))
    lines = [textwrap.fill(text, 72, break_long_words=False, break_on_hyphens=False), ""]
    which = "recipient" if len(rcpts) + omitted == 1 else "recipients"
    lines.append(f"Your message could not be delivered to the following {which}:")
    lines.append("")
    lines.extend(f"    {_printable(r)}" for r in rcpts)
    if omitted:
        lines.append(f"    ... and {omitted} more: the list was cut to keep this report small")
    lines.append("")
    lines.append(f"Reported by {host} ({reply} {status}). The delivery report and the")
    if headers_cut:
        lines.append("headers of your message are attached; the headers were cut to keep")
        lines.append("this report small.")
    else:
        lines.append("headers of your message are attached.")
    return ("\r\n".join(lines).lstrip("\r\n") + "\r\n").encode("utf-8")


def _delivery_status(job: Job, host: str, rcpts: list[str], reply: str, status: str,
                     message: str) -> bytes:
    """The message/delivery-status body: per-message fields, then one block per recipient."""
    fields = [f"Reporting-MTA: dns; {host}"]
    arrival = _arrival_date(job.received_at)
    if arrival:
        fields.append(f"Arrival-Date: {arrival}")
    blocks = [CRLF.join(fields)]
    blocks.extend(_recipient_block(rcpt, reply, status, message) for rcpt in rcpts)
    return (CRLF + CRLF).join(blocks).encode("ascii") + b"\r\n"


def _recipient_block(rcpt: str, reply: str, status: str, message: str) -> str:
    diagnostic = " ".join(p for p in (reply, status, message) if p)
    return CRLF.join([
        f"Final-Recipient: {_report_address(rcpt)}",
        "Action: failed",
        f"Status: {status}",
        _fold("Diagnostic-Code", f"smtp; {diagnostic}"),
    ])


def _arrival_date(received_at: str) -> str:
    """RFC 5322 date of the SES timestamp, or "" if it cannot be read (the field is optional)."""
    try:
        when = datetime.fromisoformat(received_at)
    except (TypeError, ValueError):
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return format_datetime(when.astimezone(UTC))


# -- addresses and text ------------------------------------------------------------


def _header_address(addr: str) -> str | None:
    """`addr` as an RFC 5322 addr-spec for From/To, or None if it cannot be one.

    Postfix hands the milter addresses in their external form, so a quoted
    local part arrives already quoted and is kept; an unquoted one that is not
    a dot-atom (a space, a comma) is quoted here.  Control characters, a
    missing domain or a domain that is not a dot-atom or literal: None, and
    the caller writes something safe instead.
    """
    if not addr or _CONTROL.search(addr) or len(addr.encode("utf-8")) > _MAX_ADDRESS:
        return None
    local, at, domain = addr.rpartition("@")
    if not at or not local:
        return None
    if not (_DOT_ATOM.fullmatch(domain) or _DOMAIN_LITERAL.fullmatch(domain)):
        return None
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}"


def _report_address(addr: str) -> str:
    """A Final-Recipient value: `rfc822; addr`, or RFC 6533 `utf-8; xtext` for the rest.

    rfc822 addresses are ASCII; anything else (UTF-8, control characters) is
    written as utf-8-addr-xtext, whose `\\x{HEX}` escapes keep the field 7-bit
    and on one line whatever the address holds.
    """
    if addr and len(addr) <= _MAX_ADDRESS and all(" " <= ch <= "~" for ch in addr):
        return f"rfc822; {addr}"
    escaped = ""
    for ch in addr:
        token = ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}"
        if len(escaped) + len(token) > _MAX_ADDRESS:
            break  # a hostile address: cut, rather than a line no relay takes
        escaped += token
    return f"utf-8; {escaped}"


def _one_line(text: str) -> str:
    """Text for a report field: one line, ASCII, non-ASCII as `\\x{HEX}` escapes."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in text)


def _printable(text: str) -> str:
    """Text for the human part: control characters shown as `?`, UTF-8 kept."""
    return _CONTROL.sub("?", text)


def _hostname(name: str) -> str:
    """A name fit for Reporting-MTA, Message-ID and EHLO, whatever the config held."""
    if not name.isascii():
        with contextlib.suppress(UnicodeError):  # not IDNA-able: the filter below cleans it
            name = name.encode("idna").decode("ascii")
    name = _HOST_JUNK.sub("", name)[:253].strip(".")
    return name or "localhost"


def _safe_token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)[:64] or "bounce"


def _fold(name: str, value: str) -> str:
    """`name: value` folded at spaces so no line exceeds 78 characters where possible.

    A single word too long for one line (998 octets) is cut; unfolding then
    shows a space inside it, which beats a line the relay would reject.
    """
    words: list[str] = []
    for word in value.split(" "):
        words.extend(word[i:i + _MAX_LINE - 2] for i in range(0, len(word), _MAX_LINE - 2))
    lines = [f"{name}:"]
    for n, word in enumerate(words):
        if n and len(lines[-1]) + 1 + len(word) > 78:
            lines.append("")
        lines[-1] += " " + word
    return CRLF.join(lines)


# -- MIME encoding -----------------------------------------------------------------


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF, the last line ended too (bare CRs are left as data)."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def _encode_text(data: bytes) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) for CRLF text: 7bit when safe, else quoted-printable.

    Quoted-printable, not base64, so that the attached headers stay readable;
    it also takes care of bare CRs, NULs and over-long lines, none of which
    7bit allows.
    """
    lines = data.split(b"\r\n")[:-1] if data else []
    plain = all(
        len(line) <= _MAX_LINE and all(b == 9 or 32 <= b <= 126 for b in line)
        for line in lines
    )
    if plain:
        return "7bit", data
    return "quoted-printable", b"".join(_qp_line(line) for line in lines)


def _qp_line(line: bytes) -> bytes:
    """One line as quoted-printable (RFC 2045 §6.7), soft-broken at 76 characters."""
    out: list[str] = []
    cur = ""
    last = len(line) - 1
    for i, byte in enumerate(line):
        literal = (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and i != last)
        token = chr(byte) if literal else f"={byte:02X}"
        if len(cur) + len(token) > _WRAP - 1:
            out.append(cur + "=")
            cur = ""
        cur += token
    out.append(cur)
    return ("\r\n".join(out) + "\r\n").encode("ascii")


def _boundary(bodies: Iterable[bytes]) -> str:
    """A boundary that occurs in no part (the attached headers come from the sender)."""
    joined = b"\n".join(bodies)
    while True:
        boundary = f"mxrules-dsn-{token_hex(16)}"
        if boundary.encode("ascii") not in joined:
            return boundary


# -- reading the original headers ----------------------------------------------------


def read_header_block(path: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header block of the message at `path`: up to (not including) the empty line.

    Reads in small unbuffered chunks and stops at the empty line, so a 40 MB
    body is never read for a few KB of headers.  A block larger than `limit`
    is cut at the last whole line within it.
    """
    buf = bytearray()
    with open(path, "rb", buffering=0) as fh:
        while len(buf) < limit + 2:  # +2: an empty line right at the limit still counts
            chunk = fh.read(_READ_CHUNK)
            if not chunk:
                break
            buf += chunk
            found = _HEADER_END.search(buf)
            if found and found.start(1) <= limit:
                return bytes(buf[:found.start(1)])
    head = bytes(buf[:limit])
    if len(buf) > limit and b"\n" in head:
        head = head[:head.rindex(b"\n") + 1]
    return head


# -- sending -----------------------------------------------------------------------


def parse_relay(relay: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `host` or `[v6]` -> (host, port); port 25 by default."""
    text = relay.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"bounce relay {relay!r} is not host:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 25)
    if not 0 < port < 65536:
        raise ValueError(f"bounce relay {relay!r}: port out of range")
    return host, port


def check_envelope_address(addr: str) -> None:
    """Refuse an address that cannot go into `RCPT TO:<...>` as it is.

    A control character (CR, LF, NUL...) would end the SMTP command or corrupt
    it; Postfix never hands one over, so seeing one means a damaged or forged
    job, and no retry changes the address: PermanentActionError.
    """
    if not addr:
        raise ValueError("a DSN is never sent to the null sender <>")
    if _CONTROL.search(addr) or len(addr.encode("utf-8")) > _MAX_ADDRESS:
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
        smtp = smtplib.SMTP(host, port, local_hostname=_hostname(helo_name), timeout=timeout)
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
    return " ".join(_CONTROL.sub(" ", reply).split())


# -- the action ----------------------------------------------------------------------


def run(ctx: ActionContext) -> Outcome:
    """Bounce the job's matched recipients to its envelope sender, unless suppressed.

    A bounce to an unauthenticated sender, or over a rate limit, sends
    nothing: the Outcome says why (`suppressed`), and the runner logs and
    counts it.  See actions.bounce_limit.
    """
    action = ctx.action
    if not isinstance(action, BounceAction):
        raise TypeError(f"bounce.run got a {type(action).__name__}")
    return bounce(ctx, action)


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
    headers = read_header_block(ctx.message_path)
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
