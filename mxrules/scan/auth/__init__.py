"""SPF, DKIM and DMARC: SES's `spfVerdict`, `dkimVerdict`, `dmarcVerdict` (see
docs/ses-compatibility.md, "Authentication and scans").

`check()` takes the spooled message and the SMTP facts (client IP, HELO, MAIL FROM)
and returns an `AuthResult`: three `Verdict`s, the DMARC policy, and the values of
the `Received-SPF` (RFC 7208 §9.1) and `Authentication-Results` (RFC 8601) headers
mxrules adds. It never raises: anything unexpected is PROCESSING_FAILED with the
error in the verdict's detail, and the mail goes on (as in SES).

LIBRARIES

The protocols are pyspf (SPF, RFC 7208) and dkimpy (DKIM, RFC 6376); DMARC (RFC 7489)
is the record lookup, the organisational domain (publicsuffix2, Debian's list) and the
alignment rules, written here.

MEMORY

The message is never read whole: the From header (DMARC) and the DKIM-Signature
headers come from the header block alone (at most 1 MiB; a longer one is hostile:
DKIM is neutral and DMARC permerror, "header block over the limit"). dkimpy is run
only when a DKIM-Signature is there, over the header block, and the body hashes
are computed from the file as a stream (`mxrules.scan.dkim_body`), with results
identical to dkimpy's over the whole message. authheaders was not used: it runs pyspf through its
default resolver, verifies only the first DKIM signature, reports every DKIM error as
`fail`, and its DMARC DNS hook is meant for tests.

The package: `resolver` (DNS and its cache), `spf`, `dkim`, `dmarc`, `headers` (the
Received-SPF and Authentication-Results text), `results` (what each finds); `check`
here runs them.

MAPPING TO SES STATUSES

SES documents (receiving-email-notifications-contents, and the SES event types in the
AWS SDKs) for SPF: GRAY "there is no SPF policy under the domain used in the MAIL FROM
command", PROCESSING_FAILED "an issue that prevents Amazon SES from checking the SPF
record, for example DNS queries are failing"; for DKIM: GRAY "the message is not
DKIM-signed", PROCESSING_FAILED "for example, DNS queries are failing or the DKIM
signature header is not formatted properly"; for DMARC: GRAY "the message failed DMARC
authentication, and the sending domain does not have a DMARC policy, or uses the p=none
policy", and `dmarcPolicy` (none|quarantine|reject) "only appears if the message fails
DMARC authentication". SES's sample Lambda event shows `dmarc=none` (no record) with
dmarcVerdict GRAY. The rest is mxrules's choice [mxrules]:

    SPF   pass -> PASS   fail -> FAIL   softfail, neutral, none -> GRAY
          temperror -> PROCESSING_FAILED (DNS failing, or out of time)
          permerror -> PROCESSING_FAILED (the record exists but cannot be evaluated:
                       SES's "an issue prevents checking the SPF record"; not GRAY,
                       which SES keeps for "no policy")
    DKIM  per signature: pass; fail (the signature or body hash does not verify, or the
          signature expired); permerror (no key, revoked or unusable key: the signature
          can never verify, RFC 6376 §6.1.2 PERMFAIL) counts as a failure; neutral (the
          DKIM-Signature cannot be parsed, or the message is over the size limit) and
          temperror (DNS) cannot be decided.
          No signature -> GRAY; any failed signature -> FAIL; else any undecided ->
          PROCESSING_FAILED; else (every signature passes) -> PASS.
    DMARC pass -> PASS; fail under p=/sp= quarantine or reject -> FAIL with that policy;
          fail under none -> GRAY with policy "none" (SES's GRAY wording; the message
          did fail, so `dmarc_policy` is set; the scan and payload code put dmarcPolicy
          in a receipt only beside FAIL); no record -> GRAY without a policy; DNS
          failing, an aligned identifier that could not be checked, or no single From
          domain -> PROCESSING_FAILED. pct= is ignored: the published policy is
          reported as is.
    Over max_size the body is not hashed: DKIM is PROCESSING_FAILED ("over the size
    limit"); SPF is unaffected and DMARC still passes on aligned SPF.
    Without a valid client IP (a local submission) SPF is none -> GRAY.

One SES sample also shows dkimVerdict GRAY for a message whose only (passing)
signature is not from the From domain, as if SES judged DKIM for the author's domain
only. That sample is the only hint; mxrules judges every signature, as above.
"""

from __future__ import annotations

import logging
import time

from mxrules.headblock import Head, read_head
from mxrules.scan import Verdict

from .dkim import check_dkim, dkim_verdict
from .dmarc import (
    aligned,
    author_domain,
    check_dmarc,
    dmarc_verdict,
    evaluate_dmarc,
    organizational_domain,
    parse_dmarc_record,
)
from .headers import (
    ar_address,
    ar_value,
    authentication_results,
    comment,
    received_spf,
    sanitize,
    spf_value,
)
from .resolver import DNS_CACHE_ANSWER_BYTES, Dns, DnsSettings, forget_dns_answers, parse_nameserver
from .results import AuthResult, DkimResult, DmarcRecord, DmarcResult, SpfResult
from .spf import check_spf, spf_verdict

# What callers (the milter, the worker, tests, tools) use, by name.
__all__ = [
    "DNS_CACHE_ANSWER_BYTES", "AuthResult", "DkimResult", "DmarcRecord", "DmarcResult",
    "DnsSettings", "SpfResult", "aligned", "ar_address", "ar_value", "authentication_results",
    "author_domain", "check", "comment", "dkim_verdict", "dmarc_verdict", "evaluate_dmarc",
    "forget_dns_answers", "organizational_domain", "parse_dmarc_record", "parse_nameserver",
    "received_spf", "sanitize", "spf_value", "spf_verdict",
]

log = logging.getLogger(__name__)


def _read_head(path: str) -> Head:
    """The message's header block (never its body) and its size."""
    with open(path, "rb") as fh:
        return read_head(fh)


def check(message_path: str, *, client_ip: str, helo: str, mail_from: str, authserv_id: str,
          dns: DnsSettings, timeout: float, max_size: int) -> AuthResult:
    """SPF, DKIM and DMARC for one message, within `timeout` seconds; never raises."""
    settings = dns  # the name is the API's; inside, `dns` is dnspython
    try:
        return _check(message_path, client_ip=client_ip, helo=helo, mail_from=mail_from,
                      authserv_id=authserv_id, settings=settings, timeout=timeout,
                      max_size=max_size)
    except Exception as exc:
        log.warning("auth check failed: %r", exc, exc_info=True)
        failed = Verdict("PROCESSING_FAILED", sanitize(f"internal error: {exc!r}"))
        spf_result = SpfResult("temperror", "mailfrom", mail_from, "", "internal error")
        return AuthResult(
            failed, failed, failed, None,
            received_spf(spf_result, client_ip=client_ip, helo=helo, mail_from=mail_from,
                         authserv_id=authserv_id),
            f"{ar_value(authserv_id)}; spf=temperror {comment('internal error')}; "
            "dkim=temperror; dmarc=temperror")


def _check(message_path: str, *, client_ip: str, helo: str, mail_from: str, authserv_id: str,
           settings: DnsSettings, timeout: float, max_size: int) -> AuthResult:
    # DNS gets the time less a reserve for the work after the last answer (verifying,
    # formatting), so a caller that waits exactly `timeout` still gets this result.
    dns_ = Dns(settings, time.monotonic() + timeout - min(0.5, timeout / 10))
    try:
        spf_result = check_spf(dns_, client_ip, helo, mail_from)
    except Exception as exc:  # pyspf on input it did not expect
        log.warning("SPF check failed: %r", exc, exc_info=True)
        spf_result = SpfResult("temperror", "mailfrom", mail_from, "", f"internal error: {exc}")

    try:
        head = _read_head(message_path)
    except OSError as exc:
        # Without the message neither DKIM nor DMARC can be decided; SPF stands.
        why = f"message not readable: {exc.strerror or exc}"
        dkim_results = [DkimResult("neutral", reason=why, checked=False)]
        dkim_status = Verdict("PROCESSING_FAILED", sanitize(why))
        dmarc_result = DmarcResult("temperror", reason=why)
    else:
        complete = head.size <= max_size
        try:
            dkim_results = check_dkim(message_path, head, dns_, complete=complete)
        except Exception as exc:
            log.warning("DKIM check failed: %r", exc, exc_info=True)
            dkim_results = [DkimResult("neutral", reason=f"internal error: {exc}",
                                       checked=False)]
        dkim_status = dkim_verdict(dkim_results)
        if not complete and dkim_results:
            dkim_status = Verdict("PROCESSING_FAILED", "over the size limit")
        try:
            dmarc_result = check_dmarc(head, dns_, spf_result, dkim_results)
        except Exception as exc:
            log.warning("DMARC check failed: %r", exc, exc_info=True)
            dmarc_result = DmarcResult("temperror", reason=f"internal error: {exc}")
    dmarc_status, policy = dmarc_verdict(dmarc_result)

    return AuthResult(
        spf=spf_verdict(spf_result),
        dkim=dkim_status,
        dmarc=dmarc_status,
        dmarc_policy=policy,
        received_spf=received_spf(spf_result, client_ip=client_ip, helo=helo,
                                  mail_from=mail_from, authserv_id=authserv_id),
        authentication_results=authentication_results(authserv_id, spf_result, dkim_results,
                                                      dmarc_result),
    )
