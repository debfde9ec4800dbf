"""The Bounce action's RFC 3464 DSN, composed without I/O (actions.bounce sends it).

A `multipart/report; report-type=delivery-status` with three parts -- the action's
`message` for people, a `message/delivery-status` with one block per matched
recipient, and the original message's header block as `text/rfc822-headers` -- of at
most MAX_DSN bytes, whatever the input.

Hostile input is expected here: the envelope addresses and the header block come
from the Internet.  Every header line written here is built from validated or
escaped text (no CR, LF or other control character can reach one); addresses that
cannot be written as they are become RFC 6533 `utf-8;` xtext in the report and
`undisclosed-recipients:;` in `To`; the attached headers are quoted-printable as soon
as they are not plain 7-bit text, so 8-bit junk, NULs and bare CRs cannot break the
MIME structure.
"""

from __future__ import annotations

import contextlib
import re
import textwrap
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from secrets import token_hex

from mxrules.rules import BounceAction
from mxrules.spool import Job
from mxrules.text import CONTROLS, controls_marked, one_line

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
MAX_ADDRESS = 900  # an address must fit on one header line with its field name
_WRAP = 76

# RFC 5322 atext, plus RFC 6532's UTF-8 (any non-ASCII character).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_QUOTED_STRING = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*"')
_DOMAIN_LITERAL = re.compile(r"\[[!-Z^-~]*\]")
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_REPLY = re.compile(r"[45][0-9][0-9]")
_HOST_JUNK = re.compile(r"[^A-Za-z0-9.\-_]")


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
    mxrules.headblock.whole_header_lines; `now` sets Date (default: the current time; naive
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
    host = hostname(job.hostname)
    status = status_for(action)
    reply = _reply_code(action, status)
    message = (action.message or "")[:MESSAGE_LIMIT]
    shown = rcpts[:listed]
    human_cte, human = _encode_text(_human_text(
        host, shown, len(rcpts) - len(shown), reply, status, message, headers_cut))
    report = _delivery_status(job, host, shown, reply, status, _report_text(message))
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
    diagnostic = _report_text((action.message or "")[:MESSAGE_LIMIT])
    used = 0
    for n, rcpt in enumerate(rcpts):
        line = len(_qp_line(f"    {controls_marked(rcpt)}".encode()))
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
    text = controls_marked(" ".join(message.split()))
    lines = [textwrap.fill(text, 72, break_long_words=False, break_on_hyphens=False), ""]
    which = "recipient" if len(rcpts) + omitted == 1 else "recipients"
    lines.append(f"Your message could not be delivered to the following {which}:")
    lines.append("")
    lines.extend(f"    {controls_marked(r)}" for r in rcpts)
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
    if not addr or CONTROLS.search(addr) or len(addr.encode("utf-8")) > MAX_ADDRESS:
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
    if addr and len(addr) <= MAX_ADDRESS and all(" " <= ch <= "~" for ch in addr):
        return f"rfc822; {addr}"
    escaped = ""
    for ch in addr:
        token = ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}"
        if len(escaped) + len(token) > MAX_ADDRESS:
            break  # a hostile address: cut, rather than a line no relay takes
        escaped += token
    return f"utf-8; {escaped}"


def _report_text(text: str) -> str:
    """Text for a report field: one line, ASCII, non-ASCII as `\\x{HEX}` escapes (RFC 6533's
    form, as the addresses in the report have it): the delivery-status part is 7-bit."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in one_line(text))


def hostname(name: str) -> str:
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
