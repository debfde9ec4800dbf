"""What a benchmark ran on: printed with its results so a number never loses its machine.

Imported by the bench scripts (each puts bench/ on sys.path itself; the
repository root is never on it).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _run(*argv: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def describe() -> list[str]:
    """Lines naming the CPU, memory, OS and the versions the figures depend on."""
    ram_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    ram = f"{int(ram_kib) / 1024 / 1024:.1f} GiB" if ram_kib.isdigit() else "?"
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    try:
        import Milter

        pymilter = str(getattr(Milter, "__version__", "?"))
    except ImportError:
        pymilter = "missing"
    return [
        f"machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({_first('/proc/cpuinfo', 'model name')}), {ram} RAM",
        f"software: Debian {debian}, kernel {platform.release()}, "
        f"Postfix {_run('postconf', '-d', '-h', 'mail_version')}, "
        f"CPython {platform.python_version()}, pymilter {pymilter}",
    ]


def load() -> str:
    """The 1, 5 and 15-minute load averages: how busy the machine was around a run."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
