"""A trusted forwarder's connections: judged by the original client, not by the relay.

A connection from a trusted forwarder (one of the user's own relays;
docs/ses-compatibility.md) is not judged by its own address: its address says
nothing about who sent the mail, and filtering it would refuse all of the
relay's mail.  Each message is judged instead, once all its headers are in, by
the original client named in the relay's own `Received:` header
(mxrules/received.py).  Postfix (checked against 3.7) does not pass the
`Received:` header it adds itself to the milter, so the first `Received:` the
milter sees is the forwarder's.  A message whose original client cannot be
named is never judged as the forwarder: it gets `forwarder_unresolved`'s
answer (451 or 554).

The milter and `mxrules explain` both decide through these functions.  Pure:
no I/O, no metrics, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decision import CONTINUE, ConnectDecision, Engine
from .ipfilter import FilterDecision, IPAddress
from .received import Hop, OriginalClient

TRUSTED_FORWARDER = FilterDecision(True, "trusted-forwarder")


def connect(engine: Engine, addr: IPAddress) -> ConnectDecision:
    """The connect stage: a trusted forwarder is let in unfiltered, any other client
    meets the IP filters."""
    if engine.is_trusted_forwarder(addr):
        return ConnectDecision(str(addr), TRUSTED_FORWARDER, CONTINUE)
    return engine.connect(addr)


def is_forwarder(decision: ConnectDecision) -> bool:
    """Whether `connect` let the client in as a trusted forwarder."""
    return decision.filters == TRUSTED_FORWARDER


def received_walk(engine: Engine) -> OriginalClient:
    """The walk down one forwarded message's Received headers, fed as they come."""
    return OriginalClient(engine.is_trusted_forwarder)


@dataclass(frozen=True)
class Judgement:
    """A forwarded message, judged by its original client."""

    hop: Hop | None  # the original client; None when it is unknown
    decision: ConnectDecision | None = None  # the IP filters on it, when known
    unresolved: str = ""  # why it is unknown (a `received.UNRESOLVED_REASONS` value)

    @property
    def blocked(self) -> ConnectDecision | None:
        """The refusal a direct connection from the original client would have had."""
        if self.decision is not None and self.decision.reply.verb == "reject":
            return self.decision
        return None


def judge(engine: Engine, walk: OriginalClient | None) -> Judgement:
    """The original client a forwarded message names (None: no Received header
    came) and what the IP filters say of it."""
    hop, why = (walk or received_walk(engine)).result()
    if hop is None:
        return Judgement(None, unresolved=why)
    return Judgement(hop, engine.connect(hop.address))
