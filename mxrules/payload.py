"""SES's receipt payloads, built from a spooled job (docs/ses-compatibility.md, "Payloads").

Pure functions, no boto3: the worker's actions call them and send the result.

    stored copy   = SES's prepended headers + AddHeaders run so far + raw message
    mail          = envelope + the stored copy's headers + commonHeaders
    receipt       = verdicts + the recipients one rule matched + the action
    notification  = {"notificationType": "Received", mail, receipt, content?}
    Lambda event  = {"Records": [{"eventSource": "aws:ses", ..., "ses": {mail, receipt}}]}

What follows SES exactly (its developer guide's examples, and notifications
captured from SES by its users):

- Key order: notification `notificationType, mail, receipt, content`;
  receipt `timestamp, processingTimeMillis, recipients, spam/virus/spf/dkim/
  dmarcVerdict, dmarcPolicy, action`; `topicArn` right after an action's `type`,
  present only when set.  S3 actions always carry `objectKeyPrefix`, as
  configured and `""` when there is none (SES sends it so; the guide's older
  example predates it), then `objectKey`: the prefix is a folder
  (`prefix/messageId`, a `/` added when the prefix has none).
- SNS `encoding` reads `UTF8` or `BASE64` (not the API's `UTF-8`/`Base64`).
  `content` is the stored copy: Base64 without line breaks, or the bytes decoded
  as UTF-8 with U+FFFD for what is not UTF-8 (SES warns that UTF-8 "may not
  preserve all special characters").
- The JSON SES publishes is compact (`{"a":1,"b":[2]}`), non-ASCII unescaped.
- `Received: from <helo> (<rdns> [<ip>]) by <host> with SMTP id <messageId>
  for <rcpt>; <date> (UTC)`, folded in the stored copy before `by`, `for` and the
  date.  SES writes `with SMTP` whether or not the client used STARTTLS.
- Header values in `mail.headers` are unfolded the way SES does it: each line
  break with the whitespace after it becomes one space.

Decided here where SES says nothing:

- `headersTruncated`: SES keeps whole headers, in order, while the sum of
  their names and values (UTF-8 bytes, values unfolded, no `: ` and no CRLF)
  stays within 10 240 bytes; the first header that would pass it and all after
  it are dropped.  A real SES notification (docs/ses-evidence.md) kept 50
  headers summing to 10 234 bytes that way; counting `: ` and CRLF too would
  have kept 45.  `commonHeaders` and `destination` still come from every header.
- RFC 2047 encoded words are decoded in the values of Subject, From, Sender,
  Reply-To, To, Cc and Bcc, in `mail.headers` and in `commonHeaders`; other
  headers are listed as written (docs/ses-evidence.md says what is settled).
- `commonHeaders` addresses are re-rendered one by one, as SES does:
  `Name <addr>` with the display name bare when it is only letters, digits,
  spaces and atext, quoted otherwise (`"Doe, John" <a@x>`), and `addr` alone
  when there is no name; an item that is not one address (a group, junk) is
  kept as written.  An address header with no address in it is left out, and
  `sender` is a string (the first Sender address), as SES sends it.  The first
  occurrence wins for the single-valued fields; `returnPath` is SES's own
  `Return-Path` without `<>`.
- `destination`: every address of every To and Cc header, in order, duplicates
  kept (SES: "a complete list of all recipient addresses").
- Header bytes that are not UTF-8 are read as Latin-1 (per header), so every
  value is real text that any JSON encoder can write.
- `Received: ... for` names the first envelope recipient only; `receipt.timestamp`
  is the reception time, as in every SES example (the delay is in
  `processingTimeMillis`).
- IPv6 client addresses are written `[IPv6:…]`, as RFC 5321 and Postfix do.
- `X-SES-RECEIPT` and `X-SES-DKIM-SIGNATURE` (SES signing its own receipt) are
  not produced: mxrules has no SES key to sign with.
- `Received-SPF` and `Authentication-Results` come from the scans, recorded in
  the job (`Job.auth_headers`, formatted, in order), and sit after the verdict
  headers, as in SES.
- Size: every payload must fit SNS's 256 KB (a published message) and Lambda's
  256 KB (an Event payload), whatever the message holds -- 10,000 Cc addresses
  made a 468 KB notification.  SES documents no cap but `headersTruncated`, so
  the fields built from the message's own headers are capped here, counted in
  bytes of their JSON (escapes included), whole items only, in order:
  `destination` 10 KB (DESTINATION_LIMIT), each `commonHeaders` address list
  2 KB (ADDRESS_LIST_LIMIT), each `commonHeaders` text 1 KB (TEXT_LIMIT, cut at
  a character).  A payload still over its limit (thousands of tiny headers, an
  SNS `content` near 150 KB in Base64) drops `mail.headers` from the end, as
  SES's own truncation does, with `headersTruncated: true` (`fitted_json`).
  The whole headers are always in the stored copy.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header
from email.utils import format_datetime, getaddresses
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import actionspec, verdicts
from .actionspec import s3_key, sns_encoding
from .authres import verdict_headers
from .errors import MxrulesError
from .headblock import HEADER_BLOCK_LIMIT, header_lines
from .ids import new_message_id
from .matching import bare
from .rules import Action, S3Action, SNSAction
from .spool import Client, Job, MatchedRule, ses_timestamp
from .text import without_line_breaks

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

SUBJECT = "Amazon SES Email Receipt Notification"
HEADERS_LIMIT = 10 * 1024  # SES: headers are truncated "if larger than 10 KB"
# Headers whose values SES shows with RFC 2047 encoded words decoded.
_DECODED = frozenset({"subject", "from", "sender", "reply-to", "to", "cc", "bcc"})
_ATEXT = frozenset("!#$%&'*+-/=?^_`{|}~ ")
# SNS's limit on a published message and Lambda's on an Event payload, in UTF-8 bytes.
NOTIFICATION_LIMIT = 256 * 1024
# Caps on the fields built from the message's own headers, in bytes of their JSON.
DESTINATION_LIMIT = 10 * 1024
ADDRESS_LIST_LIMIT = 2 * 1024
TEXT_LIMIT = 1024

Header = tuple[str, str]

_LIST_HEADERS = MappingProxyType(
    {"from": "from", "reply-to": "replyTo", "to": "to", "cc": "cc", "bcc": "bcc"})
_TEXT_HEADERS = MappingProxyType(
    {"date": "date", "message-id": "messageId", "subject": "subject"})
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
# SES's order, as far as captured notifications show it (from, replyTo, date, to,
# messageId, subject); sender, cc and bcc are placed where they read naturally.
_COMMON_ORDER = ("returnPath", "from", "sender", "replyTo", "date", "to", "cc", "bcc",
                 "messageId", "subject")


# -- the message's own headers -------------------------------------------------


def parse_headers(block: bytes) -> list[Header]:
    """Unfolded `(name, value)` pairs in order; junk lines are skipped, never raised on.

    A line without a colon, or whose name is not printable ASCII, is dropped
    together with its continuation lines.  Parsing stops at the first empty line.
    """
    out: list[Header] = []
    name: str | None = None
    parts: list[bytes] = []
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()  # the split's empty tail, not an empty line
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                parts.append(b" " + line.lstrip(b" \t"))
            continue
        if name is not None:
            out.append((name, _text(b"".join(parts))))
            name = None
        if not line:
            break  # the empty line: the body starts
        colon = line.find(b":")
        field = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if _FIELD_NAME.fullmatch(field):
            name, parts = field.decode("ascii"), [line[colon + 1:]]
    if name is not None:
        out.append((name, _text(b"".join(parts))))
    return out


def _text(value: bytes) -> str:
    value = value.strip(b" \t")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


# -- what SES prepends ---------------------------------------------------------


def ses_prepended_headers(job: Job) -> list[Header]:
    """SES's own headers on the stored copy, unfolded, in SES's order.

    docs/ses-compatibility.md, "The stored copy".
    """
    return [(name, value) for name, value, _wire in _ses_fields(job)]


def _ses_fields(job: Job) -> list[tuple[str, str, str]]:
    """(name, unfolded value, value as written in the stored copy)."""
    received = [without_line_breaks(part) for part in _received_parts(job)]
    path = without_line_breaks(f"<{job.mail_from}>")
    fields = [
        ("Return-Path", path, path),
        ("Received", " ".join(received), "\r\n ".join(received)),
    ]
    scanned = verdict_headers({key: _status(job, key) for key in verdicts.SCANNED})
    fields.extend((name, status, status) for name, status in scanned)
    # The scanners' Received-SPF and Authentication-Results travel with the job.
    extra = job.auth_headers
    fields.extend((name, without_line_breaks(value), without_line_breaks(value))
                  for name, value in extra)
    return fields


def _received_parts(job: Job) -> list[str]:
    client = job.client
    rdns = client.hostname or "unknown"
    parts = [f"from {client.helo or rdns} ({rdns} [{_address_literal(client.address)}])",
             f"by {job.hostname} with SMTP id {job.message_id}"]
    if job.recipients:
        parts.append(f"for {job.recipients[0]};")
    else:
        parts[-1] += ";"
    parts.append(_rfc5322_date(job.received_at) + " (UTC)")
    return parts


def _address_literal(address: str) -> str:
    try:
        return f"IPv6:{address}" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def _rfc5322_date(ses_time: str) -> str:
    """`2026-01-01T00:00:00.000Z` -> `Thu, 01 Jan 2026 00:00:00 +0000`."""
    return format_datetime(datetime.fromisoformat(ses_time).astimezone(UTC))


def stored_copy_prefix(job: Job, added_headers: Iterable[Header] = ()) -> bytes:
    """The bytes before the raw message in every stored copy (S3 object, SNS content)."""
    fields = [(name, wire) for name, _value, wire in _ses_fields(job)]
    fields.extend((name, without_line_breaks(value)) for name, value in added_headers)
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("utf-8")


def prefix_floor(mail_from: str, client: Client, hostname: str, first_recipient: str) -> int:
    """The fewest bytes SES's prepended headers take on a message of this envelope.

    Exact but for what only the end of data knows: verdict and authentication
    headers (and AddHeaders), which only add.  A messageId and a timestamp have
    one length, whatever their value.  For size checks before the message is stored.
    """
    job = Job(message_id=new_message_id(), queue_id="", received_at=ses_timestamp(),
              rule_set="", mail_from=mail_from,
              recipients=(first_recipient,) if first_recipient else (), client=client,
              rules=(), in_stream_headers=(), hostname=hostname, message_size=0,
              message_sha256="")
    return len(stored_copy_prefix(job))


def stored_copy_headers(job: Job, message_path: str, added_headers: Iterable[Header] = (), *,
                        limit: int = HEADER_BLOCK_LIMIT) -> tuple[list[Header], bool]:
    """The stored copy's headers for `mail_object`, and whether reading them was capped."""
    block, capped = header_lines(message_path, limit)
    headers = ses_prepended_headers(job)
    headers.extend((name, without_line_breaks(value)) for name, value in added_headers)
    headers.extend(parse_headers(block))
    return headers, capped


class StoredCopy(io.RawIOBase):
    """Prefix + message file as one read-only, seekable stream, for boto3 bodies.

    The message is read from disk as the consumer asks for it, so a 40 MB message
    costs no more memory than a small one; seek/tell let botocore rewind on retry.
    """

    def __init__(self, job: Job, message_path: str,
                 added_headers: Iterable[Header] = ()) -> None:
        super().__init__()
        self.prefix = stored_copy_prefix(job, added_headers)
        self.message_path = message_path
        self.size = len(self.prefix) + os.stat(message_path).st_size
        self._pos = 0
        self._fh: io.BufferedReader | None = None

    def __len__(self) -> int:
        return self.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence!r}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        done = 0
        head = len(self.prefix)
        if self._pos < head and view.nbytes:
            chunk = self.prefix[self._pos:self._pos + view.nbytes]
            view[:len(chunk)] = chunk
            done = len(chunk)
            self._pos += done
        wanted = min(view.nbytes - done, self.size - self._pos)
        if wanted > 0:
            fh = self._file()
            fh.seek(self._pos - head)
            got = fh.readinto(view[done:done + wanted])
            done += got
            self._pos += got
        return done

    def read_all(self) -> bytes:
        """The whole stored copy in memory: for small uses (SNS content ≤ 150 KB)."""
        with open(self.message_path, "rb") as fh:
            return self.prefix + fh.read(self.size - len(self.prefix))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()

    def _file(self) -> io.BufferedReader:
        if self._fh is None:
            self._fh = open(self.message_path, "rb")  # noqa: SIM115 - closed by close()
        return self._fh

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed StoredCopy")


# -- mail ----------------------------------------------------------------------


def mail_object(job: Job, headers: Sequence[Header], *, truncated: bool) -> dict[str, Any]:
    """SES's `mail`; `headers` is the whole stored copy's, `truncated` if reading was capped."""
    kept, cut = _first_10kb(decoded_headers(headers))
    return {
        "timestamp": job.received_at,
        "source": job.mail_from,
        "messageId": job.message_id,
        "destination": cap_list(destination(headers, DESTINATION_LIMIT), DESTINATION_LIMIT),
        "headersTruncated": truncated or cut,
        "headers": [{"name": name, "value": value} for name, value in kept],
        "commonHeaders": {key: cap_list(value, ADDRESS_LIST_LIMIT) if isinstance(value, list)
                          else cap_text(value, TEXT_LIMIT)
                          for key, value in common_headers(headers).items()},
    }


def json_size(value: Any) -> int:
    """Bytes `value` takes in SES's JSON (escapes included)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def cap_list(items: list[str], limit: int) -> list[str]:
    """The first items, whole, while their JSON array stays within `limit` bytes."""
    size = 2  # []
    for count, item in enumerate(items):
        size += json_size(item) + (1 if count else 0)  # the comma
        if size > limit:
            return items[:count]
    return items


def cap_text(value: str, limit: int) -> str:
    """`value`, cut at a character so that its JSON string stays within `limit` bytes."""
    if json_size(value) <= limit:
        return value
    low, high = 0, len(value)  # value[:low] fits, value[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if json_size(value[:middle]) <= limit:
            low = middle
        else:
            high = middle
    return value[:low]


def _first_10kb(headers: Sequence[Header]) -> tuple[Sequence[Header], bool]:
    # SES counts names and values only: no ": ", no CRLF (docs/ses-evidence.md).
    total = 0
    for count, (name, value) in enumerate(headers):
        total += len(name.encode("utf-8")) + len(value.encode("utf-8", "surrogatepass"))
        if total > HEADERS_LIMIT:
            return headers[:count], True
    return headers, False


def decoded_headers(headers: Sequence[Header]) -> list[Header]:
    """`mail.headers` values: encoded words decoded in the headers SES decodes."""
    return [(name, decode_words(value) if name.lower() in _DECODED else value)
            for name, value in headers]


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; the value as written if they cannot be.

    Bytes that are not valid in the named charset become U+FFFD; a charset
    Python does not know leaves the whole value as written.
    """
    if "=?" not in value:
        return value
    try:
        parts = decode_header(value)
        return "".join(_part(chunk, charset) for chunk, charset in parts)
    except (LookupError, ValueError, HeaderParseError):
        return value


def _part(chunk: bytes | str, charset: str | None) -> str:
    if isinstance(chunk, str):
        return chunk
    if charset is None or charset == "unknown-8bit":
        # decode_header gives the text between encoded words back as bytes of the str
        return chunk.decode("raw-unicode-escape")
    return chunk.decode(charset.partition("*")[0], errors="replace")


def destination(headers: Sequence[Header], limit: int | None = None) -> list[str]:
    """Every address in the To and Cc headers, in order (SES's `mail.destination`).

    With `limit`, headers stop being parsed once the addresses found take more
    than `limit` bytes of JSON: cap_list would drop the rest anyway, and 10,000
    addresses cost a second of parsing.
    """
    found: list[str] = []
    size = 2
    for name, value in headers:
        if name.lower() in ("to", "cc"):
            addresses = [addr for _name, addr in _addresses(value) if addr]
            found.extend(addresses)
            if limit is not None:
                size += sum(json_size(addr) + 1 for addr in addresses)
                if size > limit:
                    break
    return found


def _addresses(value: str) -> list[tuple[str, str]]:
    # One header at a time: getaddresses' strict mode rejects a whole batch for one bad value.
    try:
        return getaddresses([value])
    except Exception:  # hostile headers must not stop a delivery
        return []


def common_headers(headers: Sequence[Header]) -> dict[str, Any]:
    """SES's `commonHeaders`: only the fields whose header is present and not empty."""
    found: dict[str, Any] = {}
    for name, value in headers:
        key = name.lower()
        if key == "return-path":
            found.setdefault("returnPath", bare(value))
        elif key in _LIST_HEADERS:
            items = [render_address(item) for item in split_addresses(value)]
            if items:
                found.setdefault(_LIST_HEADERS[key], []).extend(items)
        elif key == "sender":
            items = [render_address(item) for item in split_addresses(value)]
            if items:
                found.setdefault("sender", items[0])
        elif key in _TEXT_HEADERS:
            found.setdefault(_TEXT_HEADERS[key], decode_words(value))
    return {key: found[key] for key in _COMMON_ORDER if key in found}


def render_address(item: str) -> str:
    """One address as SES writes it in `commonHeaders`: `Name <addr>`, or `addr`.

    An item that does not parse as exactly one address is kept as written
    (encoded words decoded).
    """
    pairs = _addresses(item)
    if len(pairs) != 1 or not pairs[0][1] or _is_group(item):
        return decode_words(item)
    name, addr = pairs[0]
    name = decode_words(name).strip()
    if not name:
        return addr
    return f"{_phrase(name)} <{addr}>"


def _is_group(item: str) -> bool:
    """`Team: a@x;`: a colon before any quote or angle bracket starts a group."""
    head = item.split("<", 1)[0].split('"', 1)[0]
    return ":" in head


def _phrase(name: str) -> str:
    """A display name bare when it is letters, digits, spaces and atext; quoted otherwise."""
    if all(ch.isalnum() or ch in _ATEXT for ch in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_addresses(value: str) -> list[str]:
    """An address-list header split at top-level commas, each item as written.

    Quotes, comments and angle brackets protect their commas; a group
    (`name: a, b;`) stays one item, as SES's parser keeps it.
    """
    items: list[str] = []
    start = 0
    quoted = escaped = group = False
    depth = angle = 0
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif ch == "<":
            angle += 1
        elif ch == ">" and angle:
            angle -= 1
        elif angle:
            continue
        elif ch == ":":
            group = True
        elif ch == ";" and group:
            group = False
        elif ch == "," and not group:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:])
    return [item.strip() for item in items if item.strip()]


# -- receipt -------------------------------------------------------------------


def receipt_object(job: Job, matched: MatchedRule, action: Action, *,
                   processing_ms: int) -> dict[str, Any]:
    """SES's `receipt` for one action of one matched rule."""
    receipt: dict[str, Any] = {
        "timestamp": job.received_at,
        "processingTimeMillis": int(processing_ms),
        "recipients": list(matched.recipients),
    }
    for key in verdicts.VERDICTS:
        receipt[verdicts.payload_field(key)] = {"status": _status(job, key)}
    policy = job.verdicts.get("dmarc_policy")
    if policy and _status(job, verdicts.DMARC) == "FAIL":
        receipt["dmarcPolicy"] = policy
    receipt["action"] = action_object(job, action)
    return receipt


def _status(job: Job, key: str) -> str:
    return (job.verdicts.get(key) or verdicts.DISABLED).upper()


def action_object(job: Job, action: Action) -> dict[str, Any]:
    """`receipt.action`, with SES's field names and order for each type (actionspec)."""
    out: dict[str, Any] = {"type": action.TYPE}
    if action.topic_arn:
        out["topicArn"] = action.topic_arn
    return out | actionspec.spec_for(action).payload(action, job.message_id)


def object_key(job: Job, action: S3Action) -> str:
    """SES's S3 key: the prefix is a folder, so `prefix/messageId`.

    A `/` is added when the prefix does not end with one; with no prefix the key is
    the messageId alone.  Lambda events carry no objectKey, so handlers build
    `prefix + "/" + messageId` themselves: the key must be exactly that.
    """
    return s3_key(action.object_key_prefix, job.message_id)


# -- whole payloads ------------------------------------------------------------


def notification(job: Job, matched: MatchedRule, action: Action, *,
                 headers: Sequence[Header], truncated: bool, processing_ms: int,
                 content: bytes | None = None, encoding: str | None = None) -> dict[str, Any]:
    """An SNS notification; `content` (the stored copy's bytes) for SNS actions only."""
    body: dict[str, Any] = {
        "notificationType": "Received",
        "mail": mail_object(job, headers, truncated=truncated),
        "receipt": receipt_object(job, matched, action, processing_ms=processing_ms),
    }
    if content is not None:
        if not isinstance(action, SNSAction):
            raise ValueError(f"only an SNS action carries content, not {action.TYPE}")
        body["content"] = encode_content(content, encoding or action.encoding)
    return body


def encode_content(content: bytes, encoding: str) -> str:
    """`content` as SES writes it: Base64 on one line, or UTF-8 with U+FFFD for junk."""
    if sns_encoding(encoding) == "BASE64":
        return base64.b64encode(content).decode("ascii")
    return content.decode("utf-8", errors="replace")


def notification_json(job: Job, matched: MatchedRule, action: Action, *,
                      headers: Sequence[Header], truncated: bool, processing_ms: int,
                      content: bytes | None = None, encoding: str | None = None,
                      limit: int = NOTIFICATION_LIMIT) -> str:
    """The SNS message exactly as SES serialises it (compact, non-ASCII as is), fitted
    within `limit` bytes; PayloadTooLarge if it cannot be."""
    body = notification(job, matched, action, headers=headers, truncated=truncated,
                        processing_ms=processing_ms, content=content, encoding=encoding)
    return fitted_json(body, body["mail"], limit)


def lambda_event(job: Job, matched: MatchedRule, action: Action, *,
                 headers: Sequence[Header], truncated: bool,
                 processing_ms: int) -> dict[str, Any]:
    """The Lambda action's event: SES's `mail` and `receipt`, never the body."""
    return {"Records": [{
        "eventSource": "aws:ses",
        "eventVersion": "1.0",
        "ses": {
            "mail": mail_object(job, headers, truncated=truncated),
            "receipt": receipt_object(job, matched, action, processing_ms=processing_ms),
        },
    }]}


def lambda_event_json(job: Job, matched: MatchedRule, action: Action, *,
                      headers: Sequence[Header], truncated: bool, processing_ms: int,
                      limit: int = NOTIFICATION_LIMIT) -> str:
    """The Lambda event as JSON, fitted within `limit` bytes (see fitted_json)."""
    event = lambda_event(job, matched, action, headers=headers, truncated=truncated,
                         processing_ms=processing_ms)
    return fitted_json(event, event["Records"][0]["ses"]["mail"], limit)


class PayloadTooLarge(MxrulesError, ValueError):  # ValueError: what it was before
    """A payload over its limit even without `mail.headers`: no cap can make it fit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, over the limit of {limit} even without mail.headers")
        self.size = size
        self.limit = limit


def fitted_json(payload: dict[str, Any], mail: dict[str, Any], limit: int) -> str:
    """`payload` as SES's JSON within `limit` bytes (UTF-8).

    Over the limit, `mail.headers` (part of `payload`) loses headers from the end
    until it fits and `headersTruncated` is true: SES's own truncation, taken
    further.  Only the other fields left over the limit raise PayloadTooLarge.
    """
    text = to_json(payload)
    excess = len(text.encode("utf-8")) - limit
    if excess <= 0:
        return text
    headers = mail["headers"]
    while headers and excess > 0:
        excess -= json_size(headers.pop()) + 1  # the header and its comma
    mail["headersTruncated"] = True
    text = to_json(payload)
    size = len(text.encode("utf-8"))
    if size > limit:
        raise PayloadTooLarge(size, limit)
    return text


def to_json(payload: dict[str, Any]) -> str:
    """SES's serialisation: no spaces after separators, non-ASCII unescaped."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
