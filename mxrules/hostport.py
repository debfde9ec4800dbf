"""One parser for every "host:port" mxrules reads, as Postfix has one (host_port(3)).

The forms, whoever reads them (scanners, the bounce relay, the metrics listeners,
the DNS name servers):

    host:port        a name or an IPv4 address, and a port
    [host]:port      any host, IPv6 addresses included, in brackets
    host, [host]     no port: the caller's default, where it has one
    2001:db8::1      with `bare_ipv6` only: a bare IPv6 address, no port

The port is 1 to 65535 in decimal; the host is never empty (but see
`default_host`) and holds no whitespace, control character or bracket, so it can
go into a log line or an SMTP client's connect as it is.  Surrounding whitespace
is ignored.

Without brackets, more than one colon is refused unless the caller passes
`bare_ipv6`: in "::1:25" nobody can tell whether 25 is the port or the address's
last group, so a relay or a scanner must be written "[::1]:25".  Only the DNS name
servers take bare IPv6 addresses, since they are addresses and never names (as in
resolv.conf), and their port is rarely given.

Every problem is a ValueError whose text words it; callers put their
own setting's name before it.
"""

from __future__ import annotations

import re

__all__ = ["split_host_port"]

_HOST = re.compile(r"[^\s\x00-\x1f\x7f\[\]]+")
_PORT = re.compile(r"[0-9]{1,5}")


def split_host_port(text: str, *, default_port: int | None = None,
                    default_host: str | None = None, bare_ipv6: bool = False
                    ) -> tuple[str, int]:
    """(host, port) from `text`; ValueError when it is none of the forms above.

    `default_port` is used when `text` names no port (without one, a port is
    required); `default_host` when it is only `:port` (without one, a host is
    required).  Brackets are taken off the host.
    """
    host, port = _split(text.strip(), bare_ipv6)
    if not host and default_host is not None:
        host = default_host
    if not _HOST.fullmatch(host):
        raise ValueError("no host" if not host else f"bad host {host!r}")
    if port is None:
        if default_port is None:
            raise ValueError("no port")
        return host, default_port
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not 1 to 65535")
    return host, int(port)


def _split(text: str, bare_ipv6: bool) -> tuple[str, str | None]:
    """The host and the port as written (None: no port given)."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("an opening bracket without its closing one before the port")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        if not bare_ipv6:
            raise ValueError("an IPv6 address goes in brackets: [address]:port")
        return text, None  # a port needs the brackets
    host, colon, port = text.partition(":")
    return host, port if colon else None
