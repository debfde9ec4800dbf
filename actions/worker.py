"""`mxrules worker`: claims spooled jobs and runs their actions.

Each of `worker.threads` threads looks for work in this order: new jobs
(incoming/, oldest first), deferred jobs whose retry time has come, then jobs
left in active/ by a worker that died (their lock is free).  The look is a
directory listing every `worker.scan_interval` seconds -- the scan is the
truth, as in Postfix's queue manager; nothing is lost if a wake-up is missed.
Several worker processes may share one spool: a job belongs to whoever holds
its flock.

Dead letters do not stay forever: a retention thread removes those in failed/
older than `spool.failed_max_age`, then the oldest beyond `spool.failed_max_size`
bytes, each removal logged and counted; it runs at start, whenever a job is
dead-lettered, and when the oldest is due to expire (at least once a minute).

SIGTERM or SIGINT drains: no new job is taken, each thread finishes the action
it is in, saves the job's progress and hands it back; after
`worker.drain_timeout` seconds the program exits anyway, and whatever was still
running is taken over at the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from prometheus_client import CollectorRegistry

from mxrules import config as config_mod
from mxrules.config import Config
from mxrules.errors import EX_UNAVAILABLE, ConfigError, CorruptJobError, SpoolError
from mxrules.job import Progress
from mxrules.metrics import WorkerMetrics
from mxrules.service import kv, notify_ready, serve_metrics, setup_logging
from mxrules.spool import Claim, Spool, retention_victims
from mxrules.spool_files import ACTIVE, DEFERRED, INCOMING, META

from .aws import Clients
from .bounce_limit import BounceLimiter
from .retry import RetryPolicy
from .runner import Runner
from .spool_gauges import SpoolCollector

log = logging.getLogger("mxrules.worker")


# After a retried action succeeds, the jobs waiting on its type are woken at most
# this often (a flapping endpoint must not turn backoff into a busy loop).
WAKE_INTERVAL_NS = 10 * 1_000_000_000
# The longest the retention thread sleeps: the size gauges stay this fresh.
RETENTION_INTERVAL = 60.0


def _waits_on(progress: Progress) -> str:
    """The action type a deferred job waits on, if its last failure was transient."""
    return progress.failure.waits_on if progress.failure else ""


class Worker:
    def __init__(self, cfg: Config, registry: CollectorRegistry) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool_directory)
        self.metrics = WorkerMetrics(registry)
        self.metrics.loaded(at_start=True)
        registry.register(SpoolCollector(self.spool))
        w = cfg.worker
        self.policy = RetryPolicy.of(w)
        self.stopping = threading.Event()
        # deferred id -> (mtime_ns, next_due, action type it waits on or "")
        self._due: dict[str, tuple[int, float, str]] = {}
        self._woken: dict[str, int] = {}  # action type -> when a retry of it last succeeded
        # incoming/ as last listed, newest first (pop() gives the oldest), shared by the
        # threads: a backlog of N jobs is listed about once, not once per job (O(N) each).
        self._incoming: list[str] = []
        self._lock = threading.Lock()
        self.generation = 0  # bumped by each successful reload
        # DSN counts for the rate limits: the process's, kept across reloads.
        self.bounce_limiter = BounceLimiter()
        # Jobs this process leaves alone until a time.monotonic(): those an error
        # could not even be recorded for (see _back_off).
        self._held_off: dict[str, float] = {}
        self._claim_errors: dict[str, str] = {}  # job id -> the last claim error logged
        self.retention_due = threading.Event()  # set: a retention pass is wanted now

    # -- finding work ---------------------------------------------------------
    def _try(self, state: str, job_id: str) -> Claim | None:
        with self._lock:
            until = self._held_off.get(job_id)
            if until is not None and until > time.monotonic():
                return None
            self._held_off.pop(job_id, None)
        try:
            claim = self.spool.claim(state, job_id)
        except CorruptJobError as exc:
            self.metrics.jobs.labels("corrupt").inc()
            log.error("job moved to corrupt/: %s", exc)
            return None
        except SpoolError as exc:
            # One job that cannot be claimed (a lock it may not open) must not stop
            # the look at the others; logged again only when its error changes.
            if self._claim_errors.get(job_id) != str(exc):
                self._claim_errors[job_id] = str(exc)
                log.error("cannot claim job %s in %s/, left where it is: %s",
                          job_id, state, exc)
            return None
        self._claim_errors.pop(job_id, None)
        return claim

    def _next_due(self, job_id: str) -> float:
        """A deferred job's retry time, read again only when its job.json changed."""
        path = os.path.join(self.spool.path(DEFERRED, job_id), META)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return float("inf")
        with self._lock:
            cached = self._due.get(job_id)
        if cached and cached[0] == mtime:
            due, waits_on = cached[1], cached[2]
        else:
            try:
                progress = self.spool.load(DEFERRED, job_id).progress
                due, waits_on = progress.next_due, _waits_on(progress)
            except CorruptJobError:
                due, waits_on = 0.0, ""  # claim it now; the claim moves it to corrupt/
            except SpoolError:
                return float("inf")
            with self._lock:
                self._due[job_id] = (mtime, due, waits_on)
        if waits_on and mtime < self._woken.get(waits_on, 0):
            return 0.0  # what it failed to reach has been reached since
        return due

    def _next_incoming(self, may_list: bool) -> tuple[str | None, bool]:
        """The oldest id not yet handed out from the last listing of incoming/.

        When those are used up, incoming/ is listed again if `may_list`; the second
        value tells whether this call listed.  An id is only a candidate: the claim
        decides, so a stale one (taken by another process) costs one failed open.
        """
        with self._lock:
            listed = False
            if not self._incoming and may_list:
                self._incoming = self.spool.ids(INCOMING)[::-1]
                listed = True
            return (self._incoming.pop() if self._incoming else None), listed

    def next_job(self) -> Claim | None:
        may_list = True  # at most one listing per call: jobs nobody can claim end the loop
        while True:
            job_id, listed = self._next_incoming(may_list)
            may_list = may_list and not listed
            if job_id is None:
                break
            claim = self._try(INCOMING, job_id)
            if claim:
                return claim
        now = time.time()
        deferred = self.spool.ids(DEFERRED)
        with self._lock:
            for gone in set(self._due) - set(deferred):
                del self._due[gone]
        for job_id in deferred:
            if self._next_due(job_id) <= now:
                claim = self._try(DEFERRED, job_id)
                if claim:
                    return claim
        for job_id in self.spool.ids(ACTIVE):
            claim = self._try(ACTIVE, job_id)
            if claim:
                self.metrics.recovered.inc()
                log.warning("job recovered from a worker that stopped holding it %s "
                            "(its last action may run again)",
                            kv(message_id=job_id, queue_id=claim.job.queue_id))
                return claim
        return None

    # -- working ----------------------------------------------------------------
    def reload(self, path: str) -> bool:
        """Load the config again (SIGUSR1, `systemctl reload`); a bad one is refused.

        AWS, retry, bounce and logging settings take effect from each thread's next
        job; the spool, thread count and metrics address need a restart.
        """
        try:
            cfg = config_mod.load(path)
        except ConfigError as exc:
            self.metrics.load_failed()
            log.error("config reload refused, keeping the old config: %s", exc)
            return False
        except Exception:  # a reload must never take the reloading thread down
            self.metrics.load_failed()
            log.exception("config reload failed, keeping the old config")
            return False
        for what, old, new in (("spool.directory", self.cfg.spool_directory,
                                cfg.spool_directory),
                               ("worker.threads", self.cfg.worker.threads, cfg.worker.threads),
                               ("metrics.worker_listen", self.cfg.worker.metrics_listen,
                                cfg.worker.metrics_listen)):
            if old != new:
                log.warning("config reload: %s changed (%s -> %s); it takes effect at the "
                            "next restart", what, old, new)
        # The level only: the handler stays, other threads are logging through it.
        logging.getLogger().setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))
        w = cfg.worker
        with self._lock:
            self.cfg = cfg
            self.policy = RetryPolicy.of(w)
            self.generation += 1
        self.metrics.loaded()
        self.retention_due.set()  # the dead letters' limits may have changed
        log.info("config reloaded from %s", path)
        return True

    def _runner(self) -> tuple[int, Runner]:
        with self._lock:
            cfg, policy, generation = self.cfg, self.policy, self.generation
        return generation, Runner(cfg.worker, Clients(cfg.aws), self.metrics, policy,
                                  self.stopping, recovered=self.recovered,
                                  bounce_limiter=self.bounce_limiter,
                                  dead_lettered=self.retention_due.set)

    # -- dead letters' retention --------------------------------------------------
    def enforce_retention(self, now: float | None = None) -> float:
        """One pass over failed/; returns the seconds until the next one is due."""
        w = self.cfg.worker
        max_age, max_size = w.failed_max_age, w.failed_max_size
        self.metrics.retention_age.set(max_age)
        self.metrics.retention_bytes.set(max_size)
        now = time.time() if now is None else now
        letters = self.spool.dead_letters()
        removed = set()
        for letter, reason in retention_victims(letters, max_age, max_size, now):
            try:
                if not self.spool.remove_dead_letter(letter.job_id):
                    continue  # requeued or held meanwhile: it is no dead letter now
            except SpoolError as exc:  # one that cannot be removed holds up no other
                log.error("dead letter not removed by retention %s", kv(
                    message_id=letter.job_id, reason=reason, error=exc))
                continue
            removed.add(letter.job_id)
            self.metrics.dead_letters_removed.labels(reason).inc()
            log.warning("dead letter removed by retention %s", kv(
                message_id=letter.job_id, reason=reason, age=f"{now - letter.since:.0f}s",
                size=letter.size, limit=f"{max_age:.0f}s" if reason == "age" else max_size))
        kept = [letter for letter in letters if letter.job_id not in removed]
        self.metrics.dead_letter_bytes.set(sum(letter.size for letter in kept))
        self.metrics.dead_letter_age.set(max(0.0, now - kept[0].since) if kept else 0.0)
        if not (kept and max_age):
            return RETENTION_INTERVAL
        return min(RETENTION_INTERVAL, max(0.1, kept[0].since + max_age - now))

    def retention(self) -> None:
        """The retention thread: a pass now, then whenever one is due or wanted."""
        while not self.stopping.is_set():
            self.retention_due.clear()
            try:
                wait = self.enforce_retention()
            except Exception:  # a bad pass must not end the thread: failed/ would grow
                log.exception("dead letters' retention pass failed")
                wait = RETENTION_INTERVAL
            self.retention_due.wait(wait)

    def recovered(self, kind: str) -> None:
        """An action of `kind` succeeded on a retry: retry now the jobs waiting on it.

        Without this a backlog drains only as fast as each job's backoff comes due
        (up to worker.retry_max_delay after the outage ends).  Only jobs deferred
        before this moment, by a failure of the same action type that says nothing
        about the job itself (connection, timeout, throttled, server error), are
        woken; a job that fails again is deferred anew with its own backoff.
        """
        now = time.time_ns()
        with self._lock:
            if now - self._woken.get(kind, 0) < WAKE_INTERVAL_NS:
                return
            self._woken[kind] = now
        log.info("retried %s action succeeded: deferred %s jobs that failed to reach it "
                 "are retried now", kind, kind)

    def work(self, name: str, once: bool = False) -> None:
        generation, runner = self._runner()
        while not self.stopping.is_set():
            try:
                if generation != self.generation:
                    generation, runner = self._runner()
                claim = self.next_job()
            except SpoolError as exc:
                log.error("spool unusable: %s", exc)
                claim = None
            except Exception:
                # Whatever it is, it must not cost a thread: jobs would wait for a restart.
                log.exception("unexpected error in %s while looking for work", name)
                claim = None
            if claim is None:
                if once:
                    return
                self.stopping.wait(self.cfg.worker.scan_interval)
                continue
            try:
                runner.run(claim)
            except SpoolError as exc:
                log.error("spool error while working on %s: %s", claim.job_id, exc)
                self._hold_off(claim)
            except Exception as exc:
                log.exception("unexpected error in %s on job %s", name, claim.job_id)
                self._back_off(runner, claim, exc)
            finally:
                claim.release()

    def _back_off(self, runner: Runner, claim: Claim, exc: Exception) -> None:
        """A job that raised outside its actions' handling waits, as a failed action does."""
        if claim.fd < 0:
            return  # it had already left active/ (done, deferred, failed)
        try:
            runner.unexpected(claim, exc)
        except Exception:
            log.exception("cannot record the error of job %s", claim.job_id)
            self._hold_off(claim)

    def _hold_off(self, claim: Claim) -> None:
        """Leave a job this process could not record anything for alone for a while.

        It stays in active/, where the next look would take it again at once.
        """
        if claim.fd < 0:
            return
        delay = self.policy.max_delay
        log.error("job %s left in active/; this worker tries it again in %.0fs",
                  claim.job_id, delay)
        with self._lock:
            self._held_off[claim.job_id] = time.monotonic() + delay

    def run_threads(self, once: bool = False) -> None:
        threads = [threading.Thread(target=self.work, args=(f"worker-{i}", once),
                                    name=f"worker-{i}", daemon=True)
                   for i in range(self.cfg.worker.threads)]
        for t in threads:
            t.start()
        if once:
            for t in threads:
                t.join()
            return
        self.stopping.wait()
        deadline = time.monotonic() + self.cfg.worker.drain_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = sum(t.is_alive() for t in threads)
        if busy:
            log.warning("drain timeout: %d thread(s) still in an action; their jobs are "
                        "taken over at the next start", busy)


def run(path: str, once: bool = False) -> int:
    cfg = config_mod.load(path)  # a ConfigError becomes exit 78 in the CLI
    setup_logging(cfg.log_level)
    registry = CollectorRegistry()
    worker = Worker(cfg, registry)
    try:
        worker.spool.ensure()
        worker.spool.clean_done()
    except (OSError, SpoolError) as exc:
        log.error("spool %s is not usable: %s", cfg.spool_directory, exc)
        return EX_UNAVAILABLE
    try:
        serve_metrics(cfg.worker.metrics_listen, registry)
    except (OSError, ValueError) as exc:
        log.error("cannot serve metrics on %s: %s", cfg.worker.metrics_listen, exc)
        return EX_UNAVAILABLE

    def drain(signum: int, _frame: object) -> None:
        log.info("%s: draining", signal.Signals(signum).name)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    # A reload reads files and builds clients: not in a signal handler, in a thread.
    reload_wanted = threading.Event()
    signal.signal(signal.SIGUSR1, lambda _s, _f: reload_wanted.set())

    def reloader() -> None:
        while not worker.stopping.is_set():
            if reload_wanted.wait(0.5):
                reload_wanted.clear()
                worker.reload(path)

    threading.Thread(target=reloader, name="reload", daemon=True).start()
    threading.Thread(target=worker.retention, name="retention", daemon=True).start()
    log.info("worker starting: spool=%s threads=%d retry_window=%ss region=%s endpoint=%s",
             cfg.spool_directory, cfg.worker.threads, int(cfg.worker.retry_window),
             cfg.aws.region or "-", cfg.aws.endpoint_url or "-")
    notify_ready()  # config loaded, spool usable, metrics served, SIGTERM drains
    worker.run_threads(once)
    log.info("worker stopped")
    return 0
