"""The scans at end of data: spam, virus and SPF/DKIM/DMARC, side by side, with one deadline.

Spam and virus run when a matched rule has `scan_enabled`; SPF, DKIM and
DMARC on every handled message unless `scan.authentication` says otherwise
(SES authenticates every message; `ScanEnabled` switches only spam and virus).
What did not run is DISABLED.  Each scanner reads the
spooled file itself (no copy of the message in memory) from a small thread
pool, so their network waits overlap; whatever has not answered when the
deadline (`scan.timeout`) passes is PROCESSING_FAILED, as is every scanner
that is down or not configured.  A failure never rejects and never loses the
mail -- unless the operator chose `scan.on_failure: tempfail`.

At most `scan.concurrency` messages are scanned for spam and viruses at once
(SPF/DKIM/DMARC alone take no slot).  A message holds its
slot until every one of its scanners has returned -- also one given up on at
the deadline, which runs on until its own deadline -- so the memory and
threads scans take stay bounded however much mail arrives together.  A
message that finds no free slot waits, at most `scan.wait_timeout` seconds
(it and `scan.timeout` together stay inside Postfix's 300 s wait for end of
data), and is then answered 451: the sender retries later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from mxrules.authres import verdict_headers
from mxrules.config import ScanSettings
from mxrules.scan import DISABLED, Verdict
from mxrules.verdicts import DMARC, SCANNED, SPAM, VERDICTS, VIRUS

log = logging.getLogger("mxrules.milter")

KEYS = VERDICTS


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
        if self.dmarc_policy and out[DMARC] == "FAIL":
            out["dmarc_policy"] = self.dmarc_policy
        return out

    def headers(self) -> list[tuple[str, str]]:
        """The headers for Postfix's copy, in SES's order; none for a scan not run.

        docs/ses-compatibility.md, "The stored copy".
        """
        statuses = {key: self.verdicts[key].status for key in SCANNED}
        return [*verdict_headers(statuses), *self.auth_headers]


def _failed(why: str) -> Verdict:
    return Verdict("PROCESSING_FAILED", why)


class ScanSlots:
    """A count of messages being scanned, with a limit read at each acquire.

    The limit is the config's, which a reload may change; a semaphore could not
    follow it.
    """

    def __init__(self) -> None:
        self.busy = 0
        self._cond = threading.Condition()

    def acquire(self, limit: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self.busy < limit, timeout):
                return False
            self.busy += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.busy -= 1
            self._cond.notify()

    def release_when_done(self, futures: Collection[Future[object]]) -> None:
        """Give the slot back once every scanner of the message has returned."""
        left = [len(futures)]
        lock = threading.Lock()

        def one_done(_: Future[object]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.release()

        if not futures:
            self.release()
        for fut in futures:
            fut.add_done_callback(one_done)


# Scanners per message (spam, virus, auth), and the most messages scanned at once
# that the schema allows (scan.concurrency): the pool never makes a scan queue.
SCANNERS_PER_MESSAGE = 3
MAX_CONCURRENCY = 32
# Checks of messages that are only authenticated, at once: Postfix's default
# process limit, so with its defaults none waits for a thread.
AUTH_WORKERS = 100


class Scanner:
    """Owns the thread pool scans run in and the scan slots; one per milter process."""

    def __init__(self, workers: int = SCANNERS_PER_MESSAGE * MAX_CONCURRENCY) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")
        self.slots = ScanSlots()
        # Messages that are only authenticated, apart: they never queue behind (or
        # in front of) the slotted scans.  Threads are made as needed.
        self.auth_pool = ThreadPoolExecutor(max_workers=AUTH_WORKERS, thread_name_prefix="auth")

    def scan(self, settings: ScanSettings, authserv_id: str, path: str, *, client_ip: str,
             helo: str, mail_from: str, recipients: Sequence[str],
             client_hostname: str = "", queue_id: str = "", spam_virus: bool = True,
             authenticate: bool = True) -> ScanOutcome | None:
        """The verdicts; None when no scan slot freed within `scan.wait_timeout`."""
        from mxrules.scan import auth

        s = settings
        jobs: dict[str, Callable[[], object]] = {}
        if spam_virus:
            jobs.update(self._spam_virus_jobs(s, path, client_ip=client_ip, helo=helo,
                                              mail_from=mail_from, recipients=recipients,
                                              client_hostname=client_hostname,
                                              queue_id=queue_id))
        if authenticate:
            dns = auth.DnsSettings(nameservers=s.nameservers, timeout=s.dns_timeout)
            jobs["auth"] = lambda: auth.check(
                path, client_ip=client_ip, helo=helo, mail_from=mail_from,
                authserv_id=authserv_id, dns=dns, timeout=s.timeout, max_size=s.dkim_max_size)
        # Authentication alone takes no slot: it reads the header block and streams
        # the body, so its memory is bounded per message, and ordinary mail must not
        # wait, or be answered 451, for want of a slot.
        if spam_virus and not self.slots.acquire(s.concurrency, s.wait_timeout):
            return None
        pool = self.pool if spam_virus else self.auth_pool
        futures: dict[str, Future[object]] = {}
        try:
            for k, f in jobs.items():
                futures[k] = pool.submit(f)
        finally:
            if spam_virus:
                self.slots.release_when_done(futures.values())
        return self._collect(futures, s.timeout, spam_virus=spam_virus)

    @staticmethod
    def _spam_virus_jobs(s: ScanSettings, path: str, *, client_ip: str, helo: str,
                         mail_from: str, recipients: Sequence[str], client_hostname: str,
                         queue_id: str) -> dict[str, Callable[[], object]]:
        from mxrules.scan import spam, virus

        jobs: dict[str, Callable[[], object]] = {}
        if s.spam is not None:
            spam_cfg = s.spam
            if spam_cfg.engine == "rspamd":
                jobs[SPAM] = lambda: spam.scan_rspamd(
                    spam_cfg.address, path, timeout=s.timeout, max_size=spam_cfg.max_size,
                    client_ip=client_ip, helo=helo, sender=mail_from, recipients=recipients,
                    hostname=client_hostname or None, queue_id=queue_id or None)
            else:
                jobs[SPAM] = lambda: spam.scan_spamd(
                    spam_cfg.address, path, timeout=s.timeout, max_size=spam_cfg.max_size)
        if s.virus is not None:
            virus_cfg = s.virus
            jobs[VIRUS] = lambda: virus.scan_clamd(virus_cfg.address, path, timeout=s.timeout,
                                                     max_size=virus_cfg.max_size)
        return jobs

    @staticmethod
    def _collect(futures: dict[str, Future[object]], timeout: float, *,
                 spam_virus: bool) -> ScanOutcome:
        from mxrules.scan import auth

        wait(futures.values(), timeout=timeout)
        verdicts: dict[str, Verdict] = dict.fromkeys(KEYS, DISABLED)
        if spam_virus:  # asked for: a scanner left out of the config is a failure
            for key in SCANNED:
                verdicts[key] = _failed(f"no {key} scanner configured")
        auth_headers: tuple[tuple[str, str], ...] = ()
        policy = None
        for key, fut in futures.items():
            if not fut.done():
                fut.cancel()
                result: object = _failed(f"no answer within {timeout:g}s")
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
