"""The worker half of mxrules: claims spooled jobs and runs their actions."""
