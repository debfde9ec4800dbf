"""A trusted forwarder's connection and messages: the decisions the milter and explain share."""

from __future__ import annotations

import textwrap

import pytest

from mxrules import forwarded
from mxrules.config import load
from mxrules.decision import Engine
from mxrules.ipfilter import parse_ip

CONFIG = """\
hostname: mx.example.com
domains: [example.com]
trusted_forwarders: [192.0.2.10/32, 192.0.2.11/32]
ip_filters:
  - {name: relays-too, policy: Block, cidr: 192.0.2.0/24}
  - {name: bad-net, policy: Block, cidr: 198.51.100.0/24}
"""


@pytest.fixture
def engine(tmp_path) -> Engine:
    path = tmp_path / "mxrules.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return Engine(load(str(path)))


def _received(helo: str, ip: str) -> bytes:
    # Postfix smtpd's form.
    return f" from {helo} (unknown [{ip}])\r\n\tby relay.example.com (Postfix) with ESMTP".encode()


@pytest.mark.parametrize(("client", "verb", "reason", "is_forwarder"), [
    # A forwarder inside a Block filter is still let in: its messages are judged.
    pytest.param("192.0.2.10", "continue", "trusted-forwarder", True, id="forwarder"),
    pytest.param("192.0.2.20", "reject", "block-filter", False, id="blocked-client"),
    pytest.param("203.0.113.5", "continue", "no-match", False, id="other-client"),
])
def test_connect(engine: Engine, client: str, verb: str, reason: str,
                 is_forwarder: bool) -> None:
    decision = forwarded.connect(engine, parse_ip(client))
    assert (decision.reply.verb, decision.filters.reason) == (verb, reason)
    assert forwarded.is_forwarder(decision) is is_forwarder


@pytest.mark.parametrize(("received", "original", "blocked", "unresolved"), [
    pytest.param(None, None, False, "no-received", id="no-received-header"),
    pytest.param([_received("mail.example.org", "203.0.113.5")], "203.0.113.5", False, "",
                 id="allowed-client"),
    pytest.param([_received("mail.example.org", "198.51.100.7")], "198.51.100.7", True, "",
                 id="blocked-client"),
    pytest.param([_received("relay2", "192.0.2.11"), _received("x", "198.51.100.7")],
                 "198.51.100.7", True, "", id="behind-a-second-forwarder"),
    pytest.param([_received("relay2", "192.0.2.11")], None, False, "only-trusted-hops",
                 id="only-forwarders"),
    pytest.param([b" garbage"], None, False, "unparsable-received", id="unparsable"),
])
def test_judge(engine: Engine, received: list[bytes] | None, original: str | None,
               blocked: bool, unresolved: str) -> None:
    walk = None
    if received is not None:
        walk = forwarded.received_walk(engine)
        for value in received:
            walk.add(value)
    judgement = forwarded.judge(engine, walk)
    assert (str(judgement.hop.address) if judgement.hop else None) == original
    assert (judgement.blocked is not None) is blocked
    assert judgement.unresolved == unresolved
    if blocked:
        assert judgement.blocked is not None and judgement.blocked.reply.code == "554"
