"""Every Prometheus metric mxrules exports, defined in one place.

Metrics are built on a registry passed in (tests make a fresh one); nothing is
created at import.  Labels are bounded: results, reasons, rule names, stages,
action types -- never addresses or message ids.  The label values known in
advance are created at zero, so each series exists from the first scrape and
`rate()`/`increase()` see the first event (a series born at 1 looks flat).

Durations are in seconds with buckets chosen for mail: milliseconds for a
spool commit, seconds for scans and actions, minutes to hours from acceptance
to a job's last action (retries included).

The spool gauges (jobs by state, oldest job's age) are read from the spool at
scrape time by the worker's `SpoolCollector` (mxrules.actions.worker).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .actionspec import SES_TYPES
from .received import UNRESOLVED_REASONS

# SES bills received mail in 256 KB chunks; the same count helps size a fleet.
BILLING_CHUNK = 256 * 1024

CONNECTION_RESULTS = ("accepted", "rejected")
RECIPIENT_RESULTS = ("accepted", "unmanaged", "no-rule", "no-rule-set", "tls-required",
                     "bounced", "too-big")
MESSAGE_RESULTS = ("spooled", "passed", "tempfail", "rejected")
ACTION_TYPES = SES_TYPES  # every action type, from its spec (actionspec.SPECS)
ACTION_OUTCOMES = ("ok", "retry", "failed", "bounced")
JOB_RESULTS = ("done", "dead_lettered", "corrupt")
RELOAD_RESULTS = ("ok", "failed")
# Why a Bounce action sent no DSN (actions.bounce): the sender is not authenticated,
# or the per-sender or per-client-IP rate limit is reached.
BOUNCE_SUPPRESSIONS = ("unauthenticated", "sender-rate", "client-rate")
# What can still go wrong once a message is stored (it stays answered as stored).
POST_COMMIT_STEPS = ("add-header", "remove-header", "remove-recipient", "bookkeeping")
RETENTION_REASONS = ("age", "size")


class ConfigMetrics:
    """Config loads, for both programs: an alert watches `..._successful == 0`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reloads = Counter(
            "mxrules_config_reloads_total",
            "Attempts to load the config again while running (a file changed, SIGUSR1, "
            "systemctl reload), by result (ok, failed: the old config stays in force).",
            ["result"], registry=registry)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        self.reload_success = Gauge(
            "mxrules_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (Unix time): at start or at the last "
            "successful reload.", registry=registry)
        self.reload_ok = Gauge(
            "mxrules_config_last_reload_successful",
            "1 if the last attempt to load the config succeeded, 0 if it was refused and "
            "an older config is still in force.", registry=registry)

    def loaded(self, at_start: bool = False) -> None:
        """A config is now in force (the one read at start, or a reload)."""
        if not at_start:
            self.reloads.labels("ok").inc()
        self.reload_ok.set(1)
        self.reload_success.set(time.time())

    def load_failed(self) -> None:
        self.reloads.labels("failed").inc()
        self.reload_ok.set(0)


class MilterMetrics(ConfigMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.connections = Counter(
            "mxrules_connections_total",
            "SMTP connections seen by the milter, by result (accepted; rejected: refused at "
            "connect by an IP filter or the blocklist).",
            ["result"], registry=registry)
        for result in CONNECTION_RESULTS:
            self.connections.labels(result)
        self.rejections = Counter(
            "mxrules_rejections_total",
            "SMTP rejections (5xx) the milter asked for, by stage (connect, mail, rcpt, data) "
            "and reason (block-filter, blocklist, size, no-rule, no-rule-set, tls-required, "
            "bounced, unresolved-client, too-big: over the size limit of every rule the "
            "recipient matched).",
            ["stage", "reason"], registry=registry)
        self.recipients = Counter(
            "mxrules_recipients_total",
            "Envelope recipients, by result (accepted: a rule takes it; unmanaged: not a "
            "managed domain, passed to Postfix; no-rule, no-rule-set, tls-required: refused; "
            "bounced: refused with the reply of the Bounce action that is all its rules do; "
            "too-big: refused, over the size limit of every rule it matched).",
            ["result"], registry=registry)
        for result in RECIPIENT_RESULTS:
            self.recipients.labels(result)
        self.messages = Counter(
            "mxrules_messages_total",
            "Messages at end of data, by result (spooled: accepted for the actions; passed: "
            "no managed recipient; tempfail: answered 4xx; rejected: answered 5xx).",
            ["result"], registry=registry)
        for result in MESSAGE_RESULTS:
            self.messages.labels(result)
        self.forwarded_unresolved = Counter(
            "mxrules_forwarded_unresolved_total",
            "Messages from a trusted forwarder whose original client could not be named, "
            "answered as forwarder_unresolved says (tempfail or reject), by reason.",
            ["reason"], registry=registry)
        for reason in UNRESOLVED_REASONS:
            self.forwarded_unresolved.labels(reason)
        self.rule_matches = Counter(
            "mxrules_rule_matches_total",
            "Spooled messages each receipt rule matched, by rule name.", ["rule"],
            registry=registry)
        self.errors = Counter(
            "mxrules_milter_errors_total",
            "Internal errors in the milter turned into a temporary failure, by SMTP stage.",
            ["stage"], registry=registry)
        self.post_commit_errors = Counter(
            "mxrules_post_commit_errors_total",
            "Steps that failed after a message was stored, by stage (add-header, remove-header, "
            "remove-recipient: a change to Postfix's copy; bookkeeping); the message stays "
            "accepted.",
            ["stage"], registry=registry)
        for step in POST_COMMIT_STEPS:
            self.post_commit_errors.labels(step)
        self.spool_failures = Counter(
            "mxrules_spool_write_failures_total",
            "Messages that could not be written to the spool (answered 451).",
            registry=registry)
        self.received_bytes = Counter(
            "mxrules_received_bytes_total",
            "Bytes of spooled messages.", registry=registry)
        self.billing_chunks = Counter(
            "mxrules_received_chunks_total",
            "Spooled messages counted in 256 KB chunks, the unit SES bills received mail in.",
            registry=registry)
        self.message_size = Histogram(
            "mxrules_message_size_bytes",
            "Size of spooled messages.",
            buckets=(1e3, 1e4, 5e4, 1e5, 2.56e5, 5e5, 1e6, 5e6, 1e7, 2.5e7, 4e7),
            registry=registry)
        self.spool_seconds = Histogram(
            "mxrules_spool_commit_seconds",
            "Time to commit a job to the spool (fsync and rename) at end of data.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry)
        self.verdicts = Counter(
            "mxrules_verdicts_total",
            "Scan verdicts by scanner (spam, virus, spf, dkim, dmarc) and status (PASS, FAIL, "
            "GRAY, PROCESSING_FAILED, ...).",
            ["scanner", "status"], registry=registry)
        self.scan_seconds = Histogram(
            "mxrules_scan_duration_seconds",
            "Time the scans of one message took at end of data (they run side by side, "
            "so this is the slowest scanner's time).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry)
        self.scan_slot_timeouts = Counter(
            "mxrules_scan_slot_timeouts_total",
            "Messages answered 451 because every scan slot (scan.concurrency) stayed busy "
            "for scan.wait_timeout.",
            registry=registry)


class WorkerMetrics(ConfigMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.actions = Counter(
            "mxrules_actions_total",
            "Action attempts by type and outcome (ok; retry: failed, will be retried; "
            "failed: failed for good, the plan goes on and the job ends as a dead letter; "
            "bounced: the email was over the action's size limit, a DSN was sent as in SES).",
            ["type", "outcome"], registry=registry)
        for kind in ACTION_TYPES:
            for outcome in ACTION_OUTCOMES:
                self.actions.labels(kind, outcome)
        self.action_errors = Counter(
            "mxrules_action_errors_total",
            "Failed action attempts by type and reason (throttled, access-denied, not-found, "
            "timeout, connection, server-error, client-error, no-credentials, os-error, "
            "permanent, other).",
            ["type", "reason"], registry=registry)
        self.action_seconds = Histogram(
            "mxrules_action_duration_seconds",
            "Time one action attempt took (AWS call or bounce delivery), by type.", ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                     300, 900),
            registry=registry)
        self.notifications = Counter(
            "mxrules_action_notifications_total",
            "SNS notifications published for an action's topic_arn, by action type.",
            ["type"], registry=registry)
        self.dispositions = Counter(
            "mxrules_lambda_dispositions_total",
            "Dispositions of Lambda actions (CONTINUE, STOP_RULE, STOP_RULE_SET), as returned "
            "by RequestResponse functions; an Event invocation counts as CONTINUE.",
            ["disposition"], registry=registry)
        self.jobs = Counter(
            "mxrules_jobs_total",
            "Jobs finished, by result (done: every action ran; dead_lettered: moved to the "
            "spool's failed/; corrupt: unreadable, moved to corrupt/).",
            ["result"], registry=registry)
        for result in JOB_RESULTS:
            self.jobs.labels(result)
        self.job_seconds = Histogram(
            "mxrules_job_latency_seconds",
            "Time from acceptance by the milter to the job's last action, retries included.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
            registry=registry)
        self.recovered = Counter(
            "mxrules_jobs_recovered_total",
            "Jobs taken over from a worker that died holding them; each may repeat one action.",
            registry=registry)
        self.bounces_suppressed = Counter(
            "mxrules_bounces_suppressed_total",
            "Bounce actions that sent no DSN, by reason (unauthenticated: neither SPF nor "
            "aligned DMARC passed for the envelope sender; sender-rate, client-rate: the "
            "rate limit for that sender or client IP was reached).",
            ["reason"], registry=registry)
        for reason in BOUNCE_SUPPRESSIONS:
            self.bounces_suppressed.labels(reason)
        self.dead_letters = Counter(
            "mxrules_dead_letters_total",
            "Jobs given up on and moved to the dead-letter state (the spool's failed/; "
            "`mxrules spool requeue` runs them again).", registry=registry)
        self.dead_letters_removed = Counter(
            "mxrules_dead_letters_removed_total",
            "Dead letters removed from failed/ by its retention, by reason (age: older than "
            "spool.failed_max_age; size: the oldest beyond spool.failed_max_size).",
            ["reason"], registry=registry)
        for reason in RETENTION_REASONS:
            self.dead_letters_removed.labels(reason)
        self.dead_letter_bytes = Gauge(
            "mxrules_dead_letter_bytes",
            "Bytes the dead letters in failed/ take together, at the last retention pass.",
            registry=registry)
        self.dead_letter_age = Gauge(
            "mxrules_dead_letter_oldest_age_seconds",
            "Time since the oldest dead letter in failed/ was given up on, at the last "
            "retention pass (0 when there is none).", registry=registry)
        self.retention_bytes = Gauge(
            "mxrules_dead_letter_retention_bytes",
            "The dead letters' size limit in force (spool.failed_max_size; 0: no limit).",
            registry=registry)
        self.retention_age = Gauge(
            "mxrules_dead_letter_retention_age_seconds",
            "The dead letters' age limit in force (spool.failed_max_age; 0: no limit).",
            registry=registry)
