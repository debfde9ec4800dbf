"""Root conftest: load the integration harness fixtures as a plugin.

tests/ has no __init__.py on purpose, so pytest puts tests/ (never the repository
root, whose milter/ folder would shadow pymilter's C module) on sys.path and
``harness`` imports as a top-level package.
"""

pytest_plugins = ["harness.fixtures"]
