"""Integration-test harness: a throwaway real Postfix, an SMTP sink and an SMTP client."""
