"""The spool's layout on disk and the file operations every spool module shares.

The state directories and the files of a job are named here, once; the
operations are those the spool's durability rests on: files created never
through a link, job.json read without following one, directory fsyncs (shared
by concurrent commits).  mxrules.spool moves jobs between the states;
mxrules.spool_writer receives them into tmp/ and commits them to incoming/.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from typing import BinaryIO

from .errors import CorruptJobError, SpoolError

# The states, one directory each, named once (as Postfix's mail_queue.h names its
# queues); only the spool modules touch the directories, the others pass these names.
TMP = "tmp"  # being received by the milter; never read by a worker
INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
FAILED = "failed"
CORRUPT = "corrupt"
DONE = "done"  # finished, being removed
# The states a job waits in: listed by `mxrules spool list`, counted by the metrics.
STATES = (INCOMING, ACTIVE, DEFERRED, FAILED, CORRUPT)
# Every state directory the spool has (tmp/ and done/ are passages, not waits).
DIRECTORIES = (TMP, *STATES, DONE)
MESSAGE = "message"
META = "job.json"
LOCK = "lock"


def remove_job_dir(path: str) -> None:
    """Remove a job directory from done/: its files, then itself.

    A job holds a few plain files, so this is a listing, an unlink each and an rmdir
    (shutil.rmtree costs several system calls more per entry); anything unexpected,
    such as a subdirectory, falls back to rmtree.  Leftovers are cleaned at start.
    """
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


# Spool files are never opened through a symbolic link.  The spool belongs to the
# mxrules user; a link planted there must not lead a process with other rights
# (root running `mxrules spool`, before it switches to the spool's owner) to
# read or write a file elsewhere.  O_NONBLOCK: a FIFO planted as job.json must
# not hang its reader (it is then refused as not a regular file).
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def create(path: str) -> BinaryIO:
    """A new file at `path` for writing; whatever is there already (a link too) is refused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666)
    return os.fdopen(fd, "wb")


def open_lock(directory: str, job_id: str) -> int | None:
    """The job's lock file, opened (not locked); None if the job left `directory`."""
    try:
        return os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # ELOOP: a link planted as the lock; EACCES: not the owner's
        raise SpoolError(f"cannot open lock of job {job_id}: {exc}") from exc


def read_job_file(path: str, job_id: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    except FileNotFoundError:
        raise CorruptJobError(job_id, "job.json is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptJobError(job_id, "job.json is a symbolic link") from None
        raise SpoolError(f"cannot read job {job_id}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptJobError(job_id, "job.json is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SpoolError(f"cannot read job {job_id}: {exc}") from exc
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SharedDirSync:
    """fsync of one directory, shared by the commits that need it at the same time.

    A commit needs its rename in the directory durable before Postfix may
    answer 250, and any fsync of the directory that starts after the rename
    makes it so.  Under load many milter threads commit at once: each takes a
    ticket after its rename; one of them runs the fsync for every ticket taken
    before it started, and the others wait for it instead of queueing fsyncs
    of their own.  A ticket that the running fsync does not cover (taken after
    it started) gets the next one.  A failed fsync covers nothing: a waiter
    then runs its own and gets its own error.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._tickets = 0  # handed out so far
        self._durable = 0  # every ticket up to this one is covered by a completed fsync
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            while self._running and self._durable < ticket:
                self._cond.wait()
            if self._durable >= ticket:
                return
            self._running = True
            covers = self._tickets  # every rename before this instant
        done = False
        try:
            fsync_dir(self.path)
            done = True
        finally:
            with self._cond:
                self._running = False
                if done:
                    self._durable = max(self._durable, covers)
                self._cond.notify_all()


def mtime(path: str, fallback: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return os.lstat(fallback).st_mtime
