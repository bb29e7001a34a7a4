"""The peer conversation as one table of transitions: bytes and messages in, checked messages out, no I/O.

This is h11's shape (``h11/_state.py``, ``h11/_connection.py``) for gossipfl's protocol. A ``Conversation``
is one side of one connection. The daemon calls ``send(message)`` to get the bytes to write,
``receive_data(bytes)`` with whatever arrived (``b""`` at end of stream), and ``next_event()`` for the next
message, ``NEED_DATA`` or ``Closed``. Nothing else sequences messages: a message that the table does not
allow at this point raises ``LocalProtocolError`` when we try to send it (a bug of ours) and
``RemoteProtocolError`` when it arrives (the peer's fault), naming the phase and what was expected.

Every connection has a dialler, who speaks first, and a listener. ``TRANSITIONS`` below is the whole
conversation (docs/protocol.md prints it): the phase, who may send what in it, and the phase that follows.
Three exchanges share the opening and the model transfer:

- gossip push: the dialler sends its model as a ``ModelDelta`` against what the listener holds of it; the
  listener answers ``Ack(new_seq)``, or ``NeedFull(base_seq)`` once, after which the dialler resends the
  whole model (base 0) and only an ``Ack`` or an ``Error`` may follow;
- push-pull: after the ``Ack``, a dialler whose peer said ``push-pull`` in its Hello may send a
  ``PullRequest``; the listener answers with its pre-merge model as a ``ModelDelta`` (the same transfer,
  in the other direction) or an ``Error`` (``OVERLOADED``: it is sending to us at that moment, the push
  stands);
- keep-alive: when the listener said ``keep-alive`` in its Hello, a finished gossip exchange (``acked``
  with no pull, or ``done``) may be followed by another push on the same connection, which starts the
  push's table over; the Hellos (and the TLS handshake) are then paid once for many exchanges. Either side
  may end the connection there instead, and does after an idle time of its own;
- a gateway round: the gateway dials and sends ``GatewayRound`` (with need-full as above, the resend
  keeping the round and the epochs); with ``epochs`` above zero the client trains and answers with a
  ``GatewayUpdate`` for that round against that global model, and the gateway later sends the round's
  result (a ``GatewayRound`` of the same round with ``epochs`` 0), which the client acknowledges; a
  ``GatewayRound`` with ``epochs`` 0 as the opening is a bare adoption, acknowledged at once.

Either side may send ``Error`` at any point before the end: it ends the conversation. The stream may end
cleanly only where an exchange is complete (``Closed(expected=True)``); anywhere else the end of the stream
is a broken link (``Closed(expected=False)``). ``Ping`` and ``Pong`` exist on the wire but no conversation of
protocol version 1 uses them, so they are refused like any message out of place.

Admission (is this the node the certificate names, the same model, blocked, paused) is policy, not order:
the daemon decides it between the Hellos. Sequence numbers inside a transfer are checked here (a resend is
whole, an ``Ack`` names the delta it acknowledges, an update answers the round and the global model it was
sent); whether a delta's base is one we hold is for the references (``references.GossipState``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from gossipfl.errors import LocalProtocolError, RemoteProtocolError
from gossipfl.protocol import framing, messages

__all__ = [
    "KEEP_ALIVE",
    "NEED_DATA",
    "PUSH_PULL",
    "TRANSITIONS",
    "Closed",
    "Conversation",
    "Party",
    "Phase",
]

PUSH_PULL: Final = "push-pull"  # Hello capability: this node answers (and asks for) pulls after a push
KEEP_ALIVE: Final = "keep-alive"  # Hello capability: this listener takes another push on a finished connection


class Party(enum.Enum):
    DIALER = "dialer"
    LISTENER = "listener"

    @property
    def other(self) -> Party:
        return Party.LISTENER if self is Party.DIALER else Party.DIALER


class Phase(enum.Enum):
    START = "start"  # nothing said; the dialler speaks first
    HELLO_SENT = "hello-sent"  # the dialler said Hello; the listener answers with its own (or refuses)
    READY = "ready"  # both said Hello; the dialler opens a push or a round
    PUSHED = "pushed"  # a delta of the dialler's model is on its way
    PUSH_FULL_ASKED = "push-full-asked"  # the listener lacks the base: the dialler resends in full
    PUSH_FULL_SENT = "push-full-sent"
    ACKED = "acked"  # the push is merged; the dialler pulls, or ends
    PULLED = "pulled"  # the dialler asked for the listener's pre-merge model
    PULL_SENT = "pull-sent"  # the listener's model is on its way
    PULL_FULL_ASKED = "pull-full-asked"
    PULL_FULL_SENT = "pull-full-sent"
    ROUND_SENT = "round-sent"  # a round's global model (epochs > 0) is on its way to a client
    ROUND_FULL_ASKED = "round-full-asked"
    ROUND_FULL_SENT = "round-full-sent"
    UPDATED = "updated"  # the client answered with its update; the gateway sends the result, or ends
    RESULT_SENT = "result-sent"  # a global model to adopt (epochs 0) is on its way
    RESULT_FULL_ASKED = "result-full-asked"
    RESULT_FULL_SENT = "result-full-sent"
    DONE = "done"  # the exchange is complete
    CLOSED = "closed"  # an Error was sent or received, or the stream ended


D, L = Party.DIALER, Party.LISTENER
P = Phase

# (phase, who sends, what) -> the phase after it. The whole conversation; nothing else orders messages.
TRANSITIONS: Final[dict[tuple[Phase, Party, type[messages.Message]], Phase]] = {
    (P.START, D, messages.Hello): P.HELLO_SENT,
    (P.HELLO_SENT, L, messages.Hello): P.READY,
    # gossip push
    (P.READY, D, messages.ModelDelta): P.PUSHED,
    (P.PUSHED, L, messages.Ack): P.ACKED,
    (P.PUSHED, L, messages.NeedFull): P.PUSH_FULL_ASKED,
    (P.PUSH_FULL_ASKED, D, messages.ModelDelta): P.PUSH_FULL_SENT,
    (P.PUSH_FULL_SENT, L, messages.Ack): P.ACKED,
    # push-pull: the listener's pre-merge model comes back the same way
    (P.ACKED, D, messages.PullRequest): P.PULLED,
    (P.PULLED, L, messages.ModelDelta): P.PULL_SENT,
    (P.PULL_SENT, D, messages.Ack): P.DONE,
    (P.PULL_SENT, D, messages.NeedFull): P.PULL_FULL_ASKED,
    (P.PULL_FULL_ASKED, L, messages.ModelDelta): P.PULL_FULL_SENT,
    (P.PULL_FULL_SENT, D, messages.Ack): P.DONE,
    # keep-alive: a finished gossip exchange (a push nobody pulled, or a push-pull) is followed by another push
    (P.ACKED, D, messages.ModelDelta): P.PUSHED,
    (P.DONE, D, messages.ModelDelta): P.PUSHED,
    # a gateway round (epochs > 0), or a bare adoption (epochs 0: straight to RESULT_SENT)
    (P.READY, D, messages.GatewayRound): P.ROUND_SENT,
    (P.ROUND_SENT, L, messages.GatewayUpdate): P.UPDATED,
    (P.ROUND_SENT, L, messages.NeedFull): P.ROUND_FULL_ASKED,
    (P.ROUND_FULL_ASKED, D, messages.GatewayRound): P.ROUND_FULL_SENT,
    (P.ROUND_FULL_SENT, L, messages.GatewayUpdate): P.UPDATED,
    (P.UPDATED, D, messages.GatewayRound): P.RESULT_SENT,
    (P.RESULT_SENT, L, messages.Ack): P.DONE,
    (P.RESULT_SENT, L, messages.NeedFull): P.RESULT_FULL_ASKED,
    (P.RESULT_FULL_ASKED, D, messages.GatewayRound): P.RESULT_FULL_SENT,
    (P.RESULT_FULL_SENT, L, messages.Ack): P.DONE,
}

# Where the stream may end without anything lost: after a refusal at the door, a push nobody pulled, a
# finished exchange, or a client's update whose round ended without it (a late update, an empty round).
CLEAN_ENDS: Final = frozenset({P.READY, P.ACKED, P.UPDATED, P.DONE, P.CLOSED})
# The phases in which a whole model is on its way again, after the receiver asked for it.
_RESENDS: Final = {P.PUSH_FULL_SENT, P.PULL_FULL_SENT, P.ROUND_FULL_SENT, P.RESULT_FULL_SENT}


def table_markdown() -> str:
    """The transition table as docs/protocol.md prints it (a test keeps the two the same)."""
    rows = ["| phase | who sends | message | next phase |", "| --- | --- | --- | --- |"]
    for (phase, who, kind), following in TRANSITIONS.items():
        after = following.value
        if kind is messages.GatewayRound and phase is Phase.READY:
            after += " (epochs 0: result-sent)"
        rows.append(f"| {phase.value} | {who.value} | {kind.__name__} | {after} |")
    rows.append("| any but done, closed | either | Error | closed |")
    ends = ", ".join(p.value for p in Phase if p in CLEAN_ENDS)
    rows += ["", f"The stream may end cleanly in: {ends}. Anywhere else its end is a broken link."]
    return "\n".join(rows)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()  # next_event(): feed more bytes first


@dataclass(frozen=True)
class Closed:
    """The peer ended the stream; ``expected`` when the conversation was at a point where it may end."""

    phase: Phase
    expected: bool


Event = messages.Message | Closed | _NeedData


class Conversation:
    """One side of one connection: the phase, the checks of every message against the table, the framing."""

    def __init__(self, party: Party, limits: framing.Limits | None = None) -> None:
        self.party = party
        self.phase = Phase.START
        self.their_hello: messages.Hello | None = None
        self.our_hello: messages.Hello | None = None
        self._decoder = framing.FrameDecoder(limits)
        self._eof = False
        self._in_flight: messages.ModelDelta | messages.GatewayRound | None = None  # the model being transferred
        self._round: messages.GatewayRound | None = None  # the round this connection serves

    # ------------------------------------------------------------------ h11's three calls

    def send(self, message: messages.Message) -> bytes:
        """The frame to write for ``message``; LocalProtocolError if the conversation does not allow it now."""
        self._advance(self.party, message, LocalProtocolError)
        return framing.encode(message)

    def receive_data(self, data: bytes) -> None:
        """Bytes that arrived; ``b""`` when the stream ended."""
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event:
        """The next message (checked against the table), ``NEED_DATA``, or ``Closed`` at the end of stream.

        Frames that break the framing raise the decoder's ``ProtocolError``s; a message out of place raises
        ``RemoteProtocolError``."""
        message = self._decoder.next_message()
        if message is not None:
            self._advance(self.party.other, message, RemoteProtocolError)
            return message
        if not self._eof:
            return NEED_DATA
        if self._decoder.buffered:
            self._decoder.feed_eof()  # raises TruncatedFrame: the stream ended inside a frame
        closed = Closed(self.phase, self.phase in CLEAN_ENDS)
        self.phase = Phase.CLOSED
        return closed

    # ------------------------------------------------------------------ what the driver asks

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.CLOSED)

    def _listener_offers(self, capability: str) -> bool:
        listener = self.their_hello if self.party is Party.DIALER else self.our_hello
        return listener is not None and capability in listener.capabilities

    @property
    def reusable(self) -> bool:
        """Whether another push may follow on this connection now: an exchange just ended cleanly and the
        listener offered keep-alive."""
        return self.phase in (Phase.ACKED, Phase.DONE) and self._listener_offers(KEEP_ALIVE)

    @property
    def both_pull(self) -> bool:
        """Whether both Hellos offered push-pull: the dialler pulls after each push it had acknowledged."""
        return all(h is not None and PUSH_PULL in h.capabilities for h in (self.our_hello, self.their_hello))

    @property
    def peer_pulls(self) -> bool:
        """Whether the listener said it answers pulls (read by the dialler after the Hellos)."""
        return self.their_hello is not None and PUSH_PULL in self.their_hello.capabilities

    def expected(self) -> list[str]:
        """What may come from the peer now, for messages and docs."""
        return [kind.__name__ for (phase, who, kind) in TRANSITIONS if phase is self.phase and who is not self.party]

    # ------------------------------------------------------------------ the table and the checks

    def _advance(self, sender: Party, message: messages.Message, error: type[LocalProtocolError | RemoteProtocolError],
                 ) -> None:
        where = f"{sender.value} sent {type(message).__name__} in phase {self.phase.value}"
        if isinstance(message, messages.Error):
            if self.finished:
                raise error(f"{where}: the conversation has ended")
            self.phase = Phase.CLOSED
            return
        following = TRANSITIONS.get((self.phase, sender, type(message)))
        if following is None:
            allowed = sorted({k.__name__ for (phase, who, k) in TRANSITIONS if phase is self.phase and who is sender})
            raise error(f"{where}: {' or '.join(allowed) or 'nothing'} may come from the {sender.value} here")
        problem = self._check(following, sender, message)
        if problem:
            raise error(f"{where}: {problem}")
        if isinstance(message, messages.Hello):
            if sender is self.party:
                self.our_hello = message
            else:
                self.their_hello = message
        if isinstance(message, messages.GatewayRound) and following is Phase.ROUND_SENT and message.epochs == 0:
            following = Phase.RESULT_SENT  # a bare adoption: nothing to train, only to take
        if isinstance(message, messages.ModelDelta | messages.GatewayRound):
            self._in_flight = message
            if isinstance(message, messages.GatewayRound) and self._round is None:
                self._round = message
        self.phase = following

    def _check(self, following: Phase, sender: Party, message: messages.Message) -> str | None:
        """What is wrong with ``message`` at this point beyond its type, or None."""
        sent = self._in_flight
        if isinstance(message, messages.Hello):
            if message.protocol_version != messages.PROTOCOL_VERSION:
                return f"protocol version {message.protocol_version}, this node speaks {messages.PROTOCOL_VERSION}"
            return None
        if isinstance(message, messages.Ack):
            assert sent is not None
            return None if message.seq == sent.new_seq else \
                f"Ack of sequence {message.seq}, but the model sent was {sent.new_seq}"
        if isinstance(message, messages.NeedFull):
            assert sent is not None
            return None if message.base_seq == sent.base_seq else \
                f"NeedFull of base {message.base_seq}, but the model sent was against base {sent.base_seq}"
        if isinstance(message, messages.PullRequest):
            return None if self._listener_offers(PUSH_PULL) else "the listener did not offer push-pull in its Hello"
        if isinstance(message, messages.ModelDelta) and self.phase in (Phase.ACKED, Phase.DONE):
            return None if self._listener_offers(KEEP_ALIVE) else "the listener did not offer keep-alive in its Hello"
        if isinstance(message, messages.ModelDelta | messages.GatewayRound) and following in _RESENDS:
            assert sent is not None
            if message.base_seq != 0:
                return f"a resend after NeedFull must be the whole model (base 0), got base {message.base_seq}"
        if isinstance(message, messages.GatewayRound):
            return self._check_round(following, message)
        if isinstance(message, messages.GatewayUpdate):
            assert isinstance(sent, messages.GatewayRound)
            if message.round != sent.round or message.base_seq != sent.new_seq:
                return (f"update for round {message.round} against global {message.base_seq}, but round "
                        f"{sent.round} sent global {sent.new_seq}")
            if message.sample_count == 0:
                return "an update must count at least one sample"
        return None

    def _check_round(self, following: Phase, message: messages.GatewayRound) -> str | None:
        opening = self._round
        if following is Phase.ROUND_SENT:
            return None  # the round's opening: anything well-formed
        assert opening is not None
        if following in _RESENDS:
            sent = self._in_flight
            assert isinstance(sent, messages.GatewayRound)
            if (message.round, message.epochs) != (sent.round, sent.epochs):
                return f"a resend must repeat round {sent.round} with {sent.epochs} epochs"
            return None
        if message.round != opening.round or message.epochs != 0:  # the round's result
            return f"the result must be round {opening.round} with 0 epochs"
        return None


del D, L, P  # short names for the table only
