"""A real authoritative DNS server on loopback for the SPF/DKIM/DMARC tests.

Zones are Python data, name -> type -> values, and may change between tests::

    server = DnsServer({"example.com": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
                        "mail.example.com": {"A": ["192.0.2.1"], "MX": ["10 mx.example.com"]}})
    server.start()
    server.set("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    server.address        # "127.0.0.1:<port>", what DnsSettings.nameservers takes

It answers UDP and TCP on the same port (dnslib's DNSServer with a resolver over the
records): names it holds answer NOERROR (empty when the type is missing), others
NXDOMAIN; names in `servfail` answer SERVFAIL. `blackhole = True` makes it read every
query and answer none, as a dead server does. `queries` records what was asked, so a
test can prove a lookup went here and not to the system resolver.
"""

from __future__ import annotations

import atexit
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import DNSHandler, DNSServer

from harness.ports import free_port

Zones = Mapping[str, Mapping[str, Sequence[str]]]

TTL = 60


@dataclass(frozen=True)
class Query:
    name: str  # lower case, no trailing dot
    qtype: str  # "TXT", "A", ...
    protocol: str  # "udp" or "tcp"


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _rdata(qtype: str, value: str) -> Any:
    if qtype == "A":
        return A(value)
    if qtype == "AAAA":
        return AAAA(value)
    if qtype == "MX":
        preference, _, exchange = value.partition(" ")
        return MX(exchange, int(preference))
    if qtype == "CNAME":
        return CNAME(value)
    if qtype == "TXT":
        # One TXT record holds character-strings of at most 255 bytes (RFC 1035 §3.3.14);
        # longer values (a 2048-bit DKIM key) are split, as zone files do.
        raw = value.encode()
        return TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    raise ValueError(f"unsupported record type {qtype}")


class _Resolver:
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = _key(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.server.lock:
            self.server.queries.append(Query(name, qtype, handler.protocol))
            if name in self.server.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = self.server.records.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            values = list(records.get(qtype, ()))
            cname = list(records.get("CNAME", ()))
        reply.header.aa = 1
        qname = request.q.qname
        for value in values:
            reply.add_answer(RR(qname, getattr(QTYPE, qtype), rdata=_rdata(qtype, value),
                                ttl=TTL))
        if not values and cname and qtype != "CNAME":
            reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(cname[0]), ttl=TTL))
        return reply


class _Handler(DNSHandler):
    def handle(self) -> None:
        server: DnsServer = self.server.zone_server  # set by DnsServer._bind
        if server.blackhole:
            tcp = self.server.socket_type == socket.SOCK_STREAM
            with server.lock:
                server.queries.append(Query("", "", "tcp" if tcp else "udp"))
            if tcp:
                # Hold the connection open and silent, as a hung server does, until the
                # black hole ends or the server stops.
                server.answering.wait(60)
            return  # read and dropped: the client waits for an answer that never comes
        super().handle()


class _QuietLogger:
    """dnslib prints every query by default; tests read `queries` instead."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class DnsServer:
    def __init__(self, zones: Zones | None = None) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, dict[str, list[str]]] = {}
        self.servfail: set[str] = set()
        self.answering = threading.Event()
        self.answering.set()
        self.queries: list[Query] = []
        self.port = 0
        self._servers: list[DNSServer] = []
        self.load(zones or {})

    # -- records

    def load(self, zones: Zones) -> None:
        """Replace every record, forget past queries, answer again."""
        with self.lock:
            self.records = {_key(n): {t.upper(): list(v) for t, v in types.items()}
                            for n, types in zones.items()}
            self.servfail = set()
            self.queries = []
        self.blackhole = False

    @property
    def blackhole(self) -> bool:
        """True: every query is read and none answered."""
        return not self.answering.is_set()

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        if on:
            self.answering.clear()
        else:
            self.answering.set()

    def set(self, name: str, qtype: str, values: Sequence[str]) -> None:
        with self.lock:
            self.records.setdefault(_key(name), {})[qtype.upper()] = list(values)

    def remove(self, name: str) -> None:
        with self.lock:
            self.records.pop(_key(name), None)

    def asked(self, qtype: str | None = None) -> list[str]:
        """The names queried so far (of one type, if given)."""
        with self.lock:
            return [q.name for q in self.queries if qtype is None or q.qtype == qtype]

    # -- life cycle

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        last: OSError | None = None
        for _ in range(20):
            port = free_port()  # free for TCP; UDP on the same number is tried below
            try:
                servers = [self._bind(port, tcp=False), self._bind(port, tcp=True)]
            except OSError as exc:
                last = exc
                self._close()
                continue
            for server in servers:
                server.start_thread()
            self.port = port
            return
        raise RuntimeError(f"no port for the test DNS server: {last}")

    def _bind(self, port: int, *, tcp: bool) -> DNSServer:
        server = DNSServer(_Resolver(self), address="127.0.0.1", port=port, tcp=tcp,
                           logger=_QuietLogger(), handler=_Handler)
        server.server.zone_server = self  # how the handler finds its records
        self._servers.append(server)
        return server

    def _close(self) -> None:
        for server in self._servers:
            server.server.server_close()
        self._servers = []

    def stop(self) -> None:
        self.answering.set()  # release held TCP connections
        for server in self._servers:
            if getattr(server, "thread", None) is not None:
                server.server.shutdown()
        self._close()
        self.port = 0


_SHARED: list[DnsServer] = []


def shared_server() -> DnsServer:
    """One local server for the whole process, knowing no name, started on first use.

    mxrules authenticates every message: a milter started by the harness asks this
    server (NXDOMAIN, at once) unless its config names another, so no test or
    benchmark waits on the host's resolver or the Internet.
    """
    if not _SHARED:
        server = DnsServer()
        server.start()
        atexit.register(server.stop)
        _SHARED.append(server)
    return _SHARED[0]


@contextmanager
def dns_server(zones: Zones | None = None) -> Iterator[DnsServer]:
    server = DnsServer(zones)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class DkimKey:
    """An RSA key pair made for a run: `pem` for dkim.sign, `record` for the selector's TXT."""

    pem: bytes
    record: str

    def sign(self, msg: bytes, selector: str, domain: str,
             headers: Sequence[bytes] = (b"from", b"to", b"subject", b"message-id")) -> bytes:
        """`msg` with a DKIM-Signature (dkimpy's default c=relaxed/simple) on top."""
        import dkim

        signature: bytes = dkim.sign(msg, selector.encode(), domain.encode(), self.pem,
                                     include_headers=list(headers))
        return signature + msg


def make_dkim_key() -> DkimKey:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return DkimKey(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())
