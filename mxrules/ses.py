"""SES's own JSON exports, loaded as they are, and `import-ses`.

What SES prints: docs/ses-compatibility.md, "SES exports".

Accepted inputs:
- `aws ses describe-active-receipt-rule-set` / `describe-receipt-rule-set`:
  `{"Metadata": {"Name": ...}, "Rules": [{"Name", "Enabled", "TlsPolicy",
  "Recipients", "ScanEnabled", "Actions": [{"S3Action": {...}}, ...]}]}`
- `aws ses list-receipt-filters`:
  `{"Filters": [{"Name", "IpFilter": {"Policy", "Cidr"}}]}`

Each is converted to mxrules' own config form (snake_case) and validated by
the same schema as YAML, with problems reported in SES's terms
(`Rules[2].Actions[0].S3Action.BucketName`).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ConfigError, ConfigProblem, read_config_file
from .rules import ACTION_TYPES, camel

_SES_ACTIONS = {cls.TYPE + "Action": key for key, cls in ACTION_TYPES.items()}
# Fields SES has that do not change what mxrules does; accepted and dropped.
_IGNORED_ACTION_FIELDS = {"S3Action": {"IamRoleArn"}}
_UNSUPPORTED = {
    "WorkmailAction": "Amazon WorkMail exists only inside AWS",
    "ConnectAction": "Amazon Connect exists only inside AWS",
}
_RULE_FIELDS = {"name", "enabled", "tls_policy", "recipients", "scan_enabled", "actions"}


def read_json(path: str, text: str | None = None) -> Any:
    if text is None:
        text = read_config_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problem = ConfigProblem(path, "", f"not valid JSON (line {exc.lineno}): {exc.msg}")
        raise ConfigError([problem]) from None
    except RecursionError:  # `[[[[...`: the parser's recursion limit, not a crash
        raise ConfigError([ConfigProblem(path, "", "not valid JSON: nested too deeply")]) from None


def rule_set_from_ses(doc: Any, path: str) -> tuple[str, list[dict[str, Any]]]:
    """An SES rule-set export -> (rule set name, rules in config form)."""
    problems: list[ConfigProblem] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("Rules", []), list):
        raise ConfigError([ConfigProblem(path, "", "not an SES rule set export "
                                         '(expected {"Metadata": {...}, "Rules": [...]})')])
    meta = doc.get("Metadata") or {}
    name = meta.get("Name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        problems.append(ConfigProblem(path, "Metadata.Name", "missing: the rule set needs a name"))
        name = ""
    rules: list[dict[str, Any]] = []
    for i, raw in enumerate(doc.get("Rules") or []):
        where = f"Rules[{i}]"
        if not isinstance(raw, dict):
            problems.append(ConfigProblem(path, where, "a rule must be an object"))
            continue
        rule: dict[str, Any] = {}
        for key, value in raw.items():
            snake = _snake(key)
            if snake not in _RULE_FIELDS:
                problems.append(ConfigProblem(path, f"{where}.{key}", "unknown rule field"))
            elif snake == "actions":
                rule["actions"] = _actions(value, f"{where}.Actions", path, problems)
            else:
                rule[snake] = value
        rules.append(rule)
    if problems:
        raise ConfigError(problems)
    return name, rules


def _actions(value: Any, where: str, path: str, problems: list[ConfigProblem]) -> list[Any]:
    if not isinstance(value, list):
        problems.append(ConfigProblem(path, where, "must be a list"))
        return []
    out: list[Any] = []
    for j, item in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(ConfigProblem(path, here, "an action must be one {\"XAction\": {...}}"))
            continue
        ((ses_name, body),) = item.items()
        if ses_name in _UNSUPPORTED:
            problems.append(ConfigProblem(
                path, here, f"{ses_name} is not supported: {_UNSUPPORTED[ses_name]}"))
            continue
        if ses_name not in _SES_ACTIONS:
            known = ", ".join(sorted(_SES_ACTIONS))
            problems.append(
                ConfigProblem(path, here, f"unknown action {ses_name!r} (known: {known})"))
            continue
        if not isinstance(body, dict):
            problems.append(ConfigProblem(path, f"{here}.{ses_name}", "must be an object"))
            continue
        ignored = _IGNORED_ACTION_FIELDS.get(ses_name, set())
        out.append({_SES_ACTIONS[ses_name]: {
            _snake(k): v for k, v in body.items() if k not in ignored}})
    return out


def filters_from_ses(doc: Any, path: str) -> list[dict[str, Any]]:
    """An SES `list-receipt-filters` export -> filters in config form."""
    if not isinstance(doc, dict) or not isinstance(doc.get("Filters"), list):
        raise ConfigError([ConfigProblem(path, "", "not an SES receipt filter export "
                                         '(expected {"Filters": [...]})')])
    problems: list[ConfigProblem] = []
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(doc["Filters"]):
        ip = raw.get("IpFilter") if isinstance(raw, dict) else None
        if not isinstance(ip, dict):
            problems.append(ConfigProblem(path, f"Filters[{i}]", "needs Name and IpFilter"))
            continue
        out.append({"name": raw.get("Name"), "policy": ip.get("Policy"), "cidr": ip.get("Cidr")})
    if problems:
        raise ConfigError(problems)
    return out


def ses_path(tokens: list[str | int]) -> str:
    """A config-form path inside an imported rule set, spelled as SES spells it."""
    out = "Rules"
    for pos, token in enumerate(tokens):
        if isinstance(token, int):
            out += f"[{token}]"
        elif token in ACTION_TYPES and pos >= 2 and tokens[pos - 2] == "actions":
            out += "." + ACTION_TYPES[token].TYPE + "Action"
        else:
            out += "." + camel(token)
    return out


def _snake(name: str) -> str:
    out: list[str] = []
    for ch in name:
        if ch.isupper() and out:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
