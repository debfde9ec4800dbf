"""Decision latency at connect and RCPT with a large config.

The config: 100,000 IP filters (SES's ip_filter_file export: 90,000 IPv4 and
9,000 IPv6 Block CIDRs, 1,000 Allow CIDRs inside blocked ranges, the
exceptions SES lets an Allow make) and an active rule set of 200 rules with
100 recipients each (SES's rule_set_file export: full addresses, domains and
`.subdomain` entries, over 20 managed domains). It is loaded and compiled the
way the milter does it (`config.load`, `Engine(config)`); the load time is
printed too.

Each case times one call in the milter's own sequence -- `parse_ip` and
`Engine.connect` for a connect, `Engine.rcpt` for a recipient -- over many
different inputs of that kind, with `time.perf_counter_ns()` around each call
(the timer's own cost is subtracted: the median of an empty measurement).
Everything runs in one thread; a milter thread pays the same CPU plus
whatever the GIL makes it wait for.

    PYTHONSAFEPATH=1 .venv/bin/python bench/bench_decision.py
    ... --calls 20000 --filters 100000 --rules 200 --recipients 100   # the defaults
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine

from harness.stack import write_config
from mxrules.config import load
from mxrules.decision import Engine
from mxrules.ipfilter import parse_ip

DOMAINS = [f"d{i}.example" for i in range(20)]


def filters(n: int, rng: random.Random) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    """N filters and, for each case, client addresses that fall in it."""
    out: list[dict[str, str]] = []
    cases: dict[str, list[str]] = {k: [] for k in
                                   ("v4 allowed", "v4 blocked", "v4 not listed",
                                    "v6 allowed", "v6 blocked", "v6 not listed")}
    n_allow = n // 100
    n_v6 = (n - n_allow) // 11
    n_v4 = n - n_allow - n_v6
    # IPv4 blocks: /24s and /32s spread over 10.0.0.0/8 and 100.64.0.0/10 (never the
    # not-listed range below).
    v4_blocks: list[ipaddress.IPv4Network] = []
    for i in range(n_v4):
        base = (10 << 24) + i * 256 if i % 2 == 0 else (100 << 24) + (64 << 16) + i * 256
        prefix = 24 if i % 3 else 32
        net = ipaddress.IPv4Network((base + (7 if prefix == 32 else 0), prefix))
        v4_blocks.append(net)
        out.append({"name": f"b4-{i}", "policy": "Block", "cidr": str(net)})
    v6_blocks: list[ipaddress.IPv6Network] = []
    for i in range(n_v6):
        net = ipaddress.IPv6Network((0x2001_0db8_0000 << 80 | i << 80, 48))
        v6_blocks.append(net)
        out.append({"name": f"b6-{i}", "policy": "Block", "cidr": str(net)})
    for i in range(n_allow):  # an Allow inside a blocked range wins (SES)
        if i % 2 == 0:
            block4 = v4_blocks[rng.randrange(len(v4_blocks))]
            host4 = block4.network_address + (block4.num_addresses - 1) // 2
            out.append({"name": f"a4-{i}", "policy": "Allow", "cidr": f"{host4}/32"})
            cases["v4 allowed"].append(str(host4))
        else:
            block6 = v6_blocks[rng.randrange(len(v6_blocks))]
            host6 = block6.network_address + i
            out.append({"name": f"a6-{i}", "policy": "Allow", "cidr": f"{host6}/128"})
            cases["v6 allowed"].append(str(host6))
    allowed = set(cases["v4 allowed"]) | set(cases["v6 allowed"])
    for _ in range(1000):
        block4 = v4_blocks[rng.randrange(len(v4_blocks))]
        host4 = block4.network_address + rng.randrange(block4.num_addresses)
        if str(host4) not in allowed:
            cases["v4 blocked"].append(str(host4))
        block6 = v6_blocks[rng.randrange(len(v6_blocks))]
        host6 = block6.network_address + rng.randrange(1 << 64)
        if str(host6) not in allowed:
            cases["v6 blocked"].append(str(host6))
        cases["v4 not listed"].append(str(ipaddress.IPv4Address(
            (198 << 24) + (18 << 16) + rng.randrange(1 << 17))))
        cases["v6 not listed"].append(str(ipaddress.IPv6Address(
            (0x2a00_1450 << 96) + rng.randrange(1 << 96))))
    return out, cases


def rules(n_rules: int, n_rcpts: int) -> tuple[list[dict[str, object]], dict[str, list[str]]]:
    """N rules of M recipients each and, for each RCPT case, recipients of that kind."""
    out: list[dict[str, object]] = []
    matched: list[str] = []
    for r in range(n_rules):
        rcpts: list[str] = []
        for i in range(n_rcpts):
            domain = DOMAINS[(r + i) % len(DOMAINS)]
            if i == 0 and r % 10 == 0:
                rcpts.append(f".sub{r}.{domain}")  # every subdomain of ...
                matched.append(f"anyone@x.sub{r}.{domain}")
            elif i == 1 and r % 10 == 0:
                rcpts.append(f"team{r}.{domain}")  # a whole (sub)domain
                matched.append(f"someone@team{r}.{domain}")
            else:
                rcpts.append(f"user{r}-{i}@{domain}")
                matched.append(f"User{r}-{i}@{domain}")  # domain and local part case-folded
        out.append({"name": f"rule-{r}", "enabled": True, "recipients": rcpts,
                    "actions": [{"s3": {"bucket_name": "bench", "object_key_prefix": f"r{r}/"}}]})
    unmatched = [f"nobody{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(1000)]
    unmanaged = [f"user{i}@elsewhere{i % 50}.test" for i in range(1000)]
    return out, {"matched": matched, "unmatched managed": unmatched, "unmanaged": unmanaged}


def timer_floor(calls: int) -> int:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        samples.append(time.perf_counter_ns() - t0)
    return int(statistics.median(samples))


def measure(call: Callable[[str], object], inputs: list[str], calls: int,
            floor: int) -> list[float]:
    """Microseconds per call over `calls` calls cycling through `inputs` (shuffled)."""
    samples: list[float] = []
    n = len(inputs)
    for k in range(calls):
        value = inputs[k % n]
        t0 = time.perf_counter_ns()
        call(value)
        samples.append(max(0, time.perf_counter_ns() - t0 - floor) / 1000)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per case")
    ap.add_argument("--filters", type=int, default=100_000)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--recipients", type=int, default=100, help="recipients per rule")
    args = ap.parse_args()
    rng = random.Random(6)

    for line in machine.describe():
        print(line)
    flt, connect_cases = filters(args.filters, rng)
    rls, rcpt_cases = rules(args.rules, args.recipients)
    with tempfile.TemporaryDirectory(prefix="mxrules-bench-decision-") as tmp:
        # SES's limits (100 filters, 100 recipients and 200 rules) raised for the test.
        path = write_config(Path(tmp), source="ses", rules=rls, filters=flt,
                            domains=[*DOMAINS, *(f".{d}" for d in DOMAINS)],
                            limits={"ip_filters": len(flt), "rules_per_rule_set": len(rls),
                                    "recipients_per_rule": args.recipients})
        t0 = time.monotonic()
        cfg = load(str(path))
        t1 = time.monotonic()
        engine = Engine(cfg)
        t2 = time.monotonic()
    print(f"{len(flt)} IP filters, {len(rls)} rules x {args.recipients} recipients, "
          f"{len(DOMAINS)} managed domains and their subdomains; "
          f"config load {t1 - t0:.2f}s, compile "
          f"{t2 - t1:.2f}s; {args.calls} timed calls per case; {machine.load()}")

    expect = {"allowed": True, "blocked": False, "not listed": True}
    for case, ips in connect_cases.items():  # the inputs really are what they claim
        want = expect[case.split(" ", 1)[1]]
        wrong = [ip for ip in ips if engine.connect(parse_ip(ip)).filters.allowed != want]
        if wrong:
            raise SystemExit(f"{case}: {wrong[:3]} decided otherwise")
        rng.shuffle(ips)
    outcome = {"matched": "accepted", "unmatched managed": "no-rule", "unmanaged": "unmanaged"}
    for case, rcpts in rcpt_cases.items():
        wrong = [r for r in rcpts if engine.rcpt(r, tls=True).outcome != outcome[case]]
        if wrong:
            raise SystemExit(f"RCPT {case}: {wrong[:3]} decided otherwise")
        rng.shuffle(rcpts)

    floor = timer_floor(args.calls)
    rows: list[tuple[str, list[float]]] = []
    gc.collect()
    for case, ips in connect_cases.items():
        rows.append((f"connect {case}",
                     measure(lambda ip: engine.connect(parse_ip(ip)), ips, args.calls, floor)))
    for case, rcpts in rcpt_cases.items():
        rows.append((f"RCPT {case}",
                     measure(lambda r: engine.rcpt(r, tls=True), rcpts, args.calls, floor)))

    print(f"\nmicroseconds per call (timer overhead of {floor} ns subtracted)")
    head = f"{'case':<24} | {'p50 us':>7} | {'p99 us':>7} | {'max us':>7} | {'inputs':>6}"
    print(head)
    print("-" * len(head))
    for (name, samples), n in zip(rows, [len(v) for v in connect_cases.values()]
                                  + [len(v) for v in rcpt_cases.values()], strict=True):
        print(f"{name:<24} | {pct(samples, 0.5):>7.1f} | {pct(samples, 0.99):>7.1f} | "
              f"{max(samples):>7.1f} | {n:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
