"""The SMTP-time half of mxrules: decide at connect and RCPT, spool at end of data.

`session` holds the per-connection state machine (no pymilter import, so it is
tested with plain objects); `adapter` is the thin pymilter class around it;
`daemon` is the program `mxrules milter`: config, reload, metrics, libmilter.
"""
