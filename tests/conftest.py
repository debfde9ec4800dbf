"""Root conftest: load the integration harness fixtures as a plugin.

tests/ (never the repository root, whose milter/ folder would shadow pymilter's C
module) is on sys.path, via pyproject's ``pythonpath = ["tests"]`` or, in pytest's
default import mode, because tests/ has no __init__.py; so ``harness`` imports as a
top-level package.
"""

import os

pytest_plugins = [
    "harness.fixtures", "harness.moto_fixtures", "harness.scanner_fixtures", "harness.faults",
    "harness.prometheus",
]

# tests/package/ checks the installed Debian package; `./run test` runs it on its
# own, under /usr/bin/python3, after building and installing the .deb.
collect_ignore = [] if os.environ.get("MXRULES_INSTALLED") == "1" else ["package"]
# tests/system/ boots a container with the .deb: `./run test` runs it after the
# package stage; `./run test tests/system` runs it alone (a path named on the command
# line is collected all the same).
collect_ignore.append("system")
