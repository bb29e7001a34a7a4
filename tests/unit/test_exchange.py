"""The conversation state machine, two machines over an in-memory byte link (h11's ConnectionPair).

Every transition of the table is walked by one of the scripts below (a test checks that they cover the
table), every message out of place is refused on both sides, and the link is cut after every step.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from gossipfl.errors import LocalProtocolError, RemoteProtocolError, TruncatedFrame
from gossipfl.protocol import framing
from gossipfl.protocol.codec import encode_delta
from gossipfl.protocol.exchange import (
    CLEAN_ENDS,
    KEEP_ALIVE,
    NEED_DATA,
    PUSH_PULL,
    TRANSITIONS,
    Closed,
    Conversation,
    Party,
    Phase,
    table_markdown,
)
from gossipfl.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    ErrorCode,
    GatewayRound,
    GatewayUpdate,
    Hello,
    Message,
    ModelDelta,
    NeedFull,
    Ping,
    Pong,
    PullRequest,
)

D, L = Party.DIALER, Party.LISTENER
PAYLOAD = encode_delta(np.zeros(8, np.float32))
FP = bytes(32)


def hello(node: int, caps: tuple[str, ...] = ("int8", PUSH_PULL), version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(bytes([node]) * 32, version, FP, "node", caps)


def delta(base: int, new: int) -> ModelDelta:
    return ModelDelta(base, new, 10.0, 0, PAYLOAD)


def gateway_round(number: int, base: int, new: int, epochs: int) -> GatewayRound:
    return GatewayRound(number, base, new, 20.0, 5.0, epochs, PAYLOAD)


def update(number: int, base: int, samples: int = 12) -> GatewayUpdate:
    return GatewayUpdate(number, base, samples, 32.0, PAYLOAD)


OPENING = [(D, hello(1)), (L, hello(2))]
KEPT = [(D, hello(1)), (L, hello(2, caps=("int8", PUSH_PULL, KEEP_ALIVE)))]  # the listener offers keep-alive
# Each script: the steps of one whole conversation, and after each step whether the stream may end there.
SCRIPTS: dict[str, list[tuple[Party, Message]]] = {
    "push, no pull": [*OPENING, (D, delta(5, 6)), (L, Ack(6))],
    "push-pull": [*OPENING, (D, delta(5, 6)), (L, Ack(6)), (D, PullRequest(3)), (L, delta(3, 4)),
                  (D, Ack(4))],
    "need-full both ways": [*OPENING, (D, delta(5, 6)), (L, NeedFull(5)), (D, delta(0, 77)), (L, Ack(77)),
                            (D, PullRequest(3)), (L, delta(3, 4)), (D, NeedFull(3)), (L, delta(0, 99)),
                            (D, Ack(99))],
    "round": [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(7, 3)), (D, gateway_round(7, 3, 4, 0)),
              (L, Ack(4))],
    "round with need-full twice": [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, NeedFull(2)),
                                   (D, gateway_round(7, 0, 50, 1)), (L, update(7, 50)),
                                   (D, gateway_round(7, 50, 51, 0)), (L, NeedFull(50)),
                                   (D, gateway_round(7, 0, 60, 0)), (L, Ack(60))],
    "bare adoption": [*OPENING, (D, gateway_round(8, 5, 6, 0)), (L, Ack(6))],
    "kept alive: push-pull, then a push": [*KEPT, (D, delta(5, 6)), (L, Ack(6)), (D, PullRequest(3)),
                                           (L, delta(3, 4)), (D, Ack(4)), (D, delta(6, 7)), (L, Ack(7))],
    "kept alive: a push, then push-pull": [*KEPT, (D, delta(5, 6)), (L, Ack(6)), (D, delta(6, 7)), (L, Ack(7)),
                                           (D, PullRequest(4)), (L, delta(4, 5)), (D, Ack(5))],
}
ENDS_ACKED = {"push, no pull", "kept alive: push-pull, then a push"}  # the other scripts end done
# Where each script may be cut without anything lost: index k is "after k steps".
CLEAN_AFTER: dict[str, str] = {
    "push, no pull": "--+-+",
    "push-pull": "--+-+--+",
    "need-full both ways": "--+---+----+",
    "round": "--+-+-+",
    "round with need-full twice": "--+---+---+",
    "bare adoption": "--+-+",
    "kept alive: push-pull, then a push": "--+-+--+-+",
    "kept alive: a push, then push-pull": "--+-+-+--+",
}
SAMPLES: list[Message] = [hello(9), delta(1, 2), NeedFull(1), Ack(2), PullRequest(0),
                               gateway_round(1, 1, 2, 1), update(1, 2), Ping(1), Pong(1)]


class Pair:
    """Two conversations joined by a byte link that delivers each frame whole."""

    def __init__(self) -> None:
        self.side = {D: Conversation(D), L: Conversation(L)}

    def say(self, party: Party, message: Message) -> None:
        data = self.side[party].send(message)
        other = self.side[party.other]
        other.receive_data(data)
        assert other.next_event() == message
        assert other.next_event() is NEED_DATA
        assert self.side[D].phase is self.side[L].phase

    def play(self, steps: list[tuple[Party, Message]]) -> Pair:
        for party, message in steps:
            self.say(party, message)
        return self

    @property
    def phase(self) -> Phase:
        return self.side[D].phase


def test_the_scripts_walk_every_transition_of_the_table():
    walked = set()
    for steps in SCRIPTS.values():
        pair = Pair()
        for party, message in steps:
            before = pair.phase
            pair.say(party, message)
            walked.add((before, party, type(message)))
            if (before, party, type(message)) in TRANSITIONS:  # a bare adoption branches to RESULT_SENT
                expected = TRANSITIONS[before, party, type(message)]
                if not (isinstance(message, GatewayRound) and message.epochs == 0 and before is Phase.READY):
                    assert pair.phase is expected
    assert walked == set(TRANSITIONS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_ends_done_or_where_it_may_end(name):
    pair = Pair().play(SCRIPTS[name])
    assert pair.phase in CLEAN_ENDS
    assert pair.phase is (Phase.ACKED if name in ENDS_ACKED else Phase.DONE)


def test_a_bare_adoption_goes_straight_to_the_result():
    pair = Pair().play([*OPENING, (D, gateway_round(8, 5, 6, 0))])
    assert pair.phase is Phase.RESULT_SENT


def _phases_reached() -> list[tuple[str, int]]:
    """(script, steps) for one prefix reaching each phase the scripts pass through."""
    seen: dict[Phase, tuple[str, int]] = {}
    for name, steps in SCRIPTS.items():
        pair = Pair()
        seen.setdefault(pair.phase, (name, 0))
        for k, (party, message) in enumerate(steps, 1):
            pair.say(party, message)
            seen.setdefault(pair.phase, (name, k))
    return list(seen.values())


@pytest.mark.parametrize(("name", "k"), _phases_reached())
def test_every_message_out_of_place_is_refused_on_both_sides(name, k):
    checked = 0
    for party, sample in itertools.product((D, L), SAMPLES):
        pair = Pair().play(SCRIPTS[name][:k])
        if (pair.phase, party, type(sample)) in TRANSITIONS:
            continue
        with pytest.raises(LocalProtocolError, match=type(sample).__name__):
            pair.side[party].send(sample)
        receiver = pair.side[party.other]
        receiver.receive_data(framing.encode(sample))  # the peer ignores its own table, as a hostile one would
        with pytest.raises(RemoteProtocolError, match=f"phase {pair.phase.value}"):
            receiver.next_event()
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_link_cut_after_every_step(name):
    steps = SCRIPTS[name]
    for k in range(len(steps) + 1):
        for reader in (D, L):
            pair = Pair().play(steps[:k])
            side = pair.side[reader]
            side.receive_data(b"")
            event = side.next_event()
            assert isinstance(event, Closed)
            assert event.expected is (CLEAN_AFTER[name][k] == "+"), (name, k, event)
            assert side.phase is Phase.CLOSED
            with pytest.raises(LocalProtocolError):
                side.send(Ack(1))


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_cut_inside_a_frame_is_a_truncated_frame(name):
    steps = SCRIPTS[name]
    for k, (party, message) in enumerate(steps):
        pair = Pair().play(steps[:k])
        data = pair.side[party].send(message)
        receiver = pair.side[party.other]
        receiver.receive_data(data[: len(data) // 2])
        assert receiver.next_event() is NEED_DATA
        receiver.receive_data(b"")
        with pytest.raises(TruncatedFrame):
            receiver.next_event()


def test_bytes_fed_one_at_a_time_give_the_same_conversation():
    steps = SCRIPTS["need-full both ways"]
    side = {D: Conversation(D), L: Conversation(L)}
    for party, message in steps:
        data = side[party].send(message)
        receiver = side[party.other]
        for i in range(len(data) - 1):
            receiver.receive_data(data[i:i + 1])
            assert receiver.next_event() is NEED_DATA
        receiver.receive_data(data[-1:])
        assert receiver.next_event() == message
    assert side[D].phase is side[L].phase is Phase.DONE


@pytest.mark.parametrize(("name", "k"), _phases_reached())
def test_an_error_from_either_side_ends_any_open_conversation(name, k):
    for party in (D, L):
        pair = Pair().play(SCRIPTS[name][:k])
        if pair.side[party].finished:
            with pytest.raises(LocalProtocolError, match="ended"):
                pair.side[party].send(Error(ErrorCode.REFUSED, "no"))
            continue
        pair.say(party, Error(ErrorCode.REFUSED, "no"))
        assert pair.phase is Phase.CLOSED
        assert pair.side[party].finished and pair.side[party.other].finished


BAD_FIELDS = [
    ("Hello of another version", [(D, hello(1, version=2))], "protocol version 2"),
    ("Ack of another delta", [*OPENING, (D, delta(5, 6)), (L, Ack(5))], "Ack of sequence 5"),
    ("NeedFull of another base", [*OPENING, (D, delta(5, 6)), (L, NeedFull(4))], "NeedFull of base 4"),
    ("a resend that is a delta", [*OPENING, (D, delta(5, 6)), (L, NeedFull(5)), (D, delta(6, 7))],
     "must be the whole model"),
    ("a pull the listener did not offer", [(D, hello(1)), (L, hello(2, caps=("int8",))), (D, delta(5, 6)),
                                           (L, Ack(6)), (D, PullRequest(0))], "did not offer push-pull"),
    ("a second push the listener did not offer", [*OPENING, (D, delta(5, 6)), (L, Ack(6)), (D, delta(6, 7))],
     "did not offer keep-alive"),
    ("a push after push-pull the listener did not offer", SCRIPTS["push-pull"] + [(D, delta(6, 7))],
     "did not offer keep-alive"),
    ("an update for another round", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(6, 3))],
     "update for round 6"),
    ("an update against another global", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(7, 2))],
     "against global 2"),
    ("an update of no samples", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(7, 3, samples=0))],
     "at least one sample"),
    ("a round resend that changes the epochs", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, NeedFull(2)),
                                                (D, gateway_round(7, 0, 9, 2))], "repeat round 7 with 1 epochs"),
    ("a result that asks for training", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(7, 3)),
                                        (D, gateway_round(7, 3, 4, 1))], "round 7 with 0 epochs"),
    ("a result of another round", [*OPENING, (D, gateway_round(7, 2, 3, 1)), (L, update(7, 3)),
                                   (D, gateway_round(8, 3, 4, 0))], "round 7 with 0 epochs"),
]


@pytest.mark.parametrize(("what", "steps", "problem"), BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_fields_that_do_not_fit_the_exchange_are_refused_on_both_sides(what, steps, problem):
    pair = Pair().play(steps[:-1])
    party, message = steps[-1]
    phase = pair.phase
    with pytest.raises(LocalProtocolError, match=problem):
        pair.side[party].send(message)
    assert pair.side[party].phase is phase  # a refused send changes nothing
    receiver = pair.side[party.other]
    receiver.receive_data(framing.encode(message))
    with pytest.raises(RemoteProtocolError, match=problem):
        receiver.next_event()


def test_what_the_peer_may_send_next_is_named():
    pair = Pair().play([*OPENING, (D, delta(5, 6))])
    assert sorted(pair.side[D].expected()) == ["Ack", "NeedFull"]
    assert pair.side[L].expected() == []
    assert pair.side[D].peer_pulls and pair.side[L].their_hello == hello(1)


def test_the_protocol_document_prints_this_table():
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    assert table_markdown() in doc
