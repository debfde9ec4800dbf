"""IP address filters: parsing, Allow wins, blocklist files, longest prefix.

What SES does: docs/ses-compatibility.md, "IP address filters".
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from mxrules.errors import ConfigError
from mxrules.ipfilter import (
    FilterDecision,
    IpFilterTable,
    PrefixTable,
    load_blocklist,
    parse_cidr,
    parse_ip,
)
from mxrules.rules import IpFilter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("192.0.2.1", "192.0.2.1", id="ipv4"),
        pytest.param(" 192.0.2.1\n", "192.0.2.1", id="ipv4-whitespace"),
        pytest.param("2001:db8::1", "2001:db8::1", id="ipv6"),
        pytest.param("2001:DB8:0:0::1", "2001:db8::1", id="ipv6-uppercase-long"),
        pytest.param("::ffff:192.0.2.1", "192.0.2.1", id="ipv4-mapped-ipv6-becomes-ipv4"),
        pytest.param("::FFFF:c000:0201", "192.0.2.1", id="ipv4-mapped-hex"),
        pytest.param("[2001:db8::1]", "2001:db8::1", id="bracketed"),
        pytest.param("IPv6:2001:db8::1", "2001:db8::1", id="postfix-ipv6-prefix"),
        pytest.param("fe80::1%eth0", "fe80::1", id="scope-id-dropped"),
    ],
)
def test_parse_ip(text: str, expected: str) -> None:
    assert parse_ip(text) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("192.0.2.256", id="octet-out-of-range"),
        pytest.param("mail.example.com", id="host-name"),
        pytest.param("", id="empty"),
        pytest.param("192.0.2.0/24", id="a-network-is-not-an-address"),
    ],
)
def test_parse_ip_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ip(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("192.0.2.7", "192.0.2.7/32", id="ipv4-single-address"),
        pytest.param("10.0.0.0/8", "10.0.0.0/8", id="ipv4-block"),
        pytest.param("10.0.0.1/24", "10.0.0.0/24", id="ipv4-host-bits-as-in-ses-docs"),
        pytest.param("0.0.0.0/0", "0.0.0.0/0", id="ipv4-everything"),
        pytest.param("2001:db8::1", "2001:db8::1/128", id="ipv6-single-address"),
        pytest.param("2001:db8::/32", "2001:db8::/32", id="ipv6-block"),
        pytest.param("2001:db8::1/64", "2001:db8::/64", id="ipv6-host-bits"),
        pytest.param("::ffff:192.0.2.0/120", "192.0.2.0/24", id="ipv4-mapped-block-becomes-ipv4"),
        pytest.param("::ffff:192.0.2.9", "192.0.2.9/32", id="ipv4-mapped-address-becomes-ipv4"),
    ],
)
def test_parse_cidr(text: str, expected: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10.0.0.300/8", id="bad-octet"),
        pytest.param("10.0.0.0/33", id="ipv4-prefix-too-long"),
        pytest.param("2001:db8::/129", id="ipv6-prefix-too-long"),
        pytest.param("10.0.0.0/-1", id="negative-prefix"),
        pytest.param("example.com", id="host-name"),
        pytest.param("", id="empty"),
    ],
)
def test_parse_cidr_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cidr(text)


def _decide(
    filters: list[tuple[str, str, str]], blocklist: list[str], client: str
) -> FilterDecision:
    table = IpFilterTable(
        [IpFilter(name, policy, cidr) for name, policy, cidr in filters],  # type: ignore[arg-type]
        [(parse_cidr(c), f"bl.txt:{n}") for n, c in enumerate(blocklist, 1)],
    )
    return table.decide(parse_ip(client))


@pytest.mark.parametrize(
    ("filters", "blocklist", "client", "allowed", "reason", "name"),
    [
        # -- single addresses and blocks, both families
        pytest.param([("one", "Block", "192.0.2.7")], [], "192.0.2.7",
                     False, "block-filter", "one", id="ipv4-single-blocked"),
        pytest.param([("one", "Block", "192.0.2.7")], [], "192.0.2.8",
                     True, "no-match", None, id="ipv4-single-neighbour-passes"),
        pytest.param([("net", "Block", "198.51.100.0/24")], [], "198.51.100.255",
                     False, "block-filter", "net", id="ipv4-block-last-address"),
        pytest.param([("net", "Block", "198.51.100.0/24")], [], "198.51.101.0",
                     True, "no-match", None, id="ipv4-block-next-address-passes"),
        pytest.param([("ses-doc", "Block", "10.0.0.1/24")], [], "10.0.0.200",
                     False, "block-filter", "ses-doc", id="host-bits-cover-whole-block"),
        pytest.param([("ses-doc", "Block", "10.0.0.1/24")], [], "10.0.1.1",
                     True, "no-match", None, id="host-bits-outside-block"),
        pytest.param([("v6", "Block", "2001:db8::25")], [], "2001:db8::25",
                     False, "block-filter", "v6", id="ipv6-single-blocked"),
        pytest.param([("v6", "Block", "2001:db8::25")], [], "2001:db8::26",
                     True, "no-match", None, id="ipv6-single-neighbour-passes"),
        pytest.param([("v6net", "Block", "2001:db8:1::/48")], [], "2001:db8:1:ffff::1",
                     False, "block-filter", "v6net", id="ipv6-block"),
        pytest.param([("v6net", "Block", "2001:db8:1::/48")], [], "2001:db8:2::1",
                     True, "no-match", None, id="ipv6-outside-block"),
        pytest.param([("v6host", "Block", "2001:db8:1::1/48")], [], "2001:db8:1:2::3",
                     False, "block-filter", "v6host", id="ipv6-host-bits"),
        # -- families never cross
        pytest.param([("all4", "Block", "0.0.0.0/0")], [], "2001:db8::1",
                     True, "no-match", None, id="ipv4-everything-does-not-block-ipv6"),
        pytest.param([("all6", "Block", "::/0")], [], "192.0.2.1",
                     True, "no-match", None, id="ipv6-everything-does-not-block-ipv4"),
        # -- IPv4-mapped IPv6 client addresses are judged as IPv4
        pytest.param([("v4", "Block", "192.0.2.0/24")], [], "::ffff:192.0.2.44",
                     False, "block-filter", "v4", id="mapped-client-hits-ipv4-filter"),
        pytest.param([("v4", "Allow", "192.0.2.0/24"), ("all", "Block", "0.0.0.0/0")], [],
                     "::ffff:192.0.2.44", True, "allow-filter", "v4",
                     id="mapped-client-hits-ipv4-allow"),
        pytest.param([("mapped", "Block", "::ffff:192.0.2.0/120")], [], "192.0.2.44",
                     False, "block-filter", "mapped", id="mapped-filter-hits-ipv4-client"),
        # -- longest prefix names the filter
        pytest.param([("wide", "Block", "10.0.0.0/8"), ("narrow", "Block", "10.1.2.0/24")], [],
                     "10.1.2.3", False, "block-filter", "narrow", id="most-specific-block-named"),
        pytest.param([("narrow", "Block", "10.1.2.0/24"), ("wide", "Block", "10.0.0.0/8")], [],
                     "10.9.9.9", False, "block-filter", "wide", id="wider-block-when-outside"),
        # -- Allow wins, whatever the prefix lengths
        pytest.param([("allow", "Allow", "10.0.0.0/8"), ("block", "Block", "10.1.2.3/32")], [],
                     "10.1.2.3", True, "allow-filter", "allow",
                     id="allow-wide-beats-block-narrow"),
        pytest.param([("block", "Block", "10.0.0.0/8"), ("allow", "Allow", "10.1.2.3")], [],
                     "10.1.2.3", True, "allow-filter", "allow",
                     id="allow-narrow-beats-block-wide"),
        pytest.param([("block", "Block", "10.0.0.0/8"), ("allow", "Allow", "10.1.2.3")], [],
                     "10.1.2.4", False, "block-filter", "block",
                     id="narrow-allow-does-not-cover-neighbour"),
        pytest.param([("allow", "Allow", "10.0.0.0/8")], ["10.1.2.3/32"], "10.1.2.3",
                     True, "allow-filter", "allow", id="allow-wide-beats-blocklist-narrow"),
        pytest.param([("allow", "Allow", "10.1.2.3")], ["0.0.0.0/0"], "10.1.2.3",
                     True, "allow-filter", "allow", id="allow-narrow-beats-blocklist-all"),
        pytest.param([("allow", "Allow", "10.1.2.3")], ["0.0.0.0/0"], "10.1.2.4",
                     False, "blocklist", "bl.txt:1", id="blocklist-blocks-the-rest"),
        pytest.param([("allow", "Allow", "2001:db8::/32"), ("block", "Block", "2001:db8::1")],
                     ["2001:db8::/64"], "2001:db8::1", True, "allow-filter", "allow",
                     id="ipv6-allow-wins"),
        pytest.param([("allow", "Allow", "2001:db8::1"), ("block", "Block", "::/0")],
                     ["2001:db8::/32"], "2001:db8::1", True, "allow-filter", "allow",
                     id="ipv6-narrow-allow-wins"),
        # -- the built-in list is checked before the user's Block filters
        pytest.param([("block", "Block", "203.0.113.0/24")], ["203.0.113.5"], "203.0.113.5",
                     False, "blocklist", "bl.txt:1", id="blocklist-before-block-filter"),
        pytest.param([("block", "Block", "203.0.113.0/24")], ["198.51.100.0/24"],
                     "203.0.113.5", False, "block-filter", "block",
                     id="block-filter-when-blocklist-misses"),
        # -- an Allow filter alone does not refuse anyone else
        pytest.param([("allow", "Allow", "192.0.2.0/24")], [], "198.51.100.1",
                     True, "no-match", None, id="allow-only-does-not-block-others"),
        pytest.param([], [], "192.0.2.1", True, "no-match", None, id="no-filters"),
    ],
)
def test_decide(
    filters: list[tuple[str, str, str]], blocklist: list[str], client: str,
    allowed: bool, reason: str, name: str | None,
) -> None:
    decision = _decide(filters, blocklist, client)
    assert (decision.allowed, decision.reason, decision.name) == (allowed, reason, name)


def test_decision_names_the_matching_cidr_and_describes_it() -> None:
    decision = _decide([("ses-doc", "Block", "10.0.0.1/24")], [], "10.0.0.9")
    assert decision.cidr == "10.0.0.0/24"
    assert decision.describe() == "Block filter ses-doc (10.0.0.0/24)"
    listed = _decide([], ["10.0.0.0/8"], "10.0.0.9")
    assert listed.describe() == "blocklist entry bl.txt:1 (10.0.0.0/8)"
    assert _decide([], [], "10.0.0.9").describe() == "no IP filter or blocklist matches"


# -- blocklist files -----------------------------------------------------------

BLOCKLIST = """\
# spammers we have met
192.0.2.1
198.51.100.0/24   # a whole block

   203.0.113.9/24
2001:db8:bad::/48
# 10.0.0.0/8 is commented out
::ffff:192.0.2.128/121
"""


def test_load_blocklist_parses_entries_and_comments(tmp_path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text(BLOCKLIST)
    entries = load_blocklist(str(path))
    assert entries == [
        (ipaddress.ip_network("192.0.2.1/32"), f"{path}:2"),
        (ipaddress.ip_network("198.51.100.0/24"), f"{path}:3"),
        (ipaddress.ip_network("203.0.113.0/24"), f"{path}:5"),
        (ipaddress.ip_network("2001:db8:bad::/48"), f"{path}:6"),
        (ipaddress.ip_network("192.0.2.128/25"), f"{path}:8"),
    ]


def test_blocklist_entry_names_its_file_and_line(tmp_path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text(BLOCKLIST)
    table = IpFilterTable((), load_blocklist(str(path)))
    decision = table.decide(parse_ip("::ffff:192.0.2.200"))
    assert (decision.allowed, decision.reason, decision.name) == (False, "blocklist", f"{path}:8")
    assert table.decide(parse_ip("10.1.1.1")).allowed


def test_load_blocklist_reports_every_bad_line_as_file_line(tmp_path) -> None:
    path = tmp_path / "bl.txt"
    path.write_text("192.0.2.1\n# fine\n10.0.0.300\n198.51.100.0/24\nnot-an-ip  # nope\n")
    with pytest.raises(ConfigError) as info:
        load_blocklist(str(path))
    problems = info.value.problems
    assert [p.file for p in problems] == [f"{path}:3", f"{path}:5"]
    assert all("not an address or CIDR" in p.message for p in problems)
    assert f"{path}:3: not an address or CIDR" in str(info.value)


def test_load_blocklist_missing_file(tmp_path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(ConfigError) as info:
        load_blocklist(str(path))
    (problem,) = info.value.problems
    assert problem.file == str(path)
    assert "cannot read blocklist" in problem.message


def test_load_blocklist_from_text_and_empty() -> None:
    assert load_blocklist("inline", "# only a comment\n\n") == []
    assert load_blocklist("inline", "2001:db8::1") == [
        (ipaddress.ip_network("2001:db8::1/128"), "inline:1")]


# -- the longest-prefix table ----------------------------------------------------

def test_prefix_table_first_entry_for_a_network_keeps_its_name() -> None:
    table: PrefixTable[str] = PrefixTable()
    table.add(parse_cidr("10.0.0.0/8"), "first")
    table.add(parse_cidr("10.1.2.3/8"), "second")  # the same network, written otherwise
    table.add(parse_cidr("10.0.0.0/16"), "longer")
    assert len(table) == 2
    assert table.lookup(parse_ip("10.9.0.1")) == (ipaddress.ip_network("10.0.0.0/8"), "first")
    assert table.lookup(parse_ip("10.0.5.1")) == (ipaddress.ip_network("10.0.0.0/16"), "longer")
    assert table.lookup(parse_ip("11.0.0.1")) is None
    assert table.lookup(parse_ip("2001:db8::1")) is None


FIRST_OCTETS = [n for n in range(1, 224) if n != 100]


def _random_network(rng: random.Random, v6: bool) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A random block clear of 100.0.0.0/8 and 2001:db8:ff00::/40 (the nested test blocks)."""
    if v6:
        length = rng.choice([16, 24, 32, 40, 48, 56, 64, 96, 112, 127, 128])
        if length < 32:
            number = rng.getrandbits(128) & ~(1 << 125)  # below 2000::/3: not 2001:db8::
        else:
            number = (0x2001_0DB8 << 96) | (rng.randrange(0xFF) << 88) | rng.getrandbits(88)
        mask = ((1 << length) - 1) << (128 - length)
        return ipaddress.IPv6Network((number & mask, length))
    length = rng.randint(8, 32)
    number = (rng.choice(FIRST_OCTETS) << 24) | rng.getrandbits(24)
    mask = ((1 << length) - 1) << (32 - length)
    return ipaddress.IPv4Network((number & mask, length))


def _reference(labels: dict, addr) -> str | None:
    """The answer worked out another way: the longest supernet of addr that is listed."""
    for length in range(addr.max_prefixlen, -1, -1):
        label = labels.get(ipaddress.ip_network((addr, length), strict=False))
        if label is not None:
            return label
    return None


def test_lookup_in_a_table_of_100000_cidrs_finds_the_longest_prefix() -> None:
    rng = random.Random(20260101)
    # Nested blocks where the answer is known: each level inside the one before.
    nested = ["100.64.0.0/10", "100.64.0.0/16", "100.64.7.0/24", "100.64.7.128/25",
              "100.64.7.200/32", "2001:db8:ff00::/40", "2001:db8:ff00:1::/64",
              "2001:db8:ff00:1::1/128", "0.0.0.0/1", "::/1"]
    distinct = {ipaddress.ip_network(n): None for n in nested}
    while len(distinct) < 100_000:
        distinct.setdefault(_random_network(rng, v6=rng.random() < 0.3))
    networks = list(distinct)
    rng.shuffle(networks)
    blocklist = [(net, f"entry-{i}") for i, net in enumerate(networks)]
    table = IpFilterTable((), blocklist)
    assert len(table.blocklist) == 100_000

    labels = {net: label for net, label in blocklist}
    probes = [rng.choice(networks) for _ in range(400)]
    addresses = [
        ipaddress.ip_address(int(net.network_address) + rng.randrange(net.num_addresses))
        for net in probes
    ]
    addresses += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(200)]
    addresses += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(100)]
    for addr in addresses:
        hit = table.blocklist.lookup(addr)
        assert (hit[1] if hit else None) == _reference(labels, addr), addr

    known = {
        "100.64.7.200": "100.64.7.200/32",
        "100.64.7.201": "100.64.7.128/25",
        "100.64.7.1": "100.64.7.0/24",
        "100.64.8.1": "100.64.0.0/16",
        "100.65.0.1": "100.64.0.0/10",
        "2001:db8:ff00:1::1": "2001:db8:ff00:1::1/128",
        "2001:db8:ff00:1::2": "2001:db8:ff00:1::/64",
        "2001:db8:ff00:2::2": "2001:db8:ff00::/40",
    }
    for client, cidr in known.items():
        decision = table.decide(parse_ip(client))
        assert (decision.allowed, decision.reason, decision.cidr) == (False, "blocklist", cidr)
        assert decision.name == f"entry-{networks.index(ipaddress.ip_network(cidr))}"
