"""Loading and checking /etc/mxrules/mxrules.yaml.

A config is read whole, checked whole (JSON Schema first, then what a schema
cannot say: duplicate names, CIDRs, limits, references between keys) and
either returned as an immutable `Config` or refused with a `ConfigError`
naming every problem as `file:line: path.in.yaml: what is wrong`.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from . import ses
from .errors import ConfigError, ConfigProblem, read_config_file
from .ipfilter import IPNetwork, load_blocklist, parse_cidr
from .matching import ManagedDomains, condition_domain
from .rules import IpFilter, Limits, Rule, RuleSet

DEFAULT_PATH = "/etc/mxrules/mxrules.yaml"
DEFAULT_SPOOL = "/var/spool/mxrules"
DEFAULT_MAX_SIZE = 40 * 1024 * 1024
SCAN_EOM_BUDGET = 270  # seconds: Postfix's milter_content_timeout (300) less a margin


@dataclass(frozen=True)
class WorkerSettings:
    """What `mxrules worker` and its actions need beyond the rules."""

    threads: int = 4
    scan_interval: float = 0.5
    retry_window: float = 4 * 3600.0  # SES retries for up to 4 hours
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 600.0
    drain_timeout: float = 60.0
    metrics_listen: str = "127.0.0.1:9902"
    bounce_relay: str = "127.0.0.1:25"
    smtp_timeout: float = 30.0
    # A DSN goes only to a sender SPF or aligned DMARC vouches for (no backscatter).
    bounce_require_authenticated: bool = True
    # DSNs per sender and per client IP (IPv6: per /64) in each period of seconds.
    bounce_rate_per_sender: int = 10
    bounce_rate_per_client: int = 50
    bounce_rate_period: float = 3600.0
    # Dead letters' retention (spool.failed_max_age / failed_max_size; 0: no limit).
    failed_max_age: float = 14 * 86400.0
    failed_max_size: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class AwsSettings:
    region: str | None = None
    endpoint_url: str | None = None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class ScannerSettings:
    engine: str
    address: str
    max_size: int


@dataclass(frozen=True)
class ScanSettings:
    spam: ScannerSettings | None = None
    virus: ScannerSettings | None = None
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 5.0
    timeout: float = 60.0
    on_failure: str = "accept"
    dkim_max_size: int = 10 * 1024 * 1024
    concurrency: int = 4
    wait_timeout: float = 120.0


@dataclass(frozen=True, eq=False)
class Config:
    path: str
    hostname: str = "localhost"
    milter_listen: str = "inet:9900@127.0.0.1"
    milter_timeout: int = 600
    reload_interval: float = 2.0
    socket_mode: str | None = None
    metrics_listen: str = "127.0.0.1:9901"
    log_level: str = "info"
    spool_directory: str = DEFAULT_SPOOL
    domains: tuple[str, ...] = ()
    local_part_case_sensitive: bool = False
    active_rule_set: str | None = None
    rule_sets: Mapping[str, RuleSet] = field(default_factory=dict)
    ip_filters: tuple[IpFilter, ...] = ()
    blocklist: tuple[tuple[IPNetwork, str], ...] = ()
    trusted_forwarders: tuple[str, ...] = ()
    forwarder_unresolved: str = "tempfail"  # or "reject"
    delivery: str = "consume"
    # A recipient whose rules would only bounce it is refused at RCPT instead.
    bounce_reject_at_rcpt: bool = True
    max_message_size: int = DEFAULT_MAX_SIZE
    limits: Limits = field(default_factory=Limits)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    files: tuple[str, ...] = ()  # every file read, for the reload watcher

    @property
    def active(self) -> RuleSet | None:
        return self.rule_sets.get(self.active_rule_set) if self.active_rule_set else None


# -- YAML with line numbers and no silent duplicate keys ------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(root: yaml.Node | None, tokens: list[str | int],
             key: str | None = None) -> int | None:
    """The 1-based line of the YAML node at `tokens`, or of its nearest parent.

    With `key`, the line of that key in the mapping found (an unknown key).
    """
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for token in tokens:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == token:
                    nxt = v
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(token, int)
              and 0 <= token < len(node.value)):
            nxt = node.value[token]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    if key is not None and isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return int(k.start_mark.line) + 1
    return line


def dotted(tokens: list[str | int]) -> str:
    out = ""
    for token in tokens:
        out += f"[{token}]" if isinstance(token, int) else (f".{token}" if out else str(token))
    return out


# -- the schema ------------------------------------------------------------

@cache
def schema() -> dict[str, Any]:
    text = resources.files("mxrules").joinpath("mxrules.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _ecma_anchors(pattern: str) -> str:
    """A JSON Schema (ECMA-262) regex for Python's `re`: `$` means the very end.

    Python's `$` also matches before a final newline, which would let
    `header_value: "x\\n"` through `^[^\\r\\n]*$`: a header injection.
    """
    out, escaped, in_class = [], False, False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
    return "".join(out)


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Any:
    if validator.is_type(instance, "string") and not re.search(_ecma_anchors(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _validator_class() -> Any:
    base = jsonschema.validators.validator_for(schema())
    return jsonschema.validators.extend(base, {"pattern": _pattern})


@cache
def _validator(sub: str | None = None) -> jsonschema.protocols.Validator:
    # One validator per (sub)schema for the process: a new one would resolve its
    # $refs afresh, 1 ms per SES filter or rule validated, 100 s for 100,000 filters.
    full = schema()
    target = full if sub is None else {**full["$defs"][sub], "$defs": full["$defs"]}
    return _validator_class()(target)


def _explain(error: jsonschema.ValidationError) -> str:
    """A schema error in words a person acts on."""
    inst = error.instance
    desc = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(inst) - set(allowed)) if isinstance(inst, dict) else []
        is_action = set(allowed) == {"add_header", "s3", "sns", "lambda", "bounce", "stop"}
        what = "action" if is_action else "key"
        names = ", ".join(repr(e) for e in extra)
        return f"unknown {what} {names} (expected one of: {', '.join(allowed)})"
    if error.validator in ("minProperties", "maxProperties") and desc:
        return f"must be {desc}"
    if error.validator == "required":
        return str(error.message).replace("is a required property", "is required")
    if error.validator == "pattern":
        return f"{inst!r} is not valid: expected {desc}" if desc else str(error.message)
    if error.validator == "maxLength":
        return f"too long ({len(inst)} characters, at most {error.validator_value})" + (
            f": {desc}" if desc else "")
    if error.validator == "enum":
        choices = ", ".join(str(v) for v in error.validator_value)
        return f"{inst!r} is not one of: {choices}"
    if error.validator == "type":
        return f"must be of type {error.validator_value} (got {type(inst).__name__})"
    if error.validator == "propertyNames":
        return f"name {inst!r} is not valid"
    return str(error.message)


def _schema_problems(
    data: Any, file: str, node: yaml.Node | None, sub: str | None = None,
    prefix: list[str | int] | None = None, spell: Any = None,
) -> list[ConfigProblem]:
    problems = []
    for error in sorted(_validator(sub).iter_errors(data), key=lambda e: list(map(str, e.path))):
        tokens: list[str | int] = [*(prefix or []), *error.absolute_path]
        if error.validator == "propertyNames" and isinstance(error.instance, str):
            tokens.append(error.instance)
        where = file
        key = None
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            key = extra[0] if extra else None
        line = _line_of(node, tokens, key) if node is not None else None
        if line:
            where = f"{file}:{line}"
        path = spell(list(error.absolute_path)) if spell else dotted(tokens)
        problems.append(ConfigProblem(where, path, _explain(error)))
    return problems


# -- loading ----------------------------------------------------------------

def load(path: str = DEFAULT_PATH, text: str | None = None) -> Config:
    """Read, check and compile a config file; raises ConfigError listing every problem."""
    path = os.path.abspath(path)
    if text is None:
        text = read_config_file(path)
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
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
    problems = _schema_problems(data, path, node)
    if problems:
        raise ConfigError(problems)
    return _build(path, data, node)


def _check_scan(scan: dict[str, Any], problem: Any) -> None:
    """What the schema cannot say about scanners: usable addresses and name servers.

    Found here, a mistake is a config error at load; found at end of data, it
    would be a 451 or a PROCESSING_FAILED for every message.
    """
    from .scan.spam import ScannerError, parse_address

    for kind in ("spam", "virus"):
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
            DnsSettings(tuple(dns["nameservers"]), float(dns.get("timeout", 5.0)))
        except ValueError as exc:
            problem(["scan", "dns", "nameservers"], str(exc))
    # Waiting for a scan slot and scanning both happen at end of data, where Postfix
    # waits 300 s (milter_content_timeout) before it gives up on the milter; 30 s of
    # that are left for storing the job.
    waited = float(scan.get("wait_timeout", 120.0)) + float(scan.get("timeout", 60.0))
    if waited > SCAN_EOM_BUDGET:
        problem(["scan", "wait_timeout"],
                f"scan.wait_timeout + scan.timeout is {waited:g} s, more than {SCAN_EOM_BUDGET} s "
                "(Postfix waits 300 s for end of data)")


def _build(path: str, data: dict[str, Any], node: yaml.Node | None) -> Config:
    problems: list[ConfigProblem] = []
    base = os.path.dirname(path)
    files = [path]

    def here(tokens: list[str | int]) -> str:
        line = _line_of(node, tokens)
        return f"{path}:{line}" if line else path

    def problem(tokens: list[str | int], message: str) -> None:
        problems.append(ConfigProblem(here(tokens), dotted(tokens), message))

    limits = Limits(**data.get("limits", {}))

    # Rule sets: YAML, then an SES export.
    raw_sets: dict[str, list[dict[str, Any]]] = dict(data.get("rule_sets") or {})
    origin: dict[str, str] = {name: "yaml" for name in raw_sets}
    if "rule_set_file" in data:
        ses_file = os.path.join(base, data["rule_set_file"])
        files.append(ses_file)
        try:
            name, rules = ses.rule_set_from_ses(ses.read_json(ses_file), ses_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
        else:
            ses_problems = []
            for i, ses_rule in enumerate(rules):
                ses_problems += _schema_problems(
                    ses_rule, ses_file, None, sub="rule",
                    spell=lambda t, i=i: ses.ses_path([i, *t]))
            if name in raw_sets:
                problem(["rule_set_file"], f"rule set {name!r} from {ses_file} "
                        "is also defined under rule_sets")
            problems.extend(ses_problems)
            if not ses_problems:
                raw_sets[name] = rules
                origin[name] = ses_file

    rule_sets: dict[str, RuleSet] = {}
    for set_name, rule_dicts in raw_sets.items():
        src = origin[set_name]
        prefix: list[str | int] = ["rule_sets", set_name]

        def where(tokens: list[str | int], src: str = src,
                  prefix: list[str | int] = prefix) -> tuple[str, str]:
            if src == "yaml":
                return here([*prefix, *tokens]), dotted([*prefix, *tokens])
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
        rule_sets[set_name] = RuleSet(set_name, tuple(rule_list))

    # Which rule set is active.
    active = data.get("active_rule_set")
    if "active_rule_set" not in data:
        active = next(iter(rule_sets)) if len(rule_sets) == 1 else None
        if len(rule_sets) > 1:
            problem([], "active_rule_set is required when there is more than one rule set "
                    f"({', '.join(sorted(rule_sets))})")
    elif active is not None and active not in rule_sets:
        known = ", ".join(sorted(rule_sets)) or "none"
        problem(["active_rule_set"], f"no rule set named {active!r} (known: {known})")

    # Managed domains: given, or every domain the rules name.
    named = {
        condition_domain(c): (set_name, rule.name)
        for set_name, rs in rule_sets.items() for rule in rs.rules for c in rule.recipients
    }
    if "domains" in data:
        domains = tuple(d.lower().rstrip(".") for d in data["domains"])
        managed = ManagedDomains(domains)
        for dom, (set_name, rule_name) in sorted(named.items()):
            probe = f"x{dom}" if dom.startswith(".") else dom
            if probe not in managed:
                problem(["domains"], f"rule {rule_name!r} of rule set {set_name!r} names "
                        f"{dom!r}, which is not a managed domain")
    else:
        domains = tuple(sorted(named))

    # IP filters: YAML, then an SES export; blocklists; forwarders.
    filters = [IpFilter(**raw) for raw in data.get("ip_filters", [])]
    for i, flt in enumerate(filters):
        try:
            parse_cidr(flt.cidr)
        except ValueError as exc:
            problem(["ip_filters", i, "cidr"], f"not an address or CIDR: {exc}")
    if "ip_filter_file" in data:
        filter_file = os.path.join(base, data["ip_filter_file"])
        files.append(filter_file)
        try:
            raw_filters = ses.filters_from_ses(ses.read_json(filter_file), filter_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
        else:
            for i, raw_filter in enumerate(raw_filters):
                sub = _schema_problems(
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
                problems.extend(sub)
    names: dict[str, int] = {}
    for i, flt in enumerate(filters):
        if flt.name in names:
            problem(["ip_filters"], f"duplicate IP filter name {flt.name!r}")
        names.setdefault(flt.name, i)
    if len(filters) > limits.ip_filters:
        problem(["ip_filters"], f"{len(filters)} IP filters, more than the limit of "
                f"{limits.ip_filters} (limits.ip_filters)")

    blocklist: list[tuple[IPNetwork, str]] = []
    for i, name in enumerate(data.get("blocklists", [])):
        bl_path = os.path.join(base, name)
        files.append(bl_path)
        try:
            blocklist.extend(load_blocklist(bl_path))
        except ConfigError as exc:
            problems.extend(exc.problems)
        del i

    for i, cidr in enumerate(data.get("trusted_forwarders", [])):
        try:
            parse_cidr(cidr)
        except ValueError as exc:
            problem(["trusted_forwarders", i], f"not an address or CIDR: {exc}")

    _check_scan(data.get("scan", {}), problem)

    if problems:
        raise ConfigError(problems)

    milter = data.get("milter", {})
    worker = data.get("worker", {})
    aws = data.get("aws", {})
    bounce = data.get("bounce", {})
    defaults = WorkerSettings()
    worker_settings = WorkerSettings(
        threads=worker.get("threads", defaults.threads),
        scan_interval=float(worker.get("scan_interval", defaults.scan_interval)),
        retry_window=float(worker.get("retry_window", defaults.retry_window)),
        retry_initial_delay=float(worker.get("retry_initial_delay",
                                             defaults.retry_initial_delay)),
        retry_max_delay=float(worker.get("retry_max_delay", defaults.retry_max_delay)),
        drain_timeout=float(worker.get("drain_timeout", defaults.drain_timeout)),
        metrics_listen=data.get("metrics", {}).get("worker_listen", defaults.metrics_listen),
        bounce_relay=bounce.get("smtp_relay", defaults.bounce_relay),
        smtp_timeout=float(bounce.get("timeout", defaults.smtp_timeout)),
        bounce_require_authenticated=bool(bounce.get("require_authenticated_sender",
                                                     defaults.bounce_require_authenticated)),
        bounce_rate_per_sender=bounce.get("rate_limit", {}).get(
            "per_sender", defaults.bounce_rate_per_sender),
        bounce_rate_per_client=bounce.get("rate_limit", {}).get(
            "per_client_ip", defaults.bounce_rate_per_client),
        bounce_rate_period=float(bounce.get("rate_limit", {}).get(
            "period", defaults.bounce_rate_period)),
        failed_max_age=float(data.get("spool", {}).get("failed_max_age",
                                                       defaults.failed_max_age)),
        failed_max_size=data.get("spool", {}).get("failed_max_size", defaults.failed_max_size),
    )
    aws_settings = AwsSettings(
        region=aws.get("region"),
        endpoint_url=aws.get("endpoint_url"),
        endpoints=dict(aws.get("endpoints", {})),
        connect_timeout=float(aws.get("connect_timeout", 5.0)),
        read_timeout=float(aws.get("read_timeout", 30.0)),
    )
    scan = data.get("scan", {})

    def scanner(raw: dict[str, Any] | None, default_size: int) -> ScannerSettings | None:
        if not raw:
            return None
        return ScannerSettings(raw["engine"], raw["address"], raw.get("max_size", default_size))

    scan_settings = ScanSettings(
        spam=scanner(scan.get("spam"), 10 * 1024 * 1024),
        virus=scanner(scan.get("virus"), 25 * 1024 * 1024),
        nameservers=tuple(scan.get("dns", {}).get("nameservers", ())),
        dns_timeout=float(scan.get("dns", {}).get("timeout", 5.0)),
        timeout=float(scan.get("timeout", 60.0)),
        on_failure=scan.get("on_failure", "accept"),
        dkim_max_size=scan.get("dkim_max_size", 10 * 1024 * 1024),
        concurrency=scan.get("concurrency", 4),
        wait_timeout=float(scan.get("wait_timeout", 120.0)),
    )
    return Config(
        path=path,
        hostname=data.get("hostname") or socket.getfqdn(),
        milter_listen=milter.get("listen", "inet:9900@127.0.0.1"),
        milter_timeout=milter.get("timeout", 600),
        reload_interval=float(milter.get("reload_interval", 2.0)),
        socket_mode=milter.get("socket_mode"),
        metrics_listen=data.get("metrics", {}).get("milter_listen", "127.0.0.1:9901"),
        log_level=data.get("logging", {}).get("level", "info"),
        spool_directory=os.path.join(base, data.get("spool", {}).get("directory", DEFAULT_SPOOL)),
        domains=domains,
        local_part_case_sensitive=bool(data.get("local_part_case_sensitive", False)),
        active_rule_set=active,
        rule_sets=rule_sets,
        ip_filters=tuple(filters),
        blocklist=tuple(blocklist),
        trusted_forwarders=tuple(data.get("trusted_forwarders", [])),
        forwarder_unresolved=data.get("forwarder_unresolved", "tempfail"),
        delivery=data.get("delivery", "consume"),
        bounce_reject_at_rcpt=bool(data.get("bounce", {}).get("reject_at_rcpt", True)),
        max_message_size=data.get("max_message_size", DEFAULT_MAX_SIZE),
        limits=limits,
        worker=worker_settings,
        aws=aws_settings,
        scan=scan_settings,
        files=tuple(files),
    )


def ses_key(token: str | int) -> str:
    if isinstance(token, int):
        return f"[{token}]"
    return {"name": "Name", "policy": "IpFilter.Policy", "cidr": "IpFilter.Cidr"}.get(
        token, token)
