"""The one host:port parser, as each of its readers calls it.

Scanners (`parse_address`), the bounce relay (`parse_relay`, port 25 by default),
the metrics listeners (`split_host_port(..., default_host="127.0.0.1")`) and the DNS
name servers (`parse_nameserver`: port 53, bare IPv6 addresses, IP addresses only)
each get one row per form they meet.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from mxrules.actions.bounce import parse_relay
from mxrules.hostport import split_host_port
from mxrules.scan.auth import parse_nameserver
from mxrules.scan.transport import ScannerError, parse_address

Parse = Callable[[str], object]

SCANNER: Parse = parse_address
RELAY: Parse = parse_relay
METRICS: Parse = partial(split_host_port, default_host="127.0.0.1")
NAMESERVER: Parse = parse_nameserver


@pytest.mark.parametrize(("parse", "text", "expected"), [
    pytest.param(SCANNER, "127.0.0.1:783", ("127.0.0.1", 783), id="scanner-v4"),
    pytest.param(SCANNER, "spamd.example:783", ("spamd.example", 783), id="scanner-name"),
    pytest.param(SCANNER, "[::1]:3310", ("::1", 3310), id="scanner-v6"),
    pytest.param(SCANNER, "unix:/run/clamd.sock", "/run/clamd.sock", id="scanner-unix"),
    pytest.param(RELAY, "127.0.0.1:25", ("127.0.0.1", 25), id="relay-v4"),
    pytest.param(RELAY, "relay.example.com", ("relay.example.com", 25), id="relay-default-port"),
    pytest.param(RELAY, " relay.example.com:2525 ", ("relay.example.com", 2525), id="relay-spaces"),
    pytest.param(RELAY, "[::1]", ("::1", 25), id="relay-v6-default-port"),
    pytest.param(RELAY, "[::1]:587", ("::1", 587), id="relay-v6"),
    pytest.param(METRICS, "127.0.0.1:9901", ("127.0.0.1", 9901), id="metrics-v4"),
    pytest.param(METRICS, ":9901", ("127.0.0.1", 9901), id="metrics-default-host"),
    pytest.param(METRICS, "[::]:9901", ("::", 9901), id="metrics-v6"),
    pytest.param(NAMESERVER, "192.0.2.53", ("192.0.2.53", 53), id="ns-default-port"),
    pytest.param(NAMESERVER, "192.0.2.53:5353", ("192.0.2.53", 5353), id="ns-port"),
    pytest.param(NAMESERVER, "2001:db8::53", ("2001:db8::53", 53), id="ns-bare-v6"),
    pytest.param(NAMESERVER, "[2001:db8::53]:5353", ("2001:db8::53", 5353), id="ns-v6-port"),
])
def test_parses(parse: Parse, text: str, expected: object) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(("parse", "text", "words"), [
    pytest.param(SCANNER, "127.0.0.1", "no port", id="scanner-no-port"),
    pytest.param(SCANNER, "127.0.0.1:0", "not 1 to 65535", id="scanner-port-0"),
    pytest.param(SCANNER, "127.0.0.1:99999", "not 1 to 65535", id="scanner-port-high"),
    pytest.param(SCANNER, "::1:783", "brackets", id="scanner-bare-v6"),
    pytest.param(SCANNER, "unix:", "no socket path", id="scanner-unix-empty"),
    pytest.param(SCANNER, "[::1:783", "closing", id="scanner-open-bracket"),
    pytest.param(RELAY, "", "no host", id="relay-empty"),
    pytest.param(RELAY, "host:", "not 1 to 65535", id="relay-empty-port"),
    pytest.param(RELAY, "host:port", "not 1 to 65535", id="relay-port-text"),
    pytest.param(RELAY, "::1:25", "brackets", id="relay-bare-v6"),
    pytest.param(RELAY, "a b:25", "bad host", id="relay-space-in-host"),
    pytest.param(RELAY, "host:25\r\nRSET", "not 1 to 65535", id="relay-crlf"),
    pytest.param(RELAY, "[]:25", "no host", id="relay-empty-brackets"),
    pytest.param(RELAY, "[::1]x", "closing", id="relay-junk-after-bracket"),
    pytest.param(METRICS, "127.0.0.1", "no port", id="metrics-no-port"),
    pytest.param(NAMESERVER, "192.0.2.53:dns", "not 1 to 65535", id="ns-port-text"),
    pytest.param(NAMESERVER, "[2001:db8::53", "closing", id="ns-open-bracket"),
    pytest.param(NAMESERVER, "", "no host", id="ns-empty"),
    pytest.param(NAMESERVER, "ns.example.com", "does not appear to be an IP", id="ns-name"),
    pytest.param(NAMESERVER, "192.0.2.53:0", "not 1 to 65535", id="ns-port-0"),
    pytest.param(NAMESERVER, "[::1]:", "not 1 to 65535", id="ns-empty-port"),
])
def test_refuses(parse: Parse, text: str, words: str) -> None:
    with pytest.raises((ValueError, ScannerError), match=words):
        parse(text)
