"""The scans at end of data: spam, virus and SPF/DKIM/DMARC, side by side, with one deadline.

Runs only when a matched rule has `scan_enabled`.  Each scanner reads the
spooled file itself (no copy of the message in memory) from a small thread
pool, so their network waits overlap; whatever has not answered when the
deadline (`scan.timeout`) passes is PROCESSING_FAILED, as is every scanner
that is down or not configured.  A failure never rejects and never loses the
mail -- unless the operator chose `scan.on_failure: tempfail`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from mxrules.config import ScanSettings
from mxrules.scan import Verdict

log = logging.getLogger("mxrules.milter")

KEYS = ("spam", "virus", "spf", "dkim", "dmarc")


@dataclass(frozen=True)
class ScanOutcome:
    verdicts: dict[str, Verdict]
    dmarc_policy: str | None = None
    # Received-SPF and Authentication-Results, as the auth check wrote them.
    auth_headers: tuple[tuple[str, str], ...] = ()
    failed: tuple[str, ...] = field(default=())

    def statuses(self) -> dict[str, str]:
        """What the job records (and the payloads show)."""
        out: dict[str, str] = {k: self.verdicts[k].status for k in KEYS}
        if self.dmarc_policy and out["dmarc"] == "FAIL":
            out["dmarc_policy"] = self.dmarc_policy
        return out

    def headers(self) -> list[tuple[str, str]]:
        """The headers for Postfix's copy, in SES's order (SPEC §8)."""
        return [("X-SES-Spam-Verdict", self.verdicts["spam"].status),
                ("X-SES-Virus-Verdict", self.verdicts["virus"].status),
                *self.auth_headers]


def _failed(why: str) -> Verdict:
    return Verdict("PROCESSING_FAILED", why)


class Scanner:
    """Owns the thread pool scans run in; one per milter process."""

    def __init__(self, workers: int = 64) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")

    def scan(self, settings: ScanSettings, authserv_id: str, path: str, *, client_ip: str,
             helo: str, mail_from: str, recipients: Sequence[str],
             client_hostname: str = "", queue_id: str = "") -> ScanOutcome:
        from mxrules.scan import auth, spam, virus

        s = settings
        jobs: dict[str, Callable[[], object]] = {}
        if s.spam is not None:
            spam_cfg = s.spam
            if spam_cfg.engine == "rspamd":
                jobs["spam"] = lambda: spam.scan_rspamd(
                    spam_cfg.address, path, timeout=s.timeout, max_size=spam_cfg.max_size,
                    client_ip=client_ip, helo=helo, sender=mail_from, recipients=recipients,
                    hostname=client_hostname or None, queue_id=queue_id or None)
            else:
                jobs["spam"] = lambda: spam.scan_spamd(
                    spam_cfg.address, path, timeout=s.timeout, max_size=spam_cfg.max_size)
        if s.virus is not None:
            virus_cfg = s.virus
            jobs["virus"] = lambda: virus.scan_clamd(virus_cfg.address, path, timeout=s.timeout,
                                                     max_size=virus_cfg.max_size)
        dns = auth.DnsSettings(nameservers=s.nameservers, timeout=s.dns_timeout)
        jobs["auth"] = lambda: auth.check(
            path, client_ip=client_ip, helo=helo, mail_from=mail_from,
            authserv_id=authserv_id, dns=dns, timeout=s.timeout, max_size=s.dkim_max_size)

        futures: dict[str, Future[object]] = {k: self.pool.submit(f) for k, f in jobs.items()}
        wait(futures.values(), timeout=s.timeout)
        verdicts: dict[str, Verdict] = {
            "spam": _failed("no spam scanner configured"),
            "virus": _failed("no virus scanner configured"),
        }
        auth_headers: tuple[tuple[str, str], ...] = ()
        policy = None
        for key, fut in futures.items():
            if not fut.done():
                fut.cancel()
                result: object = _failed(f"no answer within {s.timeout:g}s")
            else:
                try:
                    result = fut.result()
                except Exception as exc:  # scanners should not raise; never trust that
                    result = _failed(f"{type(exc).__name__}: {exc}")
            if key != "auth":
                assert isinstance(result, Verdict)
                verdicts[key] = result
            elif isinstance(result, auth.AuthResult):
                verdicts.update(spf=result.spf, dkim=result.dkim, dmarc=result.dmarc)
                policy = result.dmarc_policy
                auth_headers = (("Received-SPF", result.received_spf),
                                ("Authentication-Results", result.authentication_results))
            else:
                assert isinstance(result, Verdict)
                verdicts.update(spf=result, dkim=result, dmarc=result)
        failed = tuple(k for k in KEYS if verdicts[k].status == "PROCESSING_FAILED")
        return ScanOutcome(verdicts, policy, auth_headers, failed)
