"""Loading and checking /etc/mxrules/mxrules.yaml.

A config is read whole, checked whole (JSON Schema first, then what a schema
cannot say: duplicate names, CIDRs, limits, references between keys) and
either returned as an immutable `Config` or refused with a `ConfigError`
naming every problem as `file:line: path.in.yaml: what is wrong`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import ses
from .configschema import Loader, default, dotted, line_of, schema, schema_problems, value
from .errors import ConfigError, ConfigProblem, read_config_file
from .ipfilter import IPNetwork, load_blocklist, parse_cidr
from .matching import ManagedDomains, condition_domain
from .rules import IpFilter, Limits, Rule, RuleSet
from .settings import (
    AwsSettings,
    ScannerSettings,
    ScanSettings,
    WorkerSettings,
    aws_settings,
    optional,
    read,
    scan_settings,
    setting,
    worker_settings,
)
from .verdicts import SCANNED

__all__ = ["DEFAULT_PATH", "AwsSettings", "Config", "ScanSettings", "ScannerSettings",
           "WorkerSettings", "default", "dotted", "load", "schema"]

DEFAULT_PATH = "/etc/mxrules/mxrules.yaml"
SCAN_EOM_BUDGET = 270  # seconds: Postfix's milter_content_timeout (300) less a margin


@dataclass(frozen=True, eq=False)
class Config:
    path: str
    hostname: str = "localhost"
    milter_listen: str = setting("milter.listen")
    milter_timeout: int = setting("milter.timeout")
    reload_interval: float = setting("milter.reload_interval")
    socket_mode: str | None = optional("milter.socket_mode")
    metrics_listen: str = setting("metrics.milter_listen")
    log_level: str = setting("logging.level")
    spool_directory: str = setting("spool.directory")
    domains: tuple[str, ...] = ()
    local_part_case_sensitive: bool = setting("local_part_case_sensitive")
    active_rule_set: str | None = None
    rule_sets: Mapping[str, RuleSet] = field(default_factory=dict)
    ip_filters: tuple[IpFilter, ...] = ()
    blocklist: tuple[tuple[IPNetwork, str], ...] = ()
    trusted_forwarders: tuple[str, ...] = ()
    forwarder_unresolved: str = setting("forwarder_unresolved")  # tempfail or reject
    delivery: str = setting("delivery")
    # A recipient whose rules would only bounce it is refused at RCPT instead.
    bounce_reject_at_rcpt: bool = setting("bounce.reject_at_rcpt")
    max_message_size: int = setting("max_message_size")
    limits: Limits = field(default_factory=Limits)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    files: tuple[str, ...] = ()  # every file read, for the reload watcher

    @property
    def active(self) -> RuleSet | None:
        return self.rule_sets.get(self.active_rule_set) if self.active_rule_set else None



# -- loading ----------------------------------------------------------------

def load(path: str = DEFAULT_PATH, text: str | None = None) -> Config:
    """Read, check and compile a config file; raises ConfigError listing every problem."""
    path = os.path.abspath(path)
    if text is None:
        text = read_config_file(path)
    try:
        node = yaml.compose(text, Loader=Loader)
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(where, "", f"not valid YAML: {problem}")]) from None
    except RecursionError:  # `[[[[...` or thousands of indents: PyYAML recurses per level
        raise ConfigError([ConfigProblem(path, "", "not valid YAML: nested too deeply")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(path, "", "must be a mapping of keys to values")])
    problems = schema_problems(data, path, node)
    if problems:
        raise ConfigError(problems)
    return _build(path, data, node)


def _check_scan(data: dict[str, Any], problem: Any) -> None:
    """What the schema cannot say about scanners: usable addresses and name servers.

    Found here, a mistake is a config error at load; found at end of data, it
    would be a 451 or a PROCESSING_FAILED for every message.
    """
    from .scan.transport import ScannerError, parse_address

    scan = data.get("scan", {})
    for kind in SCANNED:
        raw = scan.get(kind) or {}
        if "address" in raw:
            try:
                parse_address(raw["address"])
            except ScannerError as exc:
                problem(["scan", kind, "address"], str(exc))
    dns = scan.get("dns") or {}
    if dns.get("nameservers"):
        from .scan.auth import DnsSettings  # dnspython and friends: only when asked for

        try:
            DnsSettings(tuple(dns["nameservers"]), value(data, "scan.dns.timeout"))
        except ValueError as exc:
            problem(["scan", "dns", "nameservers"], str(exc))
    # Waiting for a scan slot and scanning both happen at end of data, where Postfix
    # waits 300 s (milter_content_timeout) before it gives up on the milter; 30 s of
    # that are left for storing the job.
    waited = value(data, "scan.wait_timeout") + value(data, "scan.timeout")
    if waited > SCAN_EOM_BUDGET:
        problem(["scan", "wait_timeout"],
                f"scan.wait_timeout + scan.timeout is {waited:g} s, more than {SCAN_EOM_BUDGET} s "
                "(Postfix waits 300 s for end of data)")


@dataclass
class _Loading:
    """One load under way: the file, its YAML nodes, the files it names, the problems found."""

    path: str
    node: yaml.Node | None
    files: list[str]
    problems: list[ConfigProblem] = field(default_factory=list)

    def here(self, tokens: list[str | int]) -> str:
        line = line_of(self.node, tokens)
        return f"{self.path}:{line}" if line else self.path

    def problem(self, tokens: list[str | int], message: str) -> None:
        self.problems.append(ConfigProblem(self.here(tokens), dotted(tokens), message))

    def named_file(self, name: str) -> str:
        """A file the config names, relative to it; the reload watcher watches it too."""
        full = os.path.join(os.path.dirname(self.path), name)
        self.files.append(full)
        return full


def _build(path: str, data: dict[str, Any], node: yaml.Node | None) -> Config:
    ld = _Loading(path, node, [path])
    limits = Limits(**data.get("limits", {}))
    rule_sets = _rule_sets(ld, data, limits)
    active = _active_rule_set(ld, data, rule_sets)
    domains = _domains(ld, data, rule_sets)
    filters = _ip_filters(ld, data, limits)
    blocklist = _blocklist(ld, data)
    _check_forwarders(ld, data)
    _check_scan(data, ld.problem)
    if ld.problems:
        raise ConfigError(ld.problems)

    settings = read(Config, data)
    # A relative spool directory is relative to the config file.
    settings["spool_directory"] = os.path.join(os.path.dirname(path), settings["spool_directory"])
    return Config(
        path=path,
        **settings,
        hostname=data.get("hostname") or socket.getfqdn(),
        domains=domains,
        active_rule_set=active,
        rule_sets=rule_sets,
        ip_filters=tuple(filters),
        blocklist=tuple(blocklist),
        trusted_forwarders=tuple(data.get("trusted_forwarders", [])),
        limits=limits,
        worker=worker_settings(data),
        aws=aws_settings(data),
        scan=scan_settings(data),
        files=tuple(ld.files),
    )


def _raw_rule_sets(ld: _Loading, data: dict[str, Any]
                   ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Rule sets as dicts, YAML then an SES export, and where each came from."""
    raw_sets: dict[str, list[dict[str, Any]]] = dict(data.get("rule_sets") or {})
    origin: dict[str, str] = {name: "yaml" for name in raw_sets}
    if "rule_set_file" in data:
        ses_file = ld.named_file(data["rule_set_file"])
        try:
            name, rules = ses.rule_set_from_ses(ses.read_json(ses_file), ses_file)
        except ConfigError as exc:
            ld.problems.extend(exc.problems)
        else:
            ses_problems = []
            for i, ses_rule in enumerate(rules):
                ses_problems += schema_problems(
                    ses_rule, ses_file, None, sub="rule",
                    spell=lambda t, i=i: ses.ses_path([i, *t]))
            if name in raw_sets:
                ld.problem(["rule_set_file"], f"rule set {name!r} from {ses_file} "
                           "is also defined under rule_sets")
            ld.problems.extend(ses_problems)
            if not ses_problems:
                raw_sets[name] = rules
                origin[name] = ses_file
    return raw_sets, origin


def _rule_sets(ld: _Loading, data: dict[str, Any], limits: Limits) -> dict[str, RuleSet]:
    raw_sets, origin = _raw_rule_sets(ld, data)
    return {name: _rule_set(ld, name, rule_dicts, origin[name], limits)
            for name, rule_dicts in raw_sets.items()}


def _rule_set(ld: _Loading, set_name: str, rule_dicts: list[dict[str, Any]], src: str,
              limits: Limits) -> RuleSet:
    """One rule set, checked against SES's limits and for duplicate rule names."""
    problems = ld.problems
    prefix: list[str | int] = ["rule_sets", set_name]

    def where(tokens: list[str | int]) -> tuple[str, str]:
        if src == "yaml":
            return ld.here([*prefix, *tokens]), dotted([*prefix, *tokens])
        return src, ses.ses_path(tokens)

    rule_list = [Rule.from_config(r) for r in rule_dicts]
    if len(rule_list) > limits.rules_per_rule_set:
        f, p = where([])
        problems.append(ConfigProblem(
            f, p, f"{len(rule_list)} rules, more than the limit of "
            f"{limits.rules_per_rule_set} (limits.rules_per_rule_set)"))
    seen: dict[str, int] = {}
    for i, rule in enumerate(rule_list):
        if rule.name in seen:
            f, p = where([i, "name"])
            problems.append(ConfigProblem(f, p, f"duplicate rule name {rule.name!r} "
                                          f"(also rule {seen[rule.name]})"))
        seen.setdefault(rule.name, i)
        if len(rule.recipients) > limits.recipients_per_rule:
            f, p = where([i, "recipients"])
            problems.append(ConfigProblem(f, p, f"{len(rule.recipients)} recipients, more than "
                                          f"the limit of {limits.recipients_per_rule}"))
        if len(rule.actions) > limits.actions_per_rule:
            f, p = where([i, "actions"])
            problems.append(ConfigProblem(f, p, f"{len(rule.actions)} actions, more than "
                                          f"the limit of {limits.actions_per_rule}"))
    return RuleSet(set_name, tuple(rule_list))


def _active_rule_set(ld: _Loading, data: dict[str, Any],
                     rule_sets: dict[str, RuleSet]) -> str | None:
    active: str | None = data.get("active_rule_set")
    if "active_rule_set" not in data:
        active = next(iter(rule_sets)) if len(rule_sets) == 1 else None
        if len(rule_sets) > 1:
            ld.problem([], "active_rule_set is required when there is more than one rule set "
                       f"({', '.join(sorted(rule_sets))})")
    elif active is not None and active not in rule_sets:
        known = ", ".join(sorted(rule_sets)) or "none"
        ld.problem(["active_rule_set"], f"no rule set named {active!r} (known: {known})")
    return active


def _domains(ld: _Loading, data: dict[str, Any], rule_sets: dict[str, RuleSet]
             ) -> tuple[str, ...]:
    """The managed domains: given, or every domain the rules name."""
    named = {
        condition_domain(c): (set_name, rule.name)
        for set_name, rs in rule_sets.items() for rule in rs.rules for c in rule.recipients
    }
    if "domains" not in data:
        return tuple(sorted(named))
    domains = tuple(d.lower().rstrip(".") for d in data["domains"])
    managed = ManagedDomains(domains)
    for dom, (set_name, rule_name) in sorted(named.items()):
        probe = f"x{dom}" if dom.startswith(".") else dom
        if probe not in managed:
            ld.problem(["domains"], f"rule {rule_name!r} of rule set {set_name!r} names "
                       f"{dom!r}, which is not a managed domain")
    return domains


def _ip_filters(ld: _Loading, data: dict[str, Any], limits: Limits) -> list[IpFilter]:
    """IP filters: YAML, then an SES export."""
    filters = [IpFilter(**raw) for raw in data.get("ip_filters", [])]
    for i, flt in enumerate(filters):
        try:
            parse_cidr(flt.cidr)
        except ValueError as exc:
            ld.problem(["ip_filters", i, "cidr"], f"not an address or CIDR: {exc}")
    if "ip_filter_file" in data:
        filters += _ses_ip_filters(ld, ld.named_file(data["ip_filter_file"]))
    names: dict[str, int] = {}
    for i, flt in enumerate(filters):
        if flt.name in names:
            ld.problem(["ip_filters"], f"duplicate IP filter name {flt.name!r}")
        names.setdefault(flt.name, i)
    if len(filters) > limits.ip_filters:
        ld.problem(["ip_filters"], f"{len(filters)} IP filters, more than the limit of "
                   f"{limits.ip_filters} (limits.ip_filters)")
    return filters


def _ses_ip_filters(ld: _Loading, filter_file: str) -> list[IpFilter]:
    filters: list[IpFilter] = []
    try:
        raw_filters = ses.filters_from_ses(ses.read_json(filter_file), filter_file)
    except ConfigError as exc:
        ld.problems.extend(exc.problems)
        return filters
    for i, raw_filter in enumerate(raw_filters):
        sub = schema_problems(
            {"ip_filters": [raw_filter]}, filter_file, None,
            spell=lambda t, i=i: f"Filters[{i}]" + "".join(
                f".{ses_key(x)}" for x in t[2:]))
        if not sub:
            try:
                parse_cidr(raw_filter["cidr"])
                filters.append(IpFilter(**raw_filter))
            except ValueError as exc:
                sub.append(ConfigProblem(filter_file, f"Filters[{i}].IpFilter.Cidr",
                                         f"not an address or CIDR: {exc}"))
        ld.problems.extend(sub)
    return filters


def _blocklist(ld: _Loading, data: dict[str, Any]) -> list[tuple[IPNetwork, str]]:
    blocklist: list[tuple[IPNetwork, str]] = []
    for name in data.get("blocklists", []):
        try:
            blocklist.extend(load_blocklist(ld.named_file(name)))
        except ConfigError as exc:
            ld.problems.extend(exc.problems)
    return blocklist


def _check_forwarders(ld: _Loading, data: dict[str, Any]) -> None:
    for i, cidr in enumerate(data.get("trusted_forwarders", [])):
        try:
            parse_cidr(cidr)
        except ValueError as exc:
            ld.problem(["trusted_forwarders", i], f"not an address or CIDR: {exc}")


def ses_key(token: str | int) -> str:
    if isinstance(token, int):
        return f"[{token}]"
    return {"name": "Name", "policy": "IpFilter.Policy", "cidr": "IpFilter.Cidr"}.get(
        token, token)
