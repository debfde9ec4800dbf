"""mxrules -- Amazon SES email receiving for your own Postfix.

SYNOPSIS
    mxrules [--config PATH] COMMAND [ARGS]

COMMANDS
    milter          run the milter Postfix talks to (smtpd_milters)
    worker          run the actions of spooled jobs (S3, SNS, Lambda, bounce, stop)
    spool           list, show, requeue or delete spooled jobs
    check-config    check the config; exit 0, or 78 listing every problem
    explain         dry-run one SMTP transaction against the config
    import-ses      print SES JSON exports as mxrules YAML

CONFIGURATION
    /etc/mxrules/mxrules.yaml, or --config PATH (before or after the command).

DIAGNOSTICS
    Exit status 0 on success, 78 (EX_CONFIG) for a bad config, 2 for a command line
    that cannot be parsed, 64 for arguments that do not fit together, 69 when the
    spool or the metrics address cannot be used,
    65 for bad input data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from . import config as config_mod
from . import ses
from .decision import Engine
from .errors import EX_CONFIG, EX_DATAERR, EX_USAGE, ConfigError, SpoolError
from .explain import Transaction, explain, render
from .spool import STATES
from .terminal import printable, printable_values


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors repeat the arguments given: escaped like all output."""

    def _print_message(self, message: str, file: Any = None) -> None:
        super()._print_message(printable(message, keep="\n"), file)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"config file (default {config_mod.DEFAULT_PATH})")
    top = _Parser(
        prog="mxrules", parents=[common],
        description="Amazon SES email receiving (receipt rules, IP filters, actions) "
                    "for your own Postfix.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("milter", parents=[common], help="run the milter Postfix talks to",
                   description="Run the milter: decide at connect and RCPT, spool at end "
                               "of data. Reloads the config when its files change or on "
                               "SIGUSR1.")
    wk = sub.add_parser("worker", parents=[common], help="run the actions of spooled jobs",
                        description="Claim spooled jobs and run their matched rules' actions "
                                    "in order, retrying failures with backoff for the retry "
                                    "window, then dead-lettering them. SIGTERM drains.")
    wk.add_argument("--once", action="store_true",
                    help="work until nothing is due, then exit (deferred jobs stay)")

    sp = sub.add_parser("spool", parents=[common], help="list, show, requeue or delete jobs",
                        description="Look at and act on the spool's jobs. Run as root, "
                                    "it first switches to the spool directory's owner.")
    spsub = sp.add_subparsers(dest="spool_command", metavar="ACTION", required=True)
    ls = spsub.add_parser("list", parents=[common], help="a table of jobs")
    ls.add_argument("--state", action="append", choices=list(STATES),
                    help="only jobs in this state (repeatable; default: all)")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    sh = spsub.add_parser("show", parents=[common], help="one job in full")
    sh.add_argument("id", help="the job's id (its SES messageId), as `spool list` shows it")
    sh.add_argument("--json", action="store_true", help="print JSON for scripts")
    rq = spsub.add_parser("requeue", parents=[common],
                          help="retry dead-lettered (or deferred) jobs now, with a new window")
    rq.add_argument("id", nargs="*", help="jobs to retry now")
    rq.add_argument("--all-failed", action="store_true", help="every dead-lettered job")
    rm = spsub.add_parser("delete", parents=[common], help="remove a job for good")
    rm.add_argument("id", nargs="+", help="jobs to remove")

    sub.add_parser("check-config", parents=[common], help="check the config and exit",
                   description="Check the config; print every problem as "
                               "'file:line: path: what is wrong' and exit 78, or exit 0.")

    ex = sub.add_parser("explain", parents=[common], help="dry-run one SMTP transaction",
                        description="Show what the milter would do with one transaction: "
                                    "the IP filter decision, each recipient's rules and "
                                    "SMTP reply, and the action plan.")
    ex.add_argument("--client-ip", required=True, help="the SMTP client's address")
    ex.add_argument("--helo", default="", help="the HELO/EHLO name")
    ex.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                    help="envelope sender ('' for the null sender)")
    # extend, not store: `--rcpt a --rcpt b` and `--rcpt a b` both mean two recipients.
    ex.add_argument("--rcpt", nargs="+", action="extend", required=True, metavar="ADDR",
                    help="envelope recipients (repeat the flag, or give several)")
    ex.add_argument("--tls", action="store_true", help="the session uses STARTTLS")
    ex.add_argument("--size", type=int, help="the SIZE= the client announces")
    ex.add_argument("--json", action="store_true", help="print JSON for scripts")

    imp = sub.add_parser("import-ses", parents=[common], help="print SES exports as mxrules YAML",
                         description="Convert `aws ses describe-active-receipt-rule-set` "
                                     "(and optionally `aws ses list-receipt-filters`) output "
                                     "to mxrules YAML on standard output.")
    imp.add_argument("rule_set", metavar="RULESET.json")
    imp.add_argument("filters", nargs="?", metavar="FILTERS.json")
    return top


def _say(text: str, *, err: bool = False, end: str = "\n") -> None:
    """Print for an operator: every control character but the line breaks escaped.

    All output goes through here: much of it comes from mail or from files.
    """
    print(printable(text, keep="\n"), end=end, file=sys.stderr if err else sys.stdout)


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", config_mod.DEFAULT_PATH))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sets = ", ".join(f"{n} ({len(rs.rules)} rules)" for n, rs in cfg.rule_sets.items()) or "none"
    _say(f"{cfg.path}: ok\n"
         f"  rule sets: {sets}; active: {cfg.active_rule_set or 'none'}\n"
         f"  managed domains: {', '.join(cfg.domains) or 'none'}\n"
         f"  ip filters: {len(cfg.ip_filters)}; blocklist entries: {len(cfg.blocklist)}\n"
         f"  delivery: {cfg.delivery}; spool: {cfg.spool_directory}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    engine = Engine(_load(args))
    tx = Transaction(args.client_ip, args.sender, tuple(args.rcpt), args.helo, args.tls,
                     args.size)
    try:
        result = explain(engine, tx)
    except ValueError as exc:
        _say(f"mxrules explain: {exc}", err=True)
        return EX_USAGE
    _say(json.dumps(result, indent=2) if args.json else render(printable_values(result)))
    return 0


def import_ses(rule_set_path: str, filters_path: str | None) -> str:
    """The YAML equivalent of SES exports (what `import-ses` prints)."""
    name, rules = ses.rule_set_from_ses(ses.read_json(rule_set_path), rule_set_path)
    doc: dict[str, object] = {"active_rule_set": name, "rule_sets": {name: rules}}
    if filters_path:
        doc["ip_filters"] = ses.filters_from_ses(ses.read_json(filters_path), filters_path)
    # Check the exports as the milter would load them (rule_set_file:), so a bad
    # export fails here, named in SES's terms (`Rules[0].Actions[1].S3Action...`),
    # not as lines of a YAML file that does not exist; then check the result.
    refs = {"rule_set_file": os.path.abspath(rule_set_path)}
    if filters_path:
        refs["ip_filter_file"] = os.path.abspath(filters_path)
    config_mod.load("import-ses.yaml", yaml.safe_dump(refs))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    if printable(text, keep="\n") != text:
        # YAML writes some controls raw (NEL, the bidirectional ones): then every
        # non-ASCII character is written as a YAML escape, which reads the same.
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=False, width=100)
    config_mod.load("import-ses.yaml", text)
    sources = rule_set_path + (f" and {filters_path}" if filters_path else "")
    return f"# mxrules rules converted from the SES export {printable(sources)}\n{text}"


def cmd_import_ses(args: argparse.Namespace) -> int:
    _say(import_ses(args.rule_set, args.filters), end="")
    return 0


def cmd_spool(args: argparse.Namespace) -> int:
    from . import spool_cli
    from .spool import Spool

    directory = _load(args).spool_directory
    spool_cli.become_owner(directory)  # before the spool is touched
    spool = Spool(directory)
    what = args.spool_command
    if what == "list":
        _say(spool_cli.list_jobs(spool, args.state or spool_cli.ALL_STATES, args.json))
    elif what == "show":
        _say(spool_cli.show_job(spool, args.id, args.json))
    elif what == "requeue":
        if not args.id and not args.all_failed:
            _say("mxrules spool requeue: give job ids or --all-failed", err=True)
            return EX_USAGE
        done = spool_cli.requeue(spool, args.id, args.all_failed)
        _say(f"requeued {len(done)} job(s)" + "".join(f"\n  {printable(i)}" for i in done))
    elif what == "delete":
        for job_id in args.id:
            state = spool.delete(job_id)
            _say(f"deleted {printable(job_id)} (was {state})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "milter":
            from mxrules.milter.daemon import run
            return run(getattr(args, "config", config_mod.DEFAULT_PATH))
        if args.command == "worker":
            from mxrules.actions.worker import run as run_worker
            return run_worker(getattr(args, "config", config_mod.DEFAULT_PATH), args.once)
        if args.command == "spool":
            return cmd_spool(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "import-ses":
            return cmd_import_ses(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(str(problem), err=True)
        return EX_CONFIG
    except SpoolError as exc:
        _say(f"mxrules: {exc}", err=True)
        return EX_DATAERR
    except BrokenPipeError:
        return EX_DATAERR
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
