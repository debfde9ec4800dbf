"""Every Prometheus metric mxrules exports, defined in one place.

Metrics are built on a registry passed in (tests make a fresh one); nothing is
created at import.  Labels are bounded: results, reasons, rule names, stages --
never addresses or message ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# SES bills received mail in 256 KB chunks; the same count helps size a fleet.
BILLING_CHUNK = 256 * 1024


class MilterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Counter(
            "mxrules_connections_total",
            "SMTP connections seen by the milter, by result (accepted, rejected).",
            ["result"], registry=registry)
        self.rejections = Counter(
            "mxrules_rejections_total",
            "SMTP rejections the milter asked for, by stage and reason.",
            ["stage", "reason"], registry=registry)
        self.recipients = Counter(
            "mxrules_recipients_total",
            "Envelope recipients, by result (accepted, unmanaged, no-rule, no-rule-set, "
            "tls-required).",
            ["result"], registry=registry)
        self.messages = Counter(
            "mxrules_messages_total",
            "Messages at end of data, by result (spooled, passed: no managed recipient, "
            "tempfail, rejected).",
            ["result"], registry=registry)
        self.rule_matches = Counter(
            "mxrules_rule_matches_total",
            "Messages each receipt rule matched.", ["rule"], registry=registry)
        self.errors = Counter(
            "mxrules_milter_errors_total",
            "Internal errors turned into a temporary failure, by stage.",
            ["stage"], registry=registry)
        self.spool_failures = Counter(
            "mxrules_spool_write_failures_total",
            "Messages that could not be written to the spool (answered 451).",
            registry=registry)
        self.received_bytes = Counter(
            "mxrules_received_bytes_total",
            "Bytes of spooled messages.", registry=registry)
        self.billing_chunks = Counter(
            "mxrules_received_chunks_total",
            "Spooled messages counted in SES's 256 KB billing chunks.", registry=registry)
        self.message_size = Histogram(
            "mxrules_message_size_bytes",
            "Size of spooled messages.",
            buckets=(1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 5e6, 1e7, 2.5e7, 4.2e7),
            registry=registry)
        self.spool_seconds = Histogram(
            "mxrules_spool_commit_seconds",
            "Time to commit a job to the spool (fsync and rename) at end of data.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry)
        self.verdicts = Counter(
            "mxrules_verdicts_total",
            "Scan verdicts by scanner (spam, virus, spf, dkim, dmarc) and status.",
            ["scanner", "status"], registry=registry)
        self.scan_seconds = Histogram(
            "mxrules_scan_duration_seconds",
            "Time all scans of one message took at end of data (they run side by side).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry)
        self.reloads = Counter(
            "mxrules_config_reloads_total",
            "Config reloads, by result (ok, failed).", ["result"], registry=registry)
        self.reload_success = Gauge(
            "mxrules_config_last_reload_success_timestamp_seconds",
            "When a config was last loaded successfully (Unix time).", registry=registry)
        self.reload_ok = Gauge(
            "mxrules_config_last_reload_successful",
            "1 if the last attempt to load the config succeeded, else 0.", registry=registry)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.actions = Counter(
            "mxrules_actions_total",
            "Action attempts by type and outcome (ok; retry: failed, will be retried; "
            "failed: failed for good, the job is a dead letter).",
            ["type", "outcome"], registry=registry)
        self.action_errors = Counter(
            "mxrules_action_errors_total",
            "Failed action attempts by type and reason (throttled, access-denied, timeout, "
            "connection, server-error, client-error, permanent, ...).",
            ["type", "reason"], registry=registry)
        self.action_seconds = Histogram(
            "mxrules_action_duration_seconds",
            "Time an action attempt took, by type.", ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry)
        self.notifications = Counter(
            "mxrules_action_notifications_total",
            "Notifications published for an action's topic_arn, by action type.",
            ["type"], registry=registry)
        self.dispositions = Counter(
            "mxrules_lambda_dispositions_total",
            "Dispositions returned by RequestResponse Lambda functions.",
            ["disposition"], registry=registry)
        self.jobs = Counter(
            "mxrules_jobs_total",
            "Jobs finished by result (done, dead_lettered, corrupt).",
            ["result"], registry=registry)
        self.job_seconds = Histogram(
            "mxrules_job_latency_seconds",
            "From acceptance by the milter to the job's last action.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400),
            registry=registry)
        self.recovered = Counter(
            "mxrules_jobs_recovered_total",
            "Jobs taken over from a worker that died holding them; each may repeat one action.",
            registry=registry)
        self.dead_letters = Counter(
            "mxrules_dead_letters_total",
            "Jobs moved to the dead-letter state (spool failed/).", registry=registry)
