"""`mxrules milter`: the long-running SMTP-time program.

It loads the config (exit 78 when it is bad), serves Prometheus metrics,
watches the config files and hands libmilter the `MxrulesMilter` class.

Stop.  libmilter owns SIGHUP, SIGTERM and SIGINT: its signal thread takes
them with sigwait(), which only works if every other thread blocks them (a
thread that does not would take the signal instead, and the default action
kills the process: no "milter stopped", no cleanup).  libmilter blocks them
in the thread that calls smfi_main(), but the threads started before that
(metrics, config watch, janitor) would not inherit the mask; so `run` blocks
them first, before any thread exists.  (A program started from here would
inherit the mask too: the milter starts none.)  When libmilter returns, the
receptions still open are dropped and the process ends at once (`_exit`).

Reload.  Python signal handlers never run while the main thread sits in
libmilter's loop.  So a watcher thread reloads when any config file changes
(checked every `milter.reload_interval` seconds) or at once on SIGUSR1, which
is blocked in every thread and taken with sigwait().  A new config is swapped
in with one reference assignment; a bad one is logged and the old one stays in
force.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import NoReturn

from prometheus_client import CollectorRegistry

from mxrules import config as config_mod
from mxrules.decision import Engine
from mxrules.errors import EX_SOFTWARE, EX_UNAVAILABLE, ConfigError
from mxrules.metrics import MilterMetrics
from mxrules.service import notify_ready, serve_metrics, setup_logging
from mxrules.spool import Spool

from .session import Runtime

log = logging.getLogger("mxrules.milter")

RELOAD_SIGNAL = signal.SIGUSR1
# What libmilter's signal thread waits for: SIGHUP and SIGTERM stop, SIGINT aborts.
STOP_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def _fingerprint(paths: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class Reloader:
    """Watches the config files and swaps in a new engine when they change."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path
        self.files = runtime.engine.config.files
        self.seen = _fingerprint(self.files)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def reload(self, why: str) -> bool:
        with self.lock:
            old = self.runtime.engine.config
            self.seen = _fingerprint(self.files)
            metrics = self.runtime.metrics
            try:
                new = config_mod.load(self.path)
            except ConfigError as exc:
                metrics.load_failed()
                for problem in exc.problems:
                    log.error("reload rejected (%s), old config stays in force: %s", why, problem)
                return False
            except Exception as exc:  # a reload must never take the milter down
                metrics.load_failed()
                log.exception("reload failed (%s), old config stays in force: %r", why, exc)
                return False
            if new.milter_listen != old.milter_listen:
                log.warning("milter.listen changed to %s: takes effect at the next restart",
                            new.milter_listen)
            if new.spool_directory != old.spool_directory:
                log.warning("spool.directory changed to %s: takes effect at the next restart",
                            new.spool_directory)
                new = _keep_spool(new, old.spool_directory)
            self.runtime.swap(Engine(new))
            self.files = new.files
            self.seen = _fingerprint(self.files)
            metrics.loaded()
            logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
            log.info("config reloaded (%s): active_rule_set=%s rules=%d ip_filters=%d "
                     "blocklist_entries=%d", why, new.active_rule_set,
                     len(new.active.rules) if new.active else 0, len(new.ip_filters),
                     len(new.blocklist))
            return True

    def watch(self) -> None:
        while not self.stop.wait(self.runtime.engine.config.reload_interval):
            if _fingerprint(self.files) != self.seen:
                self.reload("file changed")

    def on_signal(self) -> None:
        while True:
            signal.sigwait({RELOAD_SIGNAL})
            self.reload("SIGUSR1")

    def start(self) -> None:
        threading.Thread(target=self.watch, name="config-watch", daemon=True).start()
        threading.Thread(target=self.on_signal, name="config-signal", daemon=True).start()


def _keep_spool(new: config_mod.Config, directory: str) -> config_mod.Config:
    from dataclasses import replace
    return replace(new, spool_directory=directory)


def janitor(runtime: Runtime, max_age: float, stop: threading.Event) -> None:
    """Remove receptions abandoned in tmp/ (a milter killed mid-DATA)."""
    while True:
        try:
            removed = runtime.spool.clean_tmp(max_age, time.time())
            if removed:
                log.info("spool: removed %d abandoned reception(s) from tmp/", removed)
        except OSError as exc:
            log.warning("spool: cannot clean tmp/: %s", exc)
        if stop.wait(max(60.0, max_age / 4)):
            return


def run(path: str) -> int:
    # Block the reload and stop signals before any thread exists, so every
    # thread (libmilter's included) inherits the mask and only sigwait() sees
    # them.  One that comes meanwhile stays pending until libmilter waits for it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {RELOAD_SIGNAL, *STOP_SIGNALS})
    cfg = config_mod.load(path)  # a ConfigError becomes exit 78 in the CLI
    setup_logging(cfg.log_level)

    registry = CollectorRegistry()
    metrics = MilterMetrics(registry)
    metrics.loaded(at_start=True)
    spool = Spool(cfg.spool_directory)
    try:
        spool.ensure()
    except OSError as exc:
        # Not fatal: every message will be answered 451 until the spool is back.
        log.error("spool %s is not usable (%s); answering 451 until it is", spool.root, exc)
    runtime = Runtime(Engine(cfg), spool, metrics)
    try:
        serve_metrics(cfg.metrics_listen, registry)
    except (OSError, ValueError) as exc:
        log.error("cannot serve metrics on %s: %s", cfg.metrics_listen, exc)
        return EX_UNAVAILABLE
    Reloader(runtime, path).start()
    stop = threading.Event()
    threading.Thread(target=janitor, args=(runtime, 2.0 * cfg.milter_timeout, stop),
                     name="spool-janitor", daemon=True).start()

    from . import libmilter  # imports pymilter: keep the rest importable without it

    log.info("milter starting: listen=%s spool=%s active_rule_set=%s domains=%s delivery=%s",
             cfg.milter_listen, cfg.spool_directory, cfg.active_rule_set,
             ",".join(cfg.domains) or "-", cfg.delivery)
    status = EX_SOFTWARE
    try:
        libmilter.serve(runtime, cfg.milter_listen, cfg.milter_timeout, cfg.socket_mode,
                        listening=notify_ready)
        status = 0
    except Exception as exc:
        log.error("milter stopped: %s", exc)
    finally:
        stop.set()
        _drop_receptions(spool)
    if status == 0:
        log.info("milter stopped")
    _exit(status)


def _drop_receptions(spool: Spool) -> None:
    """Leave nothing half-received in tmp/ when libmilter has stopped.

    libmilter does not wait for its connections: the process ends with them,
    and Postfix answers a message still in DATA or being scanned with its
    milter_default_action (tempfail: the client sends it again).  So its
    reception goes now; a commit in progress finishes first, and that job
    stands whole.
    """
    dropped = spool.stop_receiving()
    if dropped:
        log.info("milter stopping: dropped=%d (messages not answered yet: Postfix "
                 "answers them 4xx and their clients send them again)", dropped)


def _exit(status: int) -> NoReturn:
    """End the process now, connections and all.

    libmilter returns without waiting for its connection threads, which call
    into Python: finalizing the interpreter under them is not safe, and it
    would wait for the scans still running (up to `scan.timeout`).  What must
    outlive the process is on disk already; the log is flushed here.
    """
    logging.shutdown()
    os._exit(status)
