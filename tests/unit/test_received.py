"""The Received parser against the from clauses MTAs really write.

Each sample is the header's value as the MTA wrote it (after `Received:`,
CRLF line ends).  Postfix 3.7.11 and Exim 4.96 samples were captured from the
real programs (Postfix relaying through the test harness, the client's
address set with XCLIENT; Exim `-bs` with `-oMa`/`-oMs`/`-oMt`); Sendmail's
follow its cf/m4/cfhead.m4 `_REC_HDR_` and getauthinfo(); Exchange's follow
headers those servers wrote, with documentation addresses.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from mxrules.received import FORMS, original_client, parse_received, read_received

DATE = "Wed,  2 Dec 2026 05:44:14 +0000 (UTC)"
PF_BY = "\r\n\tby relay.example.net (Postfix) with ESMTP id 7C30620C4C1\r\n\tfor <u@example.com>; "
EXIM_BY = ("\r\n\tby exim-relay.example.net with esmtp (Exim 4.96)\r\n\t(envelope-from "
           "<a@sender.test>)\r\n\tid 1xYdAs-00033T-09\r\n\tfor u@example.com;\r\n\t"
           "Wed, 02 Dec 2026 05:46:38 +0000")
SM_BY = ("\r\n\tby mx.example.net (8.17.1.9/8.17.1.9/Debian-2+deb12u2) with ESMTP id "
         "5B2AbCdE012345\r\n\tfor <u@example.com>; Wed, 2 Dec 2026 05:44:14 GMT")


def sample(mta: str, form: str, value: str, expected: tuple[str, str, str] | None) -> object:
    """One real from clause: (address, HELO, reverse name) it names, or None."""
    return pytest.param(value, expected, id=f"{mta}: {form}")


SAMPLES = [
    # -- Postfix smtpd -------------------------------------------------------------
    sample("postfix", "verified name", " from mail.example.org (mail.example.org "
           f"[192.0.2.9]){PF_BY}{DATE}", ("192.0.2.9", "mail.example.org", "mail.example.org")),
    sample("postfix", "no reverse name", f" from mail.example.org (unknown [192.0.2.9]){PF_BY}"
           f"{DATE}", ("192.0.2.9", "mail.example.org", "unknown")),
    sample("postfix", "HELO an address literal", f" from [192.0.2.7] (unknown [192.0.2.9])"
           f"{PF_BY}{DATE}", ("192.0.2.9", "[192.0.2.7]", "unknown")),
    sample("postfix", "IPv6 with IPv6: prefix", f" from v6.example.org (unknown "
           f"[IPv6:2001:db8::9]){PF_BY}{DATE}", ("2001:db8::9", "v6.example.org", "unknown")),
    sample("postfix", "HELO with space and parentheses printed as ?",
           f" from x??y?[192.0.2.7]??by?z (unknown [192.0.2.9]){PF_BY}{DATE}",
           ("192.0.2.9", "x??y?[192.0.2.7]??by?z", "unknown")),
    sample("postfix", "no HELO", " from unknown (unknown [192.0.2.9])\r\n\tby "
           "relay.example.net (Postfix) with SMTP id 18D2020E049\r\n\tfor <u@example.com>; "
           f"{DATE}", ("192.0.2.9", "unknown", "unknown")),
    sample("postfix", "two recipients (no for)", " from two.example.org (unknown [192.0.2.9])"
           "\r\n\tby relay.example.net (Postfix) with ESMTP id 93D2D20C4C1;\r\n\t" + DATE,
           ("192.0.2.9", "two.example.org", "unknown")),
    sample("postfix", "TLS details (smtpd_tls_received_header)",
           " from tls.example.org (unknown [192.0.2.9])\r\n\t(using TLSv1.3 with cipher "
           "TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\t key-exchange X25519 server-signature "
           "ECDSA (prime256v1) server-digest SHA256)\r\n\t(No client certificate requested)\r\n"
           "\tby relay.example.net (Postfix) with ESMTPS id 90DEC20C204\r\n\tfor "
           f"<u@example.com>; {DATE}", ("192.0.2.9", "tls.example.org", "unknown")),
    sample("postfix", "authenticated (smtpd.c)", " from laptop.example.org (unknown "
           "[192.0.2.9])\r\n\t(Authenticated sender: alice)\r\n\tby relay.example.net (Postfix) "
           f"with ESMTPSA id 4QxAbc1\r\n\tfor <u@example.com>; {DATE}",
           ("192.0.2.9", "laptop.example.org", "unknown")),
    # A 1,100-character HELO, as the relay's smtp client sends it on: its first line
    # cut at 998 characters (smtp_line_length_limit) by CRLF SPACE.
    sample("postfix", "1,100-character HELO, line broken inside the HELO",
           f" from {'A' * 983}\r\n {'A' * 117} (unknown [192.0.2.9]){PF_BY}{DATE}",
           ("192.0.2.9", "A" * 1100, "unknown")),
    sample("postfix", "975-character HELO, line broken inside the reverse name",
           f" from {'C' * 975} (unknow\r\n n [192.0.2.9]){PF_BY}{DATE}",
           ("192.0.2.9", "C" * 975, "unknown")),
    sample("postfix", "970-character HELO, line broken inside the address",
           f" from {'D' * 970} (unknown [19\r\n 2.0.2.9]){PF_BY}{DATE}",
           ("192.0.2.9", "D" * 970, "unknown")),
    sample("postfix", "local submission (pickup)", " by relay.example.net (Postfix, from "
           f"userid 0)\r\n\tid 4QxAbc1; {DATE}", None),
    # -- Exim 4.96 --------------------------------------------------------------------
    sample("exim", "no verified name, HELO an address literal",
           f" from [203.0.113.66] (helo=[192.0.2.7]){EXIM_BY}",
           ("203.0.113.66", "[192.0.2.7]", "")),
    sample("exim", "no verified name, HELO literal and ident",
           f" from [203.0.113.66] (helo=[192.0.2.7] ident=root){EXIM_BY}",
           ("203.0.113.66", "[192.0.2.7]", "")),
    sample("exim", "verified name and HELO", " from mail.example.org ([203.0.113.66] "
           f"helo=foo.example){EXIM_BY}", ("203.0.113.66", "foo.example", "mail.example.org")),
    sample("exim", "verified name, HELO and ident (a line break inside)",
           " from mail.example.org\r\n\t([203.0.113.66] helo=foo.example ident=evil)" + EXIM_BY,
           ("203.0.113.66", "foo.example", "mail.example.org")),
    # Exim omits helo= when it equals the name: the same text as Sendmail's
    # `from HELO ([IP])`, so the name is given as the HELO, which it is in both.
    sample("exim", "verified name equal to the HELO",
           f" from mail.example.org ([203.0.113.66]){EXIM_BY}",
           ("203.0.113.66", "mail.example.org", "")),
    sample("exim", "IPv6 (no IPv6: prefix)", f" from [2001:db8::66] (helo=v6.example){EXIM_BY}",
           ("2001:db8::66", "v6.example", "")),
    sample("exim", "IPv6 with the port logged, HELO an IPv6: literal",
           f" from [2001:db8::66] (port=2525 helo=[IPv6:2001:db8::7]){EXIM_BY}",
           ("2001:db8::66", "[IPv6:2001:db8::7]", "")),
    sample("exim", "port logged", f" from [203.0.113.66] (port=54321 helo=foo.example)"
           f"{EXIM_BY}", ("203.0.113.66", "foo.example", "")),
    sample("exim", "HELO equal to the address", f" from [203.0.113.66]{EXIM_BY}",
           ("203.0.113.66", "", "")),
    sample("exim", "1,100-character HELO", f" from [203.0.113.66] (helo={'A' * 1100})"
           f"{EXIM_BY}", ("203.0.113.66", "A" * 1100, "")),
    sample("exim", "local SMTP (-bs): no address, only an ident and a HELO",
           " from root (helo=[192.0.2.7])\r\n\tby exim-relay.example.net with local-esmtp "
           "(Exim 4.96)\r\n\t(envelope-from <a@sender.test>)\r\n\tid 1xYdAt-00035c-0U", None),
    # -- Sendmail 8.17 ----------------------------------------------------------------
    sample("sendmail", "verified name", f" from mail.example.org (mail.example.org "
           f"[192.0.2.9]){SM_BY}", ("192.0.2.9", "mail.example.org", "mail.example.org")),
    sample("sendmail", "no reverse name", f" from foo.example ([192.0.2.9]){SM_BY}",
           ("192.0.2.9", "foo.example", "")),
    sample("sendmail", "HELO an address literal",
           f" from [192.0.2.7] (mail.example.org [192.0.2.9]){SM_BY}",
           ("192.0.2.9", "[192.0.2.7]", "mail.example.org")),
    sample("sendmail", "may be forged", " from foo.example (rdns.example.org [192.0.2.9] "
           f"(may be forged)){SM_BY}", ("192.0.2.9", "foo.example", "rdns.example.org")),
    sample("sendmail", "ident user@", f" from foo.example (alice@mail.example.org "
           f"[192.0.2.9]){SM_BY}", ("192.0.2.9", "foo.example", "mail.example.org")),
    sample("sendmail", "ident of OS type OTHER", " from foo.example (IDENT:alice@"
           f"mail.example.org [192.0.2.9]){SM_BY}",
           ("192.0.2.9", "foo.example", "mail.example.org")),
    sample("sendmail", "IPv6, no reverse name", f" from v6.example ([IPv6:2001:db8::9]){SM_BY}",
           ("2001:db8::9", "v6.example", "")),
    sample("sendmail", "IPv6, verified name",
           f" from v6.example (mail.example.org [IPv6:2001:db8::9]){SM_BY}",
           ("2001:db8::9", "v6.example", "mail.example.org")),
    sample("sendmail", "no HELO given", f" (from mail.example.org [192.0.2.9]){SM_BY}",
           ("192.0.2.9", "", "mail.example.org")),
    sample("sendmail", "authenticated", " from foo.example (mail.example.org [192.0.2.9])"
           "\r\n\t(authenticated bits=0)" + SM_BY, ("192.0.2.9", "foo.example",
                                                    "mail.example.org")),
    sample("sendmail", "TLS", " from foo.example (mail.example.org [192.0.2.9])\r\n\tby "
           "mx.example.net (8.17.1.9/8.17.1.9/Debian-2+deb12u2) with ESMTPS id "
           "5B2AbCdE012345\r\n\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256 "
           "verify=NOT)\r\n\tfor <u@example.com>; Wed, 2 Dec 2026 05:44:14 GMT",
           ("192.0.2.9", "foo.example", "mail.example.org")),
    sample("sendmail", "local submission", " (from alice@localhost)\r\n\tby mx.example.net "
           "(8.17.1.9/8.17.1.9/Submit) id 5B2AbCdF012346; Wed, 2 Dec 2026 05:44:14 GMT", None),
    # -- Exchange ---------------------------------------------------------------------
    sample("exchange", "HELO an address literal: from [IP] (IP)",
           " from [192.0.2.7] (203.0.113.66) by EXCH01.corp.example (10.0.0.6) with "
           "Microsoft SMTP\r\n Server (version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_"
           "SHA384) id\r\n 15.1.2507.39; Wed, 2 Dec 2026 05:44:14 +0000",
           ("203.0.113.66", "[192.0.2.7]", "")),
    sample("exchange", "from HELO (IP)", " from mail.example.org (203.0.113.66) by "
           "EXCH01.corp.example (10.0.0.6) with Microsoft SMTP Server id 15.1.2507.39; Wed, 2 "
           "Dec 2026 05:44:14 +0000", ("203.0.113.66", "mail.example.org", "")),
    sample("exchange", "folded after by", " from MBOX7.corp.example (192.168.170.7) by\r\n "
           "MBOX1.corp.example (192.168.170.1) with Microsoft SMTP\r\n Server (version=TLS1_2, "
           "cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.1.2176.2 via Mailbox\r\n "
           "Transport; Thu, 3 Dec 2026 10:00:00 -0600",
           ("192.168.170.7", "MBOX7.corp.example", "")),
    sample("exchange", "Exchange Online, IPv6", " from BN6PR11CA0070.namprd11.prod.outlook.com "
           "(2001:db8:404:f7::32)\r\n by DM6PR12MB4250.namprd12.prod.outlook.com "
           "(2001:db8:5:1c3::17) with\r\n Microsoft SMTP Server (version=TLS1_2,\r\n cipher="
           "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.20.4669.11; Wed, 3 Nov\r\n 2021 "
           "16:12:21 +0000", ("2001:db8:404:f7::32", "BN6PR11CA0070.namprd11.prod.outlook.com",
                              "")),
    sample("exchange", "2010 MAPI: from HOST ([IP]) by HOST ([IP])",
           " from EXCH02.corp.example ([169.254.5.159]) by\r\n EXCH03.corp.example "
           "([10.0.0.6]) with mapi id\r\n 14.03.0123.003; Wed,\r\n 2 Dec 2026 08:59:28 -0400",
           ("169.254.5.159", "EXCH02.corp.example", "")),
    sample("exchange", "2003 / IIS SMTPSVC", " from mail.example.org ([203.0.113.66]) by "
           "exch2003.corp.example with Microsoft SMTPSVC(6.0.3790.4675);\r\n\t Wed, 2 Dec 2026 "
           "05:44:14 +0000", ("203.0.113.66", "mail.example.org", "")),
]


@pytest.mark.parametrize(("value", "expected"), SAMPLES)
def test_real_from_clauses(value: str, expected: tuple[str, str, str] | None) -> None:
    hop, why = read_received(value.encode("latin-1"))
    if expected is None:
        assert (hop, why) == (None, "unparsable")
        return
    assert hop is not None, why
    assert (str(hop.address), hop.helo, hop.rdns) == expected
    # As the milter gets it: LF line ends and a leading space (pymilter).
    milter = value.replace("\r\n", "\n").encode("latin-1")
    assert parse_received(milter) == hop


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # The client chose every character between `from ` and the MTA's own part.
        pytest.param(f" from [203.0.113.9] (unknown [198.51.100.23]){PF_BY}{DATE}",
                     ("198.51.100.23", ""), id="postfix: allowed address as the HELO"),
        pytest.param(f" from [203.0.113.66] (helo=[203.0.113.9]){EXIM_BY}",
                     ("203.0.113.66", ""), id="exim: allowed address as the HELO"),
        pytest.param(f" from [203.0.113.66] (helo=foo ident=x[203.0.113.9]){EXIM_BY}",
                     ("203.0.113.66", ""), id="exim: address in the ident"),
        pytest.param(" from [203.0.113.9] (198.51.100.23) by EXCH01.corp.example (10.0.0.6) "
                     "with Microsoft SMTP Server id 15.1.2507.39; Wed, 2 Dec 2026",
                     ("198.51.100.23", ""), id="exchange: allowed address as the HELO"),
        # A relay that takes any HELO (Sendmail with AllowBogusHELO, some Exchange):
        # a HELO written as another from clause gives a second reading.
        pytest.param(" from x (r [203.0.113.9]) by y (mail.example.org [198.51.100.23])"
                     + SM_BY, (None, "ambiguous"), id="sendmail: HELO mimics a one-line form"),
        pytest.param(" from x (203.0.113.9) by y (198.51.100.23) by EXCH01.corp.example "
                     "(10.0.0.6) with Microsoft SMTP Server id 15.1.2507.39; Wed, 2 Dec 2026",
                     (None, "ambiguous"), id="exchange: HELO mimics the Exchange form"),
        # Text after the from clause the client chose: a quoted recipient.
        pytest.param(" from h (unknown [198.51.100.23])\r\n\tby relay.example.net (Postfix) "
                     'with ESMTP id 7C30620C4C1\r\n\tfor <" (203.0.113.9) by x"@example.com>; '
                     + DATE, (None, "ambiguous"), id="postfix: recipient mimics the Exchange form"),
        pytest.param(" from h (unknown [999.1.2.3])" + PF_BY + DATE, (None, "unparsable"),
                     id="not an address"),
        pytest.param("", (None, "unparsable"), id="empty"),
        pytest.param(" (qmail 1234 invoked from network); 28 Nov 2026", (None, "unparsable"),
                     id="qmail: no address"),
    ],
)
def test_no_address_from_what_the_client_wrote(value: str,
                                               expected: tuple[str | None, str]) -> None:
    hop, why = read_received(value.encode("latin-1"))
    assert (str(hop.address) if hop else None, why) == expected


def test_every_form_reads_some_sample() -> None:
    """No dead entry in the table: each form gives the first reading of a real sample."""
    forms = set()
    for param in SAMPLES:
        value, expected = param.values
        if expected is not None:
            hop = parse_received(value.encode("latin-1"))
            assert hop is not None
            forms.add(hop.form)
    assert forms == {f.name for f in FORMS}


def test_a_value_as_long_as_header_size_limit_is_read_whole() -> None:
    """100 KB (Postfix's default header_size_limit) full of what the forms look for."""
    helo = "(x [203.0.113.9]) by " * 4800
    value = f" from {helo} (unknown [198.51.100.23])\n\tby relay (Postfix) id 1".encode()
    assert len(value) > 100_000
    assert read_received(value) == (None, "ambiguous")
    clean = f" from {'[203.0.113.9]' * 7800} (unknown [198.51.100.23])\n\tby r id 1".encode()
    hop = parse_received(clean)
    assert hop is not None and str(hop.address) == "198.51.100.23"
    # Thousands of readings of one address: built to make work, believed for nothing.
    same = f" from {'(198.51.100.23) by ' * 7800}x\n\tby r id 1".encode()
    assert read_received(same) == (None, "ambiguous")
    few = f" from {'(198.51.100.23) by ' * 3}x\n\tby r id 1".encode()
    assert str(read_received(few)[0].address) == "198.51.100.23"  # type: ignore[union-attr]


TRUSTED = {ip_address("192.0.2.250"), ip_address("192.0.2.251")}


def _pf(ip: str) -> bytes:
    return f" from h (unknown [{ip}])\n\tby relay (Postfix) id 1".encode()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([_pf("203.0.113.9")], ("203.0.113.9", ""), id="first hop"),
        pytest.param([_pf("192.0.2.251"), _pf("127.0.0.1"), _pf("203.0.113.9"),
                      _pf("198.51.100.1")], ("203.0.113.9", ""), id="through trusted and loopback"),
        pytest.param([], (None, "no-received"), id="none"),
        pytest.param([b" by relay (Postfix, from userid 0) id 1", _pf("203.0.113.9")],
                     (None, "unparsable-received"), id="unparsable ends the walk"),
        pytest.param([_pf("192.0.2.251"), b" from x (r [203.0.113.9]) by y (u [198.51.100.2])"
                      b"\n\tby z id 1"], (None, "ambiguous-received"), id="ambiguous below"),
        pytest.param([_pf("192.0.2.251")], (None, "only-trusted-hops"), id="only trusted"),
        pytest.param([_pf("192.0.2.251")] * 20 + [_pf("203.0.113.9")], (None, "too-many-hops"),
                     id="too many hops"),
    ],
)
def test_original_client(headers: list[bytes], expected: tuple[str | None, str]) -> None:
    hop, why = original_client(headers, lambda a: a in TRUSTED)
    assert (str(hop.address) if hop else None, why) == expected
