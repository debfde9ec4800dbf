"""mxrules: Amazon SES email receiving for your own Postfix.

The shared core lives here (config, rule model, decisions, spool format, CLI);
the SMTP-time half is `mxrules.milter` (folder `milter/`) and the worker half
is `mxrules.actions` (folder `actions/`).
"""

__version__ = "0.1.0"
