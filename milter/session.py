"""One SMTP connection as the milter sees it: the state machine between callbacks.

The adapter feeds it plain values (addresses, header names and bytes) and gets
`Reply` values back; nothing here knows pymilter.  A connection holds the
engine (compiled config) in force at connect for its IP decision and takes a
fresh snapshot at each MAIL FROM, so one message is judged by one rule set
from RCPT to EOM even if the config is reloaded meanwhile.

Header and body callbacks never fail the SMTP conversation themselves (Postfix
is told not to wait for their replies): a spool error is remembered and
answered at end of data with 451, before any 250.

A connection from a trusted forwarder is not judged by its own address: each
message is judged by the original client its `Received:` header names
(mxrules/forwarded.py decides, as it does for `mxrules explain`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field

from mxrules import forwarded, lifecycle
from mxrules.decision import (
    CONTINUE,
    TEMPFAIL_INTERNAL,
    TEMPFAIL_SCAN,
    TEMPFAIL_SPOOL,
    TOO_BIG,
    TOO_BIG_FOR_ACTIONS,
    UNRESOLVED_REPLIES,
    ConnectDecision,
    Engine,
    RcptDecision,
    Reply,
    RulePlan,
    in_stream_headers,
)
from mxrules.errors import SpoolError
from mxrules.ids import new_message_id
from mxrules.ipfilter import IPAddress, parse_ip
from mxrules.lifecycle import Outcome
from mxrules.matching import bare
from mxrules.metrics import BILLING_CHUNK, MilterMetrics
from mxrules.payload import prefix_floor, stored_copy_prefix
from mxrules.received import OriginalClient
from mxrules.service import quote as _quote
from mxrules.spool import Client, Job, JobWriter, MatchedRule, Spool, ses_timestamp
from mxrules.text import has_header_controls
from mxrules.verdicts import all_disabled

from .scanning import Scanner, ScanOutcome

log = logging.getLogger("mxrules.milter")

DISABLED_VERDICTS = all_disabled()

@dataclass
class Runtime:
    """What every connection shares: the current engine, the spool, the metrics."""

    engine: Engine
    spool: Spool
    metrics: MilterMetrics
    scanner: Scanner = field(default_factory=Scanner)

    def swap(self, engine: Engine) -> None:
        # One reference assignment: connections read it atomically under the GIL.
        self.engine = engine


# The end-of-data outcome (mxrules/lifecycle.py); the name callers know it by.
EomResult = Outcome


@dataclass
class _Message:
    engine: Engine
    sender: str
    decisions: list[RcptDecision] = field(default_factory=list)
    # Each recipient as Postfix recorded it in its queue file (see `postfix_form`),
    # in the order of `decisions`: what delrcpt must name to remove it.
    recorded: list[str] = field(default_factory=list)
    writer: JobWriter | None = None
    failed: Reply | None = None  # set when a header/body step could not be stored
    too_big: bool = False
    size: int | None = None  # the client's SIZE= at MAIL FROM, if any
    started: float = field(default_factory=time.monotonic)
    # Forwarded connections only: the walk down the Received headers as they
    # come, and what it says about the original client (settled once, at EOH
    # or EOM).
    received: OriginalClient | None = None
    judged: bool = False
    client: Client | None = None  # None: the connection's own client
    blocked: ConnectDecision | None = None
    unresolved: str = ""  # why the original client could not be found
    # The header names only this host may write (authres): those that arrived forged.
    own: lifecycle.OwnHeaders = field(init=False)

    def __post_init__(self) -> None:
        self.own = lifecycle.OwnHeaders(self.engine.config.hostname)

    @property
    def handled(self) -> list[RcptDecision]:
        return [d for d in self.decisions if d.handled]


class Session:
    def __init__(self, runtime: Runtime, conn_id: str = "") -> None:
        self.rt = runtime
        self.conn_id = conn_id
        self.client = Client(address="")
        self.forwarder: IPAddress | None = None  # set for a trusted forwarder's connection
        self.msg: _Message | None = None
        self.queue_id = ""

    # -- logging with the connection and queue ids on every line ------------
    def _log(self, level: int, event: str, **fields: object) -> None:
        if not log.isEnabledFor(level):
            return
        parts = [event, f"conn={self.conn_id}"]
        if self.queue_id:
            parts.append(f"queue_id={self.queue_id}")
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v not in (None, "")]
        log.log(level, " ".join(parts))

    # -- SMTP stages ----------------------------------------------------------
    def connect(self, address: str, hostname: str) -> Reply:
        engine = self.rt.engine
        self.forwarder = None
        try:
            addr = parse_ip(address)
        except ValueError:
            # Not an IP (a local submission): there is nothing to filter on.
            self.client = Client(address=address, hostname=hostname)
            self.rt.metrics.connections.labels("accepted").inc()
            self._log(logging.INFO, "connect", client=address, result="accept",
                      reason="no-ip-address")
            return CONTINUE
        decision = forwarded.connect(engine, addr)
        if forwarded.is_forwarder(decision):
            # Each of its messages is judged by its original client (_judge).
            self.forwarder = addr
        self.client = Client(address=str(addr), hostname=hostname,
                             forwarded_by=str(addr) if self.forwarder is not None else "")
        if decision.reply.verb == "reject":
            self.rt.metrics.connections.labels("rejected").inc()
            self.rt.metrics.rejections.labels("connect", decision.filters.reason).inc()
            self._log(logging.INFO, "connect", client=addr, result="reject",
                      reason=decision.filters.reason, filter=decision.filters.name,
                      cidr=decision.filters.cidr, reply=decision.reply)
        else:
            self.rt.metrics.connections.labels("accepted").inc()
            self._log(logging.INFO, "connect", client=addr, result="accept",
                      reason=decision.filters.reason, filter=decision.filters.name)
        return decision.reply

    def helo(self, name: str, tls_version: str, tls_cipher: str) -> None:
        c = self.client
        self.client = Client(c.address, c.hostname, name, tls_version, tls_cipher, c.forwarded_by)

    def mail(self, sender: str, params: dict[str, str | None]) -> Reply:
        self.abort()
        self.queue_id = ""
        engine = self.rt.engine
        self.msg = _Message(engine=engine, sender=bare(sender))
        size: int | None = None
        raw = params.get("SIZE")
        if raw and raw.isdigit():
            size = int(raw)
        self.msg.size = size
        reply = engine.mail(size)
        if reply.verb != "continue":
            self.rt.metrics.rejections.labels("mail", "size").inc()
            self._log(logging.INFO, "mail", sender=self.msg.sender, size=size,
                      result="reject", reply=reply)
        return reply

    def rcpt(self, recipient: str, *, tls: bool, recorded: str = "") -> Reply:
        """Judge `recipient` (the address Postfix parsed and will deliver to).

        `recorded` is the same recipient as Postfix recorded it in its queue
        file, the form delrcpt must name (default: `recipient`).
        """
        if self.msg is None:  # RCPT before MAIL cannot come from Postfix
            return TEMPFAIL_INTERNAL
        decision = self.msg.engine.rcpt(recipient, tls=tls,
                                        forwarded=self.forwarder is not None,
                                        size=self._least_size(recipient))
        self.msg.decisions.append(decision)
        self.msg.recorded.append(recorded or recipient)
        self.rt.metrics.recipients.labels(decision.outcome).inc()
        if decision.reply.verb == "reject":
            self.rt.metrics.rejections.labels("rcpt", decision.outcome).inc()
        self._log(logging.INFO, "rcpt", sender=self.msg.sender, rcpt=bare(recipient),
                  result=decision.outcome, rules=",".join(decision.rules),
                  reply=decision.reply if decision.reply.verb != "continue" else None)
        return decision.reply

    def _least_size(self, recipient: str) -> int | None:
        """The smallest the stored copy can be, judged at RCPT: SIZE= plus SES's headers.

        None without SIZE=, and for a trusted forwarder, whose recipients are not
        refused for size (Engine.rcpt).
        """
        msg = self.msg
        if msg is None or msg.size is None or self.forwarder is not None:
            return None
        first = msg.handled[0].recipient if msg.handled else recipient
        return msg.size + prefix_floor(_utf8(msg.sender), _utf8_client(self.client),
                                       msg.engine.config.hostname, _utf8(bare(first)))

    def _writer(self) -> JobWriter | None:
        """The spool file for this message, opened at the first header.

        Only a message with at least one handled recipient is spooled: mail
        for other domains passes through Postfix untouched and unstored.
        """
        msg = self.msg
        if (msg is None or msg.failed is not None or msg.blocked is not None or msg.unresolved
                or not msg.handled):
            return None
        if msg.writer is None:
            try:
                msg.writer = self.rt.spool.new_job(new_message_id())
            except SpoolError as exc:
                self._spool_failed(exc)
                return None
        return msg.writer

    def _spool_failed(self, exc: Exception) -> None:
        assert self.msg is not None
        self.msg.failed = TEMPFAIL_SPOOL
        if self.msg.writer is not None:
            self.msg.writer.abort()
            self.msg.writer = None
        self._log(logging.ERROR, "spool", result="tempfail", error=exc)

    def _write(self, data: bytes) -> None:
        writer = self._writer()
        if writer is None:
            return
        assert self.msg is not None
        if writer.size + len(data) > self.msg.engine.config.max_message_size:
            self.msg.too_big = True
            writer.abort()
            self.msg.writer = None
            self.msg.failed = TOO_BIG
            return
        try:
            writer.write(data)
        except OSError as exc:
            self._spool_failed(exc)

    def header(self, name: str, value: bytes) -> None:
        msg = self.msg
        if self.forwarder is not None and msg is not None and name.lower() == "received":
            # Read whole and at once: each value is at most Postfix's
            # header_size_limit, and only the walk's answer is kept.
            if msg.received is None:
                msg.received = forwarded.received_walk(msg.engine)
            msg.received.add(value)
        if msg is not None and msg.own.header(name, value):
            return
        self._write(name.encode("utf-8", "surrogateescape") + b":" + _crlf(value) + b"\r\n")

    def eoh(self) -> None:
        if self.msg is not None:
            # All headers are in: judge now, so a blocked message's body is never stored.
            self._judge(self.msg)
        self._write(b"\r\n")

    def _judge(self, msg: _Message) -> None:
        """For a forwarded message: find the original client and apply the IP filters to it."""
        if msg.judged or self.forwarder is None:
            return
        msg.judged = True
        judgement = forwarded.judge(msg.engine, msg.received)
        msg.unresolved, msg.blocked, hop = judgement.unresolved, judgement.blocked, judgement.hop
        if hop is not None:
            c = self.client
            # TLS stays the forwarder's: it is the only hop whose TLS mxrules saw.
            msg.client = Client(str(hop.address), hop.rdns, hop.helo, c.tls_version,
                                c.tls_cipher, str(self.forwarder))
        if (msg.unresolved or msg.blocked is not None) and msg.writer is not None:
            # Refused at end of data, and nothing is stored (an unknown original
            # client is never judged as the forwarder, whose address the victim's
            # SPF may well allow).
            msg.writer.abort()
            msg.writer = None

    def body(self, chunk: bytes) -> None:
        self._write(chunk)

    def eom(self, queue_id: str) -> EomResult:
        self.queue_id = queue_id or self.queue_id
        msg, self.msg = self.msg, None
        if msg is None:
            return EomResult(TEMPFAIL_INTERNAL)
        self._judge(msg)
        if msg.unresolved:
            return self._unresolved(msg)
        if msg.blocked is not None:
            return self._blocked(msg, msg.blocked)
        if msg.failed is None and not msg.handled:
            return self._end(msg, "no-managed-recipient", CONTINUE, sender=msg.sender,
                             result="passed", reason="no-managed-recipient")
        if msg.failed is not None:
            ending = _FAILED.get(msg.failed, "internal-error")
            return self._end(msg, ending, msg.failed, sender=msg.sender,
                             result=lifecycle.ENDINGS[ending].result, reply=msg.failed)
        writer = msg.writer or self._writer_for(msg)
        if writer is None:  # the spool refused the file: _spool_failed logged it
            return self._end(msg, "spool-unwritable", TEMPFAIL_SPOOL)
        engine = msg.engine
        plan = engine.plan(msg.handled)
        headers = in_stream_headers(plan)
        recipients = tuple(_utf8(bare(d.recipient)) for d in msg.handled)
        client = _utf8_client(msg.client or self.client)
        verdicts = dict(DISABLED_VERDICTS)
        auth_headers: tuple[tuple[str, str], ...] = ()
        scan, authenticate = engine.scan_wanted(plan), engine.auth_wanted(plan)
        if scan or authenticate:
            try:
                # What is buffered goes to the file the scanners read; a disk that
                # refuses it now would refuse the commit.
                writer.flush()
            except OSError as exc:
                return self._end(msg, "spool-unwritable", TEMPFAIL_SPOOL,
                                 result="tempfail", error=exc)
            outcome = self._scan(msg, writer, client, recipients, scan, authenticate)
            if outcome is None:  # every scan slot stayed busy for scan.wait_timeout
                return self._end(msg, "scan-slots-busy", TEMPFAIL_SCAN, sender=msg.sender,
                                 result="tempfail", reason="scan-slots-busy")
            # on_failure is the scanning rules' choice: authentication alone never tempfails.
            if scan and outcome.failed and engine.config.scan.on_failure == "tempfail":
                return self._end(msg, "scan-failed", TEMPFAIL_SCAN, sender=msg.sender,
                                 result="tempfail", reason="scan-failed",
                                 scanners=",".join(outcome.failed))
            verdicts = outcome.statuses()
            auth_headers = outcome.auth_headers
            headers = [*outcome.headers(), *headers]
        # Everything that could fail is settled before the commit: after it the
        # message is accepted, and only the committed outcome may be answered.
        headers = self._writable(headers)
        job = Job(
            message_id=writer.message_id,
            queue_id=_utf8(self.queue_id),
            received_at=ses_timestamp(),
            rule_set=engine.rule_set.name if engine.rule_set else "",
            mail_from=_utf8(msg.sender),
            recipients=recipients,
            client=client,
            rules=tuple(MatchedRule(p.rule, tuple(_utf8(bare(r)) for r in p.recipients))
                        for p in plan),
            in_stream_headers=tuple(headers),
            hostname=engine.config.hostname,
            message_size=writer.size,
            message_sha256=writer.sha256,
            verdicts=verdicts,
            auth_headers=auth_headers,
        )
        if self.forwarder is None and engine.too_big(
                msg.decisions, len(stored_copy_prefix(job)) + job.message_size):
            # Every recipient's rules would bounce it (SES's S3 and SNS limits, SES's
            # headers included): refused now, before it is stored, not bounced later.
            # Not a trusted forwarder's: it would send the DSN to whatever sender the
            # mail claims; the worker's bounce checks the sender first.
            return self._end(msg, "too-big-for-actions", TOO_BIG_FOR_ACTIONS,
                             sender=msg.sender, result="reject", reason="too-big",
                             size=job.message_size, reply=TOO_BIG_FOR_ACTIONS)
        edits, kept = self._edits(msg, headers, job.message_id)
        started = time.monotonic()
        try:
            writer.commit(job)
        except SpoolError as exc:
            return self._end(msg, "spool-unwritable", TEMPFAIL_SPOOL,
                             message_id=job.message_id, result="tempfail", error=exc)
        try:
            self._spooled(msg, plan, job, edits, kept, started)
        except Exception as exc:  # the job is stored: the answer stays "stored"
            self.after_commit_failed("bookkeeping", job.message_id, exc)
        return edits

    def _edits(self, msg: _Message, headers: Sequence[tuple[str, str]],
               message_id: str) -> tuple[EomResult, tuple[str, ...]]:
        """The outcome for Postfix's copy, and the recipients that cannot be removed."""
        delete, kept, discard = lifecycle.recipients_to_remove(
            msg.decisions, msg.recorded, msg.engine.config.delivery == "consume")
        result = lifecycle.stored(message_id, forged=msg.own.forged, headers=headers,
                                  delete=delete, discard=discard)
        return result, kept

    def _spooled(self, msg: _Message, plan: Sequence[RulePlan], job: Job, result: EomResult,
                 kept: tuple[str, ...], started: float) -> None:
        """Count and log a stored message."""
        m = self.rt.metrics
        m.spool_seconds.observe(time.monotonic() - started)
        m.messages.labels("spooled").inc()
        m.received_bytes.inc(job.message_size)
        m.billing_chunks.inc(max(1, -(-job.message_size // BILLING_CHUNK)))
        m.message_size.observe(job.message_size)
        for p in plan:
            m.rule_matches.labels(p.rule.name).inc()
        delete, discard = result.delete_recipients, result.discard
        self._log(logging.INFO, "eom", message_id=job.message_id, sender=msg.sender,
                  client=msg.client.address if msg.client else None,
                  forwarded_by=msg.client.forwarded_by if msg.client else None,
                  rcpts=len(job.recipients), rules=",".join(p.rule.name for p in plan),
                  size=job.message_size, result="spooled",
                  delivery="discard" if discard else ("partial" if delete or kept else "deliver"),
                  ms=int((time.monotonic() - msg.started) * 1000))
        for form in kept:
            m.post_commit_errors.labels("remove-recipient").inc()
            self._log(logging.ERROR, "eom", message_id=job.message_id, result="spooled",
                      rcpt=_utf8(form), error="not UTF-8: cannot be removed from Postfix's "
                      "copy, which still goes to it")

    def after_commit_failed(self, step: str, message_id: str, exc: BaseException) -> None:
        """A step after the job was stored failed: loud, counted, and never a 4xx.

        The client already has its message stored; a 451 now would make it
        send the message again, and the job would run twice.
        """
        self.rt.metrics.post_commit_errors.labels(step).inc()
        log.error("after commit conn=%s queue_id=%s message_id=%s step=%s: %r (the message "
                  "is stored and answered as stored)", self.conn_id, self.queue_id,
                  message_id, step, exc, exc_info=exc)

    def _writable(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The headers libmilter and Postfix can take; any other is logged and left out.

        The config schema refuses such AddHeader values and the scan headers
        are sanitised: this is the last check, before the commit, so that a
        header can never fail after it.
        """
        out = []
        for name, value in headers:
            if _HEADER_NAME.fullmatch(name) and lifecycle.passable(value) \
                    and not has_header_controls(value):
                out.append((name, value))
            else:
                self._log(logging.ERROR, "eom", result="header-left-out", header=name,
                          error="not a header Postfix can take (control characters or "
                          "bytes that are not UTF-8)")
        return out

    def _scan(self, msg: _Message, writer: JobWriter, client: Client,
              recipients: tuple[str, ...], scan: bool,
              authenticate: bool) -> ScanOutcome | None:
        cfg = msg.engine.config
        started = time.monotonic()
        outcome = self.rt.scanner.scan(
            cfg.scan, cfg.hostname, writer.message_path, client_ip=client.address,
            helo=client.helo, mail_from=msg.sender, recipients=recipients,
            client_hostname=client.hostname, queue_id=self.queue_id, spam_virus=scan,
            authenticate=authenticate)
        if outcome is None:
            return None
        elapsed = time.monotonic() - started
        m = self.rt.metrics
        m.scan_seconds.observe(elapsed)
        ran = {k: v for k, v in outcome.verdicts.items() if v.status != "DISABLED"}
        for key, verdict in ran.items():
            m.verdicts.labels(key, verdict.status).inc()
        self._log(logging.INFO, "scan", sender=msg.sender,
                  **{k: f"{v.status}" + (f"({v.detail})" if v.detail else "")
                     for k, v in ran.items()},
                  dmarc_policy=outcome.dmarc_policy, ms=int(elapsed * 1000))
        return outcome

    def _blocked(self, msg: _Message, decision: ConnectDecision) -> EomResult:
        """A forwarded message whose original client the IP filters refuse.

        The answer a direct connection from that client would have had at
        connect, given at end of data; whatever was stored is dropped.  The
        connection was counted as accepted at connect: the refusal is a
        message's, counted as a rejected message and a data-stage rejection.
        """
        f = decision.filters
        return self._end(msg, lifecycle.blocked(f.reason), decision.reply, sender=msg.sender,
                         client=decision.client, forwarded_by=self.forwarder, result="reject",
                         reason=f.reason, filter=f.name, cidr=f.cidr, reply=decision.reply)

    def _unresolved(self, msg: _Message) -> EomResult:
        """A forwarded message whose original client cannot be found.

        Judging it as the forwarder would let any client the IP filters
        refuse through the user's own relay, and SPF would judge the relay's
        address.  The answer is `forwarder_unresolved`'s; whatever was stored
        is dropped.
        """
        reply = UNRESOLVED_REPLIES[msg.engine.config.forwarder_unresolved]
        self.rt.metrics.forwarded_unresolved.labels(msg.unresolved).inc()
        return self._end(msg, f"unresolved-{reply.verb}", reply, event="forwarded",
                         sender=msg.sender, forwarder=self.forwarder, result=reply.verb,
                         reason=msg.unresolved,
                         why="the original client is unknown (trusted_forwarders)", reply=reply)

    def _end(self, msg: _Message, ending: str | lifecycle.Ending, answer: Reply,
             event: str = "eom", **fields: object) -> EomResult:
        """A message that is not stored: its file dropped, counted as its ending says,
        and logged in one line (none without `fields`: the failure was logged as it came)."""
        if msg.writer is not None:
            msg.writer.abort()
            msg.writer = None
        end = lifecycle.ENDINGS[ending] if isinstance(ending, str) else ending
        m = self.rt.metrics
        m.messages.labels(end.result).inc()
        if end.rejection:
            m.rejections.labels("data", end.rejection).inc()
        if end.spool_failure:
            m.spool_failures.inc()
        if end.slot_timeout:
            m.scan_slot_timeouts.inc()
        if fields:
            self._log(end.level, event, **fields)
        return EomResult(answer)

    def _writer_for(self, msg: _Message) -> JobWriter | None:
        """A message with no header or body callbacks at all still gets a file."""
        self.msg = msg
        try:
            return self._writer()
        finally:
            self.msg = None

    def abort(self) -> None:
        """The current message is gone (RSET, QUIT, a reject): forget its spool file."""
        if self.msg is not None and self.msg.writer is not None:
            self.msg.writer.abort()
        self.msg = None

    def deferred_error(self, stage: str, exc: BaseException) -> None:
        """An exception where Postfix expects no reply: fail the message at EOM."""
        self.rt.metrics.errors.labels(stage).inc()
        log.error("internal error conn=%s queue_id=%s stage=%s: %r",
                  self.conn_id, self.queue_id, stage, exc, exc_info=exc)
        if self.msg is not None:
            if self.msg.writer is not None:
                self.msg.writer.abort()
                self.msg.writer = None
            self.msg.failed = TEMPFAIL_INTERNAL

    def error(self, stage: str, exc: BaseException) -> Reply:
        """An unexpected exception at the adapter edge: log, count, tempfail."""
        self.rt.metrics.errors.labels(stage).inc()
        log.error("internal error conn=%s queue_id=%s stage=%s: %r",
                  self.conn_id, self.queue_id, stage, exc, exc_info=exc)
        self.abort()
        return TEMPFAIL_INTERNAL


# A message failed before end of data, by its reply: which ending it is.
_FAILED = {TEMPFAIL_SPOOL: "spool-failed", TOO_BIG: "too-big",
           TEMPFAIL_INTERNAL: "internal-error"}


def postfix_form(raw: str) -> str:
    """A RCPT TO argument as Postfix recorded it, for delrcpt to name it exactly.

    smtpd(8) (extract_addr) takes the argument as the client typed it (the
    milter's envrcpt receives it unchanged), removes one enclosing `<...>`
    and a source route (`@a,@b:`), and records the rest, parsed and
    internalised, as the original recipient.  cleanup(8) (cleanup_del_rcpt
    in cleanup_milter.c) parses and internalises what the milter asks to
    delete in the same way and compares it byte for byte with that record.
    Giving back the very text smtpd parsed therefore names the recorded
    recipient whatever case, quoting, `+tag` or trailing dot the client
    used; `{rcpt_addr}` does not: it is the address as Postfix resolved it
    (Postfix 3.7: in lower case, without a trailing dot, quoted again).
    """
    text = raw[1:-1] if raw.startswith("<") and raw.endswith(">") else raw
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    return text


# RFC 5322 field name: printable ASCII but the colon.  A value is one line: no
# CR or LF (mxrules never folds), no other control but TAB, no DEL.
_HEADER_NAME = re.compile(r"[!-9;-~]+")


def _utf8(text: str) -> str:
    """Text for the job: bytes that were not UTF-8 become U+FFFD.

    pymilter decodes what Postfix hands over (addresses, HELO, host names)
    with surrogateescape; the job and every SES payload are UTF-8 JSON, which
    cannot carry those lone surrogates, so one would make every delivery
    attempt of the message fail.
    """
    return lifecycle.SURROGATE.sub("\ufffd", text)


def _utf8_client(client: Client) -> Client:
    return Client(*(_utf8(value) for value in astuple(client)))


def _crlf(value: bytes) -> bytes:
    """Folded header values use CRLF, like the body Postfix sends."""
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
