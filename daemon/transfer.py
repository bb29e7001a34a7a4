"""Moving one model across a link as a delta against what the other end holds, with need-full: written once.

Gossip pushes, answers to pulls, a gateway's global models and its round results all travel the same way:
the sender codes its model against the reference it believes the receiver holds (``references.GossipState``,
error feedback included); a receiver that lacks that base answers ``NeedFull`` once and gets the whole model
(base 0). The message that carries the model differs (``ModelDelta`` or ``GatewayRound``), so the sender
passes a function that wraps a coded ``Push`` in its message. Coding and decoding run in worker threads.

Nothing is committed here: the sender commits its push once the answer shows the receiver holds it, and
the receiver commits what it decoded once it has used it, so a link cut in between leaves both references
where they were or, at worst, costs a need-full later; never a silently diverged pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import trio

from gossipfl.errors import RefusedByUs
from gossipfl.metrics import Counters
from gossipfl.protocol import messages
from gossipfl.protocol.references import GossipState, NeedFull, Push, Received

from .link import Link

ModelMessage = messages.ModelDelta | messages.GatewayRound


async def send_model(link: Link, references: GossipState, peer_id: bytes, params: np.ndarray,
                     wrap: Callable[[Push], ModelMessage], counters: Counters, *, full: bool = False,
                     answers: tuple[type[messages.Message], ...] = (messages.Ack,),
                     timeout: float | None = None, first_answer_timeout: float | None = None,
                     resend_full: bool = True) -> tuple[Push, messages.Message]:
    """Send ``params`` to ``peer_id`` and return the push (to commit) and the answer that is not NeedFull.

    ``full``: the receiver told us it holds no usable base (a pull naming another base). ``resend_full``
    False: a NeedFull is refused (``RefusedByUs``, reason ``full-budget``) instead of answered in full.
    ``first_answer_timeout``: how long the answer to the first push may take (default ``timeout``)."""
    push = await trio.to_thread.run_sync(lambda: references.prepare_push(peer_id, params, full=full))
    await link.send(wrap(push))
    first = timeout if first_answer_timeout is None else first_answer_timeout
    reply = await link.receive(messages.NeedFull, *answers, timeout=first)
    if isinstance(reply, messages.NeedFull):
        counters.add("need_full_received")
        if not resend_full:
            raise RefusedByUs("full-budget", "this peer had a whole model from us too recently")
        references.forget(peer_id)
        push = await trio.to_thread.run_sync(lambda: references.prepare_push(peer_id, params, full=True))
        await link.send(wrap(push))
        reply = await link.receive(*answers, timeout=timeout)
    if push.base_seq == 0:
        counters.add("full_models_sent")  # what lost references cost: a whole model, not a delta
    return push, reply


async def receive_model(link: Link, references: GossipState, peer_id: bytes, message: ModelMessage,
                        local: np.ndarray, counters: Counters) -> tuple[Received, ModelMessage]:
    """Decode the model in ``message`` (asking once for the whole model when we lack its base); returns what
    was decoded (to commit once used) and the message that carried it (the resend, after a need-full).

    Raises ``RefusedByUs`` (an outlier, a sequence that does not follow, a bad payload); the caller tells the
    peer."""
    try:
        return await _decode(references, peer_id, message, local), message
    except NeedFull as exc:
        counters.add("need_full_sent")
        await link.send(messages.NeedFull(exc.base_seq))
    resend = await link.receive(type(message))
    assert isinstance(resend, ModelMessage)
    try:
        return await _decode(references, peer_id, resend, local), resend
    except NeedFull as exc:  # the conversation lets only a whole model through, which needs no base
        raise AssertionError("a whole model asked for its base") from exc


async def _decode(references: GossipState, peer_id: bytes, message: ModelMessage, local: np.ndarray) -> Received:
    return await trio.to_thread.run_sync(references.receive, peer_id, message.base_seq, message.new_seq,
                                         message.payload, local)


def refusal_code(exc: RefusedByUs) -> messages.ErrorCode:
    """The Error code that tells a peer why its model was refused."""
    return messages.ErrorCode.CODEC if exc.reason == "codec" else messages.ErrorCode.REFUSED
