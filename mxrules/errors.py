"""One exception root for mxrules, and the exit codes its programs use.

Exit codes follow sysexits(3) so that systemd (`RestartPreventExitStatus=78`)
can tell a bad config, which no restart will mend, from a crash.
"""

from __future__ import annotations

from dataclasses import dataclass

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_TEMPFAIL = 75
EX_CONFIG = 78


class MxrulesError(Exception):
    """Root of every error mxrules raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where it is and what is wrong."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class ConfigError(MxrulesError):
    """A config (YAML, SES export, blocklist file) that cannot be used.

    Carries every problem found, not just the first, so an operator mends
    them all in one go.
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SpoolError(MxrulesError):
    """The spool cannot take or give a job (disk full, directory missing...)."""


class CorruptJobError(SpoolError):
    """A job on disk that cannot be decoded; it is moved aside, never deleted."""

    def __init__(self, job_id: str, cause: str) -> None:
        self.job_id = job_id
        self.cause = cause
        super().__init__(f"job {job_id}: {cause}")


def read_config_file(path: str) -> str:
    """A config file's text, or a ConfigError saying why it cannot be had."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(path, "", f"not UTF-8 text: {exc}")]) from None
