#!/usr/bin/python3
"""/usr/bin/mxrules: the mxrules command, from the package's private module directory."""
import sys

sys.path.insert(0, "/usr/share/mxrules")

from mxrules.cli import main

sys.exit(main())
