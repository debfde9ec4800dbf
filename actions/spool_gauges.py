"""The spool's gauges: jobs per state and the oldest one's age, read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mxrules.errors import SpoolError
from mxrules.spool import Spool, message_time
from mxrules.spool_files import STATES


class SpoolCollector(Collector):
    """Jobs per state and the age of the oldest, read from the spool at scrape time."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "mxrules_spool_jobs",
            "Jobs in the spool, by state (incoming: waiting for a worker; active: being "
            "worked on; deferred: waiting to retry; failed: dead letters; corrupt: unreadable).",
            labels=["state"])
        oldest = GaugeMetricFamily(
            "mxrules_spool_oldest_job_age_seconds",
            "Time since the milter accepted the oldest job in each state (0 when the state "
            "has no job).", labels=["state"])
        now = time.time()
        for state in STATES:
            try:
                ids = self.spool.ids(state)
            except SpoolError:
                ids = []
            count.add_metric([state], len(ids))
            age = now - min(message_time(i) for i in ids) if ids else 0.0
            oldest.add_metric([state], max(0.0, age))
        yield count
        yield oldest
