"""The local demo: real Postfix + mxrules milter + worker + moto, sample mail, a summary.

Run as root on Debian 12 through `./run demo` (which installs what it needs).
Everything listens on loopback ports and lives in one directory (printed at
the start; kept with --keep, for a look at the spool, the logs and the
config).  Nothing leaves the machine: AWS is moto in server mode.
"""

from __future__ import annotations

import argparse
import base64
import email
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.dns import DnsServer
from harness.fixtures import instance_dir
from harness.moto import MotoServer
from harness.mxrules_proc import MilterProcess, WorkerProcess
from harness.ports import free_port
from harness.postfix import Postfix
from harness.scanners import GTUBE, Clamd, Spamd
from harness.sink import SmtpSink
from harness.smtp import Result, send
from harness.stack import write_config
from mxrules.spool import STATES, Spool


def say(text: str) -> None:
    print(text, flush=True)


def rules(bucket: str, kms: str, topic: str, function: str) -> list[dict[str, Any]]:
    return [
        {"name": "support", "enabled": True, "recipients": ["support@example.com"],
         "scan_enabled": True,
         "actions": [
             {"add_header": {"header_name": "X-Routed-By", "header_value": "mxrules-demo"}},
             {"s3": {"bucket_name": bucket, "object_key_prefix": "support/",
                     "kms_key_arn": kms}},
             {"sns": {"topic_arn": topic, "encoding": "Base64"}}]},
        {"name": "invoices", "enabled": True, "recipients": ["invoices.example.com"],
         "tls_policy": "Require",
         "actions": [
             {"lambda": {"function_arn": function, "invocation_type": "RequestResponse"}},
             {"s3": {"bucket_name": bucket, "object_key_prefix": "invoices/"}}]},
        {"name": "departed", "enabled": True, "recipients": ["bob@example.com"],
         "scan_enabled": True,  # SPF decides whether the sender may get a DSN
         "actions": [
             {"bounce": {"smtp_reply_code": "550", "status_code": "5.1.1",
                         "message": "Bob has left; write to support@example.com",
                         "sender": "mailer-daemon@example.com", "topic_arn": topic}}]},
    ]


def msg(sender: str, to: list[str], subject: str, body: str = "") -> bytes:
    head = (f"From: Demo Sender <{sender}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@example.net>\r\n"
            "Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n")
    return (head + "\r\n" + (body or "Hello from the mxrules demo.") + "\r\n").encode()


def outcome(r: Result) -> str:
    if r.xclient and r.xclient[0] >= 400:
        return f"{r.xclient[0]} {r.xclient[1]}"
    parts = [f"MAIL {r.mail[0]}" if r.mail else ""]
    parts += [f"RCPT <{a}> {c} {t.split(chr(10))[0][:70]}" for a, (c, t) in r.rcpts.items()]
    if r.data:
        parts.append(f"DATA {r.data[0]}")
    return "; ".join(p for p in parts if p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the demo directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mxrules-demo-"))
    say(f"mxrules demo in {work}\n")
    moto = MotoServer(workdir=work / "moto")
    sink = SmtpSink()
    spamd, clamd = Spamd(work / "spamd"), Clamd(work / "clamd")
    dns = DnsServer({"example.net": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
                     "forged.example": {"TXT": ["v=spf1 -all"]}})
    milter = worker = postfix = None
    try:
        say("starting moto (S3, SNS, SQS, KMS, Lambda on loopback) ...")
        moto.start()
        bucket = moto.make_bucket("demo-inbound-mail")
        kms = moto.make_kms_key()
        topic, queue = moto.make_topic_with_queue("demo-mail")
        function = moto.make_function("demo-invoice-router")
        moto.queue_lambda_results(['{"disposition": "CONTINUE"}'])
        sink.start()
        say("starting spamd, clamd (test signatures only) and a local DNS server for SPF ...")
        for server in (spamd, clamd, dns):
            server.start()
        milter_port, worker_port = free_port(), free_port()
        cfg = write_config(
            work, port=milter_port, rules=rules(bucket, kms, topic, function),
            filters=[{"name": "known-abuser", "policy": "Block", "cidr": "203.0.113.0/24"}],
            domains=["example.com", "invoices.example.com"],
            metrics={"milter_listen": "", "worker_listen": f"127.0.0.1:{worker_port}"},
            worker={"threads": 2, "scan_interval": 0.1},
            aws={"region": "us-east-1", "endpoint_url": moto.endpoint_url},
            bounce={"smtp_relay": f"127.0.0.1:{sink.port}"},
            scan={"spam": {"engine": "spamd", "address": spamd.address},
                  "virus": {"engine": "clamd", "address": clamd.address},
                  "dns": {"nameservers": [dns.address], "timeout": 2}, "timeout": 30})
        say(f"starting mxrules milter and worker (config {cfg}) ...")
        milter = MilterProcess(cfg, milter_port, work / "milter.log")
        milter.start()
        worker = WorkerProcess(cfg, worker_port, work / "worker.log", env=moto.aws_env())
        worker.start()
        say("starting a throwaway Postfix on loopback with the milter attached ...\n")
        postfix = Postfix(workdir=instance_dir(), smtp_port=free_port(),
                          milter=milter.postfix_spec, relay_port=sink.port)
        postfix.start()
        port = postfix.smtp_port

        cases: list[tuple[str, Result]] = []

        def case(title: str, sender: str, rcpts: list[str], body: str = "", **kw: Any) -> None:
            r = send("127.0.0.1", port, sender, rcpts, msg(sender, rcpts, title, body), **kw)
            cases.append((title, r))
            say(f"  {title}\n      -> {outcome(r)}")

        say("sending sample mail:")
        case("support request (stored in S3 with KMS, published to SNS)",
             "alice@example.net", ["support@example.com"])
        case("spam to support (GTUBE: accepted, spamVerdict FAIL in its notification)",
             "spammer@example.net", ["support@example.com"], body=GTUBE)
        case("unknown recipient (no rule matches: refused during SMTP)",
             "alice@example.net", ["nobody@example.com"])
        case("client in a Block filter (refused at connect; faked with XCLIENT)",
             "spam@example.org", ["support@example.com"], client_ip="203.0.113.9")
        case("invoice without TLS (rule requires TLS: refused, no backscatter)",
             "billing@vendor.example", ["ap@invoices.example.com"])
        case("invoice over STARTTLS (Lambda RequestResponse, then S3)",
             "billing@vendor.example", ["ap@invoices.example.com"], tls=True)
        case("mail for a departed employee (Bounce action sends a DSN)",
             "carol@example.net", ["bob@example.com"])
        case("the same from a forged sender (SPF fails: the bounce is suppressed, no "
             "backscatter)", "victim@forged.example", ["bob@example.com"])
        case("support + a recipient outside the managed domains (Postfix delivers that one)",
             "dave@example.net", ["support@example.com", "friend@elsewhere.example"])

        say("\nwaiting for the worker to finish every job ...")
        spool = Spool(str(work / "spool"))
        deadline = time.monotonic() + 60
        while any(spool.ids(s) for s in ("incoming", "active", "deferred")):
            if time.monotonic() > deadline:
                say("  (still busy after 60 s; see worker.log)")
                break
            time.sleep(0.1)
        time.sleep(0.5)

        say("\n=== what happened ===")
        accepted = sum(1 for _, r in cases if r.data and r.data[0] == 250)
        say(f"SMTP: {len(cases)} transactions, {accepted} accepted, "
            f"{len(cases) - accepted} refused during the SMTP conversation")
        say("\nS3 objects:")
        for key in moto.s3_keys(bucket):
            body, meta = moto.s3_object(bucket, key)
            sse = meta.get("ServerSideEncryption") or "none"
            say(f"  s3://{bucket}/{key}  {len(body)} bytes, encryption {sse}")
        say("\nSNS notifications (read from an SQS subscription):")
        notes = moto.sns_messages(queue, 0, timeout=2)
        for env in notes:
            note = json.loads(env["Message"])
            action = note["receipt"]["action"]
            extra = ""
            if "content" in note:
                raw = base64.b64decode(note["content"])
                extra = f", content {len(raw)} bytes"
                if b"X-Routed-By: mxrules-demo" in raw:
                    extra += " (with the added header)"
            verdicts = " ".join(f"{k[:-7]}={note['receipt'][k]['status']}"
                                for k in ("spamVerdict", "virusVerdict", "spfVerdict",
                                          "dkimVerdict", "dmarcVerdict"))
            say(f"  {env['Subject']}: action {action['type']}, messageId "
                f"{note['mail']['messageId']}, recipients {note['receipt']['recipients']}{extra}"
                f"\n      verdicts: {verdicts}")
        say("\nLambda invocations:")
        for call in moto.lambda_invocations():
            rec = call.json()["Records"][0]["ses"]
            say(f"  {call.function_name} ({call.invocation_type}) for "
                f"{rec['receipt']['recipients']} from {rec['mail']['source']}")
        say("\nMail that left through SMTP:")
        for m in sink.messages:
            parsed = email.message_from_bytes(m.data)
            kind = ("DSN " + parsed.get_content_type()
                    if parsed.get_content_type() == "multipart/report" else "delivery")
            say(f"  {kind}: MAIL FROM:<{m.mail_from.strip('<>')}> to {list(m.rcpt_tos)}, "
                f"Subject: {parsed['Subject']}")
        counts = {s: len(spool.ids(s)) for s in STATES}
        say(f"\nspool now: {counts}")
        if args.keep:
            say(f"logs: {work / 'milter.log'}, {work / 'worker.log'}, {postfix.maillog_path}")
        else:
            say("(run `./run demo --keep` to keep the config, spool and logs for a look)")
        ok = accepted == 6 and len(moto.s3_keys(bucket)) == 4 and counts["failed"] == 0
        say("\ndemo " + ("OK" if ok else "did not go as expected: see the logs above"))
        return 0 if ok else 1
    finally:
        for proc in (postfix, worker, milter):
            if proc is not None:
                proc.stop()
        sink.stop()
        for server in (dns, clamd, spamd):
            server.stop()
        moto.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if postfix is not None:
                shutil.rmtree(postfix.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
