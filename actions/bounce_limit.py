"""Which Bounce DSNs may be sent: the sender's authentication and the rate limits.

A DSN goes to the envelope sender, an address anyone can write.  Sent for
every bounced message, it turns mxrules into a reflector: forge a victim's
address as the sender and each message makes mxrules mail the victim
("backscatter").  So, before a DSN is sent:

- the sender must be authenticated (`bounce.require_authenticated_sender`,
  default on): SPF passed for the envelope sender's domain, or DMARC passed
  for a From domain aligned with it (RFC 7489 §3.1, relaxed).  DMARC alone is
  not enough: it vouches for the From domain, which need not be the
  sender's, and the DSN goes to the sender.  A verdict that is not PASS
  (FAIL, GRAY, PROCESSING_FAILED, DISABLED, missing) counts as not
  authenticated;
- at most `bounce.rate_limit.per_sender` DSNs go to one sender and
  `per_client_ip` for mail from one client address (an IPv6 client is
  counted by its /64, which one host usually holds whole) in each `period`.

The counts live in the worker process (several workers on one spool count
separately; a restart starts from zero) in fixed windows, at most MAX_KEYS
keys per count: when that many senders or clients have each been sent a DSN
within one period, a new one is refused until a window ends.  Memory stays
bounded however many addresses an attacker uses, and the refusal errs on the
side of sending nothing.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mxrules.scan.auth import aligned
from mxrules.spool import Job
from mxrules.verdicts import DMARC, SPF

MAX_KEYS = 10_000

# mxrules' own Authentication-Results (mxrules.scan.auth.authentication_results)
# ends with the dmarc entry: `dmarc=pass (p=.. sp=..) header.from=DOMAIN`.  Only
# that last entry, and only a plain host name there, is read: the From domain
# comes from the message, and a quoted one could hold text that looks like an
# entry.  (Nothing else matching errs on the side of no DSN.)
_DMARC_FROM = re.compile(
    r";\s*dmarc=pass(?:\s+\([^()\"]*\))?\s+header\.from=([A-Za-z0-9][A-Za-z0-9.-]*)\s*\Z")


class Limits(Protocol):
    bounce_rate_per_sender: int
    bounce_rate_per_client: int
    bounce_rate_period: float


def authenticated_by(job: Job) -> str:
    """"spf" or "dmarc" when that check vouches for the envelope sender, else ""."""
    if job.verdicts.get(SPF) == "PASS":
        return SPF
    domain = job.mail_from.rpartition("@")[2]
    from_domain = dmarc_from_domain(job)
    if job.verdicts.get(DMARC) == "PASS" and from_domain and aligned(domain, from_domain, "r"):
        return DMARC
    return ""


def dmarc_from_domain(job: Job) -> str:
    """The From domain DMARC passed for, read from the job's own Authentication-Results."""
    for name, value in job.auth_headers:
        if name.lower() == "authentication-results":
            found = _DMARC_FROM.search(value)
            if found:
                return found.group(1)
    return ""


def client_key(address: str) -> str:
    """The client a rate is counted for: the address, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower() or "-"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Window:
    start: float
    count: int


class _Counter:
    """Events per key in fixed windows, oldest window first, at most MAX_KEYS keys."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.windows: OrderedDict[str, _Window] = OrderedDict()

    def expire(self, now: float, period: float) -> None:
        # Windows are kept in the order they started, all of one length: the
        # expired ones are at the front.  A reload may shorten the period;
        # then a few expire later than they would, never earlier.
        while self.windows:
            key, window = next(iter(self.windows.items()))
            if window.start + period > now:
                return
            del self.windows[key]

    def has_room(self, key: str, limit: int) -> bool:
        window = self.windows.get(key)
        if window is None:
            return len(self.windows) < self.max_keys
        return window.count < limit

    def add(self, key: str, now: float) -> None:
        window = self.windows.get(key)
        if window is None:
            self.windows[key] = _Window(now, 1)
        else:
            window.count += 1

    def remove(self, key: str) -> None:
        window = self.windows.get(key)
        if window is not None and window.count > 0:
            window.count -= 1


class BounceLimiter:
    """The per-sender and per-client DSN counts of one worker, shared by its threads."""

    def __init__(self, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.senders = _Counter(max_keys)
        self.clients = _Counter(max_keys)
        self.clock = clock
        self._lock = threading.Lock()

    def acquire(self, sender: str, client: str, limits: Limits) -> str:
        """Count one DSN if both limits allow it: "" if so, else the reason it may not go."""
        sender, client = sender.lower(), client_key(client)
        with self._lock:
            now = self.clock()
            for counter in (self.senders, self.clients):
                counter.expire(now, limits.bounce_rate_period)
            if not self.senders.has_room(sender, limits.bounce_rate_per_sender):
                return "sender-rate"
            if not self.clients.has_room(client, limits.bounce_rate_per_client):
                return "client-rate"
            self.senders.add(sender, now)
            self.clients.add(client, now)
            return ""

    def release(self, sender: str, client: str) -> None:
        """Take back a DSN counted by acquire that was not sent after all (it will be retried)."""
        with self._lock:
            self.senders.remove(sender.lower())
            self.clients.remove(client_key(client))
