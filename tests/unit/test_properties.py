"""Property tests: the decision core agrees with a plain reading of its documented rules.

Random rule sets (enabled and disabled rules; full-address, domain,
leading-dot and empty recipient conditions), random Allow/Block filters and
blocklists over IPv4 and IPv6 (overlapping on purpose: values come from small
pools), and random recipients are given both to `Engine` and to the reference
model below, written as docs/ses-compatibility.md reads: linear scans over every
rule, condition and filter, with `ipaddress` for the CIDR test.  No index, no
prefix table.

Example counts come from a hypothesis profile: `mxrules-properties-ci` (the
default, seconds) or `mxrules-properties-fuzz` (MXRULES_HYPOTHESIS=fuzz, minutes).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxrules.config import Config, load
from mxrules.decision import CONTINUE, Engine
from mxrules.errors import ConfigError
from mxrules.ipfilter import parse_cidr, parse_ip
from mxrules.rules import IpFilter, Limits, Rule, RuleSet

settings.register_profile(
    "mxrules-properties-ci", max_examples=150, deadline=None, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "mxrules-properties-fuzz", max_examples=5000, deadline=None, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(
    "mxrules-properties-" + os.environ.get("MXRULES_HYPOTHESIS", "ci"))

# -- generators: small pools, so that conditions, filters and clients collide ----

DOMAINS = ["example.com", "sub.example.com", "a.sub.example.com", "example.org",
           "deep.a.sub.example.com", "xexample.com"]
LOCALS = ["user", "bob", "info", "a.b", "x_y"]


def _case(text: str) -> st.SearchStrategy[str]:
    """The text as written, upper case, or with its first letter capitalised."""
    return st.sampled_from([text, text.upper(), text[:1].upper() + text[1:]])


domains = st.sampled_from(DOMAINS).flatmap(_case)
locals_ = st.sampled_from(LOCALS).flatmap(_case)

conditions = st.one_of(
    st.builds(lambda loc, dom: f"{loc}@{dom}", locals_, domains),  # a full address
    domains,  # a domain
    domains.map(lambda d: "." + d),  # a leading-dot domain
)


@st.composite
def rule_sets(draw: st.DrawFn) -> tuple[Rule, ...]:
    count = draw(st.integers(0, 6))
    rules = []
    for i in range(count):
        rules.append(Rule(
            name=f"rule-{i}",
            enabled=draw(st.booleans()),
            recipients=tuple(draw(st.lists(conditions, max_size=4, unique=True))),
            tls_policy=draw(st.sampled_from(["Optional", "Optional", "Require"])),
        ))
    return tuple(rules)


@st.composite
def recipients(draw: st.DrawFn) -> str:
    """An envelope recipient as Postfix may hand it over, now and then malformed."""
    local = draw(locals_)
    if draw(st.booleans()):
        local += "+" + draw(st.sampled_from(["", "tag", "a+b"]))
    domain = draw(st.one_of(domains, st.sampled_from(["other.net", "com", "sub.example.com."])))
    address = draw(st.sampled_from([
        f"{local}@{domain}", f"<{local}@{domain}>", f" <{local}@{domain}> ",
        f"{local}@", f"@{domain}", local, f"+x@{domain}", f'"{local}@q"@{domain}',
    ]))
    return address


V4_POOL = ipaddress.IPv4Network("10.1.0.0/16")
V6_POOL = ipaddress.IPv6Network("2001:db8:1::/48")


@st.composite
def v4_addresses(draw: st.DrawFn) -> ipaddress.IPv4Address:
    return V4_POOL[draw(st.integers(0, 15)) * 4096 + draw(st.integers(0, 3)) * 256
                   + draw(st.sampled_from([0, 1, 7, 128, 255]))]


@st.composite
def v6_addresses(draw: st.DrawFn) -> ipaddress.IPv6Address:
    high = draw(st.integers(0, 3)) << 64
    low = draw(st.sampled_from([0, 1, 0xFFFF, 1 << 63]))
    return V6_POOL[high + low]


@st.composite
def cidrs(draw: st.DrawFn) -> str:
    """A CIDR as an operator writes it: v4, v6, IPv4-mapped v6, host bits set or not."""
    kind = draw(st.sampled_from(["v4", "v4", "v6", "mapped", "host"]))
    if kind == "v6":
        addr6 = draw(v6_addresses())
        return f"{addr6}/{draw(st.sampled_from([40, 48, 56, 64, 80, 128]))}"
    addr = draw(v4_addresses())
    if kind == "host":
        return str(addr)
    length = draw(st.sampled_from([8, 12, 16, 18, 20, 22, 24, 30, 32]))
    if kind == "mapped":
        return f"::ffff:{addr}/{96 + length}"
    return f"{addr}/{length}"


filters = st.lists(
    st.builds(IpFilter, name=st.just(""), policy=st.sampled_from(["Allow", "Block"]),
              cidr=cidrs()),
    max_size=8,
).map(lambda fs: tuple(IpFilter(f"f{i}", f.policy, f.cidr) for i, f in enumerate(fs)))

clients = st.one_of(
    v4_addresses().map(str),
    v6_addresses().map(str),
    v4_addresses().map(lambda a: f"::ffff:{a}"),  # how a dual-stack socket shows v4
    v4_addresses().map(lambda a: f"[{a}]"),
    v6_addresses().map(lambda a: f"IPv6:{a}"),
)


# -- the reference model: docs/ses-compatibility.md's matching and filters, literally -----


def ref_split(address: str) -> tuple[str, str] | None:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if "@" not in address:
        return None
    at = address.rindex("@")
    local, domain = address[:at], address[at + 1:]
    if not local or not domain:
        return None
    return local, domain.lower().rstrip(".")


def ref_managed(domain: str, managed: list[str]) -> bool:
    for entry in managed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and domain.endswith(entry):
            return True
        if domain == entry:
            return True
    return False


def ref_condition(condition: str, local: str, domain: str, fold: bool) -> bool:
    """Does one recipient condition match one (local, lower-case domain)?"""
    if "@" in condition:
        want_local, _, want_domain = condition.rpartition("@")
        if want_domain.lower().rstrip(".") != domain:
            return False
        if fold:
            local, want_local = local.lower(), want_local.lower()
        if local == want_local:
            return True
        # user@example.com also matches user+anything@example.com (Postfix's
        # recipient_delimiter: the address extension starts at the first "+").
        base = local.split("+", 1)[0]
        return "+" in local and base != "" and base == want_local
    condition = condition.lower().rstrip(".")
    if condition.startswith("."):
        return domain.endswith(condition)  # strictly below: the dot is part of the suffix
    return domain == condition


def ref_rules(rules: tuple[Rule, ...], recipient: str, fold: bool = True) -> tuple[str, ...]:
    parts = ref_split(recipient)
    if parts is None:
        return ()
    local, domain = parts
    return tuple(
        rule.name for rule in rules
        if rule.enabled and (not rule.recipients
                             or any(ref_condition(c, local, domain, fold)
                                    for c in rule.recipients)))


@dataclass(frozen=True)
class RefRcpt:
    outcome: str
    rules: tuple[str, ...]
    code: str


def ref_rcpt(rules: tuple[Rule, ...] | None, managed: list[str], recipient: str,
             tls: bool, fold: bool = True) -> RefRcpt:
    parts = ref_split(recipient)
    if parts is None or not ref_managed(parts[1], managed):
        return RefRcpt("unmanaged", (), "250")
    if rules is None:
        return RefRcpt("no-rule-set", (), "550")
    names = ref_rules(rules, recipient, fold)
    if not names:
        return RefRcpt("no-rule", (), "550")
    required = any(r.tls_policy == "Require" for r in rules if r.name in names)
    if required and not tls:
        return RefRcpt("tls-required", names, "530")
    return RefRcpt("accepted", names, "250")


def ref_host(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client address; an IPv4-mapped IPv6 address is that IPv4 host."""
    text = text.removeprefix("IPv6:").strip("[]")
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ref_contains(cidr: str, host: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        # ::ffff:a.b.c.d/(96+n) names the IPv4 block a.b.c.d/n.
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        net = ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}", strict=False)
    return host.version == net.version and host in net


def ref_connect(flts: tuple[IpFilter, ...], blocklist: Sequence[str], client: str) -> str:
    """"allow-filter" | "blocklist" | "block-filter" | "no-match": Allow wins, then the list."""
    host = ref_host(client)
    if any(f.policy == "Allow" and ref_contains(f.cidr, host) for f in flts):
        return "allow-filter"
    if any(ref_contains(c, host) for c in blocklist):
        return "blocklist"
    if any(f.policy == "Block" and ref_contains(f.cidr, host) for f in flts):
        return "block-filter"
    return "no-match"


# -- engines built straight from the model (and, once, through YAML) -------------


def engine_for(rules: tuple[Rule, ...] | None, managed: list[str],
               flts: tuple[IpFilter, ...] = (), blocklist: Sequence[str] = (),
               fold: bool = True) -> Engine:
    return Engine(Config(
        path="/dev/null", hostname="mx.example.com", domains=tuple(managed),
        local_part_case_sensitive=not fold,
        active_rule_set="default" if rules is not None else None,
        rule_sets={"default": RuleSet("default", rules)} if rules is not None else {},
        ip_filters=flts,
        blocklist=tuple((parse_cidr(c), f"list:{i}") for i, c in enumerate(blocklist)),
        limits=Limits(),
    ))


managed_lists = st.lists(
    st.sampled_from(["example.com", ".example.com", "example.org", ".sub.example.com",
                     "EXAMPLE.org."]), min_size=1, max_size=3, unique=True)


@PROFILE
@given(rules=rule_sets(), rcpts=st.lists(recipients(), min_size=1, max_size=8),
       fold=st.booleans())
def test_matching_rules_agree_with_the_reference(rules, rcpts, fold) -> None:
    engine = engine_for(rules, ["example.com", ".example.com", "example.org"], fold=fold)
    for rcpt in rcpts:
        matched = tuple(rules[i].name for i in engine.index.match(rcpt))
        assert matched == ref_rules(rules, rcpt, fold), rcpt


@PROFILE
@given(rules=st.one_of(st.none(), rule_sets()), managed=managed_lists,
       rcpts=st.lists(recipients(), min_size=1, max_size=8), tls=st.booleans())
def test_rcpt_outcome_agrees_with_the_reference(rules, managed, rcpts, tls) -> None:
    engine = engine_for(rules, managed)
    for rcpt in rcpts:
        decision = engine.rcpt(rcpt, tls=tls)
        want = ref_rcpt(rules, managed, rcpt, tls)
        assert (decision.outcome, decision.rules, decision.reply.code) == (
            want.outcome, want.rules, want.code), rcpt
        assert (decision.reply == CONTINUE) == (want.code == "250")


@PROFILE
@given(rules=rule_sets(), rcpts=st.lists(recipients(), min_size=1, max_size=8))
def test_plan_lists_each_rule_once_with_only_the_recipients_it_matched(rules, rcpts) -> None:
    """Every matching enabled rule runs, in order; receipt.recipients = its matches."""
    engine = engine_for(rules, ["example.com", ".example.com", "example.org"])
    decisions = [engine.rcpt(r, tls=True) for r in rcpts]
    plan = engine.plan(decisions)
    expected = []
    for rule in rules:
        mine = tuple(r for r in rcpts
                     if ref_rcpt(rules, ["example.com", ".example.com", "example.org"], r,
                                 True).outcome == "accepted"
                     and rule.name in ref_rules(rules, r))
        if mine:
            expected.append((rule.name, mine))
    assert [(p.rule.name, p.recipients) for p in plan] == expected


@PROFILE
@given(flts=filters, blocklist=st.lists(cidrs(), max_size=4),
       client_list=st.lists(clients, min_size=1, max_size=8))
def test_connect_agrees_with_the_reference(flts, blocklist, client_list) -> None:
    engine = engine_for((), ["example.com"], flts, blocklist)
    for client in client_list:
        decision = engine.connect(parse_ip(client))
        want = ref_connect(flts, blocklist, client)
        assert decision.filters.reason == want, client
        assert decision.filters.allowed == (want in ("allow-filter", "no-match"))
        assert decision.reply.verb == ("continue" if decision.filters.allowed else "reject")
        if not decision.filters.allowed:
            assert decision.reply.code == "554"


@PROFILE
@given(rules=rule_sets(), flts=filters, managed=managed_lists,
       rcpts=st.lists(recipients(), min_size=1, max_size=4),
       client_list=st.lists(clients, min_size=1, max_size=4))
def test_a_config_written_as_yaml_decides_like_the_model(tmp_path_factory, rules, flts,
                                                          managed, rcpts, client_list) -> None:
    """The same rules and filters through YAML, the schema and `load` decide the same."""
    doc = {
        "hostname": "mx.example.com",
        "domains": managed,
        "rule_sets": {"default": [
            {"name": r.name, "enabled": r.enabled, "recipients": list(r.recipients),
             "tls_policy": r.tls_policy} for r in rules]},
        "ip_filters": [{"name": f.name, "policy": f.policy, "cidr": f.cidr} for f in flts],
    }
    path = tmp_path_factory.mktemp("cfg") / "mxrules.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        engine = Engine(load(str(path)))
    except ConfigError as exc:  # only a rule naming an unmanaged domain may be refused
        assert "not a managed domain" in str(exc), exc
        return
    for rcpt in rcpts:
        decision = engine.rcpt(rcpt, tls=False)
        want = ref_rcpt(rules, managed, rcpt, False)
        assert (decision.outcome, decision.rules) == (want.outcome, want.rules), rcpt
    for client in client_list:
        assert engine.connect(parse_ip(client)).filters.reason == ref_connect(flts, [], client)


def test_reference_model_reads_the_spec_examples() -> None:
    """The reference itself, on the documented examples, so a wrong model cannot pass quietly."""
    rules = (Rule("r", enabled=True, recipients=("user@example.com",)),
             Rule("d", enabled=True, recipients=("example.com",)),
             Rule("s", enabled=True, recipients=(".example.com",)),
             Rule("off", enabled=False),
             Rule("all", enabled=True))
    assert ref_rules(rules, "user+anything@example.com") == ("r", "d", "all")
    assert ref_rules(rules, "USER@Example.COM") == ("r", "d", "all")
    assert ref_rules(rules, "user@a.example.com") == ("s", "all")
    assert ref_rules(rules, "nobody@xexample.com") == ("all",)
    assert ref_connect((IpFilter("a", "Allow", "10.0.0.1"), IpFilter("b", "Block", "10.0.0.0/8")),
                       ["10.0.0.0/24"], "::ffff:10.0.0.1") == "allow-filter"
    assert ref_connect((IpFilter("b", "Block", "10.0.0.0/8"),), ["10.0.0.0/24"],
                       "10.0.0.2") == "blocklist"
    assert ref_connect((IpFilter("b", "Block", "::ffff:10.0.0.0/104"),), [],
                       "10.9.9.9") == "block-filter"
