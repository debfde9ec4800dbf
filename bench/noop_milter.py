"""A milter that does nothing: the floor of a Python milter behind Postfix.

The same libmilter binding (pymilter) and the same callbacks as the mxrules
milter -- connect, HELO, MAIL, RCPT, headers, end of headers, body, end of
data -- each returning CONTINUE, with HELO, header, end-of-header and body
callbacks marked `@Milter.noreply` as mxrules marks them (Postfix does not
wait for their replies). Whatever a milter costs beyond this is the milter's
own work.

    PYTHONSAFEPATH=1 .venv/bin/python bench/noop_milter.py unix:/run/noop.sock
    PYTHONSAFEPATH=1 .venv/bin/python bench/noop_milter.py inet:9950@127.0.0.1

Run with PYTHONSAFEPATH=1 from the repository root, like everything here:
pymilter's C module is called `milter`, which the repository's milter/ folder
would otherwise shadow. A unix socket is made world-writable (umask 0) so that
Postfix's smtpd, which runs as another user, can connect to it.
"""

from __future__ import annotations

import os
import sys

import Milter


class NoopMilter(Milter.Base):
    """One instance per SMTP connection; every callback only says CONTINUE."""

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        return Milter.CONTINUE


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} unix:/path | inet:PORT@127.0.0.1")
    listen = sys.argv[1]
    if listen.startswith("unix:"):
        os.umask(0)
    Milter.factory = NoopMilter
    Milter.runmilter("noop", listen, timeout=600)


if __name__ == "__main__":
    main()
