"""The manual pages mxrules(8) and mxrules.yaml(5), written from their sources.

mxrules(8) comes from the command line parser (every command, option and help
text the program itself prints); mxrules.yaml(5) from the JSON Schema that
checks the config (every key, its type, limits, default and description).  The
package build runs `python3 -m mxrules.manpage --out DIR`, so a manual never
says something the program does not do.

    python3 -m mxrules.manpage --out man/    # writes mxrules.8 and mxrules.yaml.5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, cli
from . import config as config_mod
from .config import DEFAULT_PATH

DATE = "2026-11-28"


def roff(text: str) -> str:
    """Text made safe for a roff line: backslashes, hyphens, leading dots and quotes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _para(text: str) -> str:
    return "\n".join(roff(line.strip()) if line.strip() else ".PP"
                     for line in text.strip().splitlines())


def _header(name: str, section: int, title: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "{DATE}" "mxrules {__version__}" "mxrules"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(title)}",
    ]


# -- mxrules(8) ---------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.dest == "config":  # common to every command: see OPTIONS
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                names += f" \\fI{roff(str(action.metavar or action.dest.upper()))}\\fR"
        else:
            metavar = action.metavar or action.dest
            names = f"\\fI{roff(str(metavar))}\\fR" + (" ..." if action.nargs in ("*", "+") else "")
        text = action.help or ""
        if action.choices and not isinstance(action.choices, dict):
            text += " One of: " + ", ".join(str(c) for c in action.choices) + "."
        out += [".TP", names, roff(text) if text else "\\&"]
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = " ".join(parser.format_usage().strip().removeprefix("usage:").split())
    return usage.replace(" [-h]", "").replace(" [--config PATH]", "")


def render_mxrules_8() -> str:
    top = cli._parser()
    lines = _header("mxrules", 8, "Amazon SES email receiving for your own Postfix")
    lines += [".SH SYNOPSIS", "\\fBmxrules\\fR [\\fB\\-\\-config\\fR \\fIPATH\\fR] "
              "\\fICOMMAND\\fR [\\fIARGS\\fR]", ".SH DESCRIPTION",
              _para(top.description or ""),
              ".PP",
              _para("""
                The milter (mxrules milter) is attached to Postfix with smtpd_milters. It
                accepts or rejects at connect and RCPT time (IP filters, receipt rules, TLS
                policy), runs the scans, adds headers in-stream and writes every accepted
                message to the spool before Postfix answers 250. The worker (mxrules worker)
                runs each spooled message's actions in rule order: S3, SNS, Lambda, bounce,
                stop. Rules, filters, actions and payloads follow Amazon SES email receiving;
                SES JSON exports can be loaded as they are.""")]
    lines.append(".SH COMMANDS")
    for name, sub in _subparsers(top).items():
        lines += [".SS " + roff(name), f"\\fBmxrules {roff(name)}\\fR "
                  + roff(_usage(sub).split(name, 1)[-1].strip()), ".br"]
        lines.append(_para(sub.description or _help_of(top, name)))
        nested = _subparsers(sub)
        if nested:
            for action_name, action_parser in nested.items():
                lines += [".TP", f"\\fBmxrules {roff(name)} {roff(action_name)}\\fR "
                          + roff(_usage(action_parser).split(action_name, 1)[-1].strip()),
                          roff(_help_of(sub, action_name))]
                options = _option_lines(action_parser)
                if options:
                    lines += [".RS", *options, ".RE"]
        else:
            lines += _option_lines(sub)
    lines += [
        ".SH OPTIONS",
        ".TP", "\\fB\\-\\-config\\fR, \\fB\\-c\\fR \\fIPATH\\fR",
        f"The config file (default \\fI{roff(DEFAULT_PATH)}\\fR). It may be given before or "
        "after the command.",
        ".SH SIGNALS",
        ".TP", "\\fBSIGUSR1\\fR",
        "The milter and the worker load the config again (\\fBsystemctl reload\\fR sends it). "
        "A config that does not pass the checks is refused and the old one stays in use.",
        ".TP", "\\fBSIGTERM\\fR",
        "The worker finishes the actions it is running, then exits; unfinished jobs stay in the "
        "spool. The milter stops within about 5 s (SIGHUP and SIGINT do the same), dropping the "
        "messages it was still receiving; Postfix answers 4xx for the transactions it had open.",
        ".SH FILES",
        ".TP", f"\\fI{roff(DEFAULT_PATH)}\\fR",
        "The config, see \\fBmxrules.yaml\\fR(5).",
        ".TP", "\\fI/usr/share/mxrules/mxrules.schema.json\\fR",
        "The JSON Schema of the config, for editors.",
        ".TP", "\\fI/var/spool/mxrules\\fR",
        "The spool: incoming, active, deferred, failed (dead letters), corrupt and done jobs.",
        ".TP", "\\fI/var/spool/postfix/mxrules/milter.sock\\fR",
        "The milter's socket in the packaged config; Postfix names it "
        "\\fBunix:mxrules/milter.sock\\fR (relative to its queue directory, chrooted or not).",
        ".SH EXIT STATUS",
        "0 on success; 2 for a command line that cannot be parsed; 64 (EX_USAGE) for "
        "arguments that do not fit together; 65 (EX_DATAERR) for bad input data; "
        "69 (EX_UNAVAILABLE) when the spool or the metrics address cannot be used; "
        "70 (EX_SOFTWARE) when the milter cannot serve; 78 (EX_CONFIG) for a bad config, "
        "which the packaged units do not restart (RestartPreventExitStatus=78).",
        ".SH SEE ALSO",
        "\\fBmxrules.yaml\\fR(5), \\fBpostconf\\fR(5), \\fBsystemctl\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


# -- mxrules.yaml(5) ----------------------------------------------------------

@dataclass
class Key:
    path: str
    schema: dict[str, Any]
    required: bool


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    merged = {**_resolve(node, root), **{k: v for k, v in schema.items() if k != "$ref"}}
    return merged


def walk(schema: dict[str, Any], root: dict[str, Any], prefix: str = "") -> Iterator[Key]:
    """Every key the schema allows, depth first, with paths like rule_sets.NAME[].actions[].s3."""
    schema = _resolve(schema, root)
    required = set(schema.get("required", ()))
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        sub = _resolve(sub, root)
        yield Key(path, sub, name in required)
        yield from _children(sub, root, path)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _children(_resolve(extra, root), root, f"{prefix}.NAME", container=True)


def _children(sub: dict[str, Any], root: dict[str, Any], path: str,
              container: bool = False) -> Iterator[Key]:
    if "properties" in sub or isinstance(sub.get("additionalProperties"), dict):
        yield from walk(sub, root, path)
    items = sub.get("items")
    if isinstance(items, dict):
        items = _resolve(items, root)
        if "properties" in items:
            yield from walk(items, root, path + "[]")
    for alt in sub.get("oneOf", []) + sub.get("anyOf", []):
        alt = _resolve(alt, root)
        if "properties" in alt:
            yield from walk(alt, root, path)


def _type_of(schema: dict[str, Any], root: dict[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        items = schema.get("items", {})
        inner = _resolve(items, root).get("type") or "value"
        kind = f"list of {inner}"
    limits = []
    for word, label in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                        ("minLength", "length >="), ("maxLength", "length <="),
                        ("minItems", "items >="), ("maxItems", "items <=")):
        if word in schema:
            limits.append(f"{label} {schema[word]}")
    text = str(kind or "value")
    return text + (f" ({', '.join(limits)})" if limits else "")


def schema_document() -> dict[str, Any]:
    return config_mod.schema()


def render_mxrules_yaml_5() -> str:
    root = schema_document()
    lines = _header("mxrules.yaml", 5, "mxrules configuration file")
    lines += [
        ".SH SYNOPSIS", f"\\fI{roff(DEFAULT_PATH)}\\fR",
        ".SH DESCRIPTION",
        _para(root.get("description", "")),
        ".PP",
        _para("""
            The file is YAML. Unknown keys are errors. mxrules check-config prints every
            problem as file:line: path: what is wrong and exits 78. The milter loads a changed
            file without a restart; a file that does not pass the checks is refused and the
            old config stays in use. The JSON Schema that makes these checks is installed as
            /usr/share/mxrules/mxrules.schema.json; this page is written from it."""),
        ".PP",
        _para("""
            Key paths below use NAME for a name you choose (a rule set's name) and [] for an
            item of a list. Receipt rules, IP filters and actions have the fields of Amazon
            SES's receipt rules, in snake_case; the files exported by the AWS command line
            (describe-active-receipt-rule-set, list-receipt-filters) can be named by
            rule_set_file and ip_filter_file instead."""),
        ".SH KEYS",
    ]
    for key in walk(root, root):
        schema = key.schema
        desc = schema.get("description", "")
        facts = [_type_of(schema, root)]
        if key.required:
            facts.append("required")
        if "default" in schema:
            facts.append(f"default {json.dumps(schema['default'])}")
        lines += [".TP", f"\\fB{roff(key.path)}\\fR", roff("; ".join(facts) + ".")]
        if desc:
            lines += [".br", roff(desc)]
    lines += [
        ".SH EXAMPLE",
        ".nf",
        ".RS",
        *(roff(line) for line in _EXAMPLE.strip("\n").splitlines()),
        ".RE",
        ".fi",
        ".SH FILES",
        ".TP", f"\\fI{roff(DEFAULT_PATH)}\\fR", "The config the packaged services use.",
        ".TP", "\\fI/usr/share/doc/mxrules/examples/\\fR",
        "A full example, SES exports and the Postfix main.cf settings.",
        ".SH SEE ALSO",
        "\\fBmxrules\\fR(8)",
    ]
    return "\n".join(lines) + "\n"


_EXAMPLE = """
domains: [example.com]
active_rule_set: default
rule_sets:
  default:
    - name: support-to-s3
      enabled: true
      recipients: [support@example.com]
      actions:
        - s3: {bucket_name: example-inbound-mail, object_key_prefix: support/}
        - sns: {topic_arn: "arn:aws:sns:us-east-1:123456789012:support-mail"}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m mxrules.manpage",
                                     description="Write mxrules.8 and mxrules.yaml.5.")
    parser.add_argument("--out", default=".", help="directory to write into (default: .)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("mxrules.8", render_mxrules_8()),
                       ("mxrules.yaml.5", render_mxrules_yaml_5())):
        (out / name).write_text(text, encoding="utf-8")
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
