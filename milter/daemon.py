"""`mxrules milter`: the long-running SMTP-time program.

It loads the config (exit 78 when it is bad), serves Prometheus metrics,
watches the config files and hands libmilter the `MxrulesMilter` class.

Reload.  libmilter owns SIGHUP and SIGTERM (both: stop), and SIGINT, and Python
signal handlers never run while the main thread sits in libmilter's loop.  So
a watcher thread reloads when any config file changes (checked every
`milter.reload_interval` seconds) or at once on SIGUSR1, which is blocked in
every thread and taken with sigwait().  A new config is swapped in with one
reference assignment; a bad one is logged and the old one stays in force.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from prometheus_client import CollectorRegistry

from mxrules import config as config_mod
from mxrules.decision import Engine
from mxrules.errors import EX_SOFTWARE, EX_UNAVAILABLE, ConfigError
from mxrules.metrics import MilterMetrics
from mxrules.service import serve_metrics, setup_logging
from mxrules.spool import Spool

from .session import Runtime

log = logging.getLogger("mxrules.milter")

RELOAD_SIGNAL = signal.SIGUSR1


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
    cfg = config_mod.load(path)  # a ConfigError becomes exit 78 in the CLI
    setup_logging(cfg.log_level)

    # Block the reload signal before any thread exists, so every thread
    # (libmilter's included) inherits the mask and only sigwait() sees it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {RELOAD_SIGNAL})

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
    try:
        libmilter.serve(runtime, cfg.milter_listen, cfg.milter_timeout, cfg.socket_mode)
    except Exception as exc:
        log.error("milter stopped: %s", exc)
        return EX_SOFTWARE
    finally:
        stop.set()
    log.info("milter stopped")
    return 0
