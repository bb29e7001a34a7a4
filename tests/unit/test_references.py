"""The per-peer reference protocol, driven directly: two nodes' states and the messages between them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from gossipfl.errors import CodecError, RefusedByUs
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.references import GossipState, NeedFull

A, B = b"a" * 32, b"b" * 32
N = 4096


def states(scheme: str = "int8"):
    codec = CodecConfig(scheme=scheme, int8_block=256)
    return GossipState(N, codec), GossipState(N, codec)


def send(sender: GossipState, receiver: GossipState, x: np.ndarray, local: np.ndarray, ack: bool = True):
    push = sender.prepare_push(B, x)
    try:
        got = receiver.receive(A, push.base_seq, push.new_seq, push.payload, local)
    except NeedFull:
        sender.forget(B)
        push = sender.prepare_push(B, x, full=True)
        got = receiver.receive(A, push.base_seq, push.new_seq, push.payload, local)
    receiver.commit_receive(got)
    if ack:
        sender.commit_push(push)
    return push, got


@pytest.mark.parametrize("scheme", ["int8", "topk", "float16"])
def test_receiver_tracks_a_drifting_model(scheme):
    a, b = states(scheme)
    rng = np.random.default_rng(0)
    x = rng.normal(size=N).astype(np.float32)
    local = np.zeros(N, np.float32)
    for _ in range(60):
        x += rng.normal(0, 0.01, N).astype(np.float32)
        push, got = send(a, b, x, local)
    assert push.base_seq > 0, "after the first exchange deltas are incremental"
    err = np.linalg.norm(got.model - x) / np.linalg.norm(x)
    assert err < (0.02 if scheme != "topk" else 0.06), err  # top-k lags by what it has not sent yet
    assert np.array_equal(a.outgoing[B].values, b.incoming[A].values), "both ends hold the same reference"


def test_lost_reference_gets_need_full_then_recovers():
    a, b = states()
    x = np.random.default_rng(1).normal(size=N).astype(np.float32)
    send(a, b, x, np.zeros(N, np.float32))
    b.forget(A)  # the receiver restarted
    push = a.prepare_push(B, x)
    with pytest.raises(NeedFull) as need:
        b.receive(A, push.base_seq, push.new_seq, push.payload, x)
    assert need.value.base_seq == a.outgoing[B].seq and need.value.held_seq is None
    push, got = send(a, b, x, x)
    assert push.base_seq == 0 and np.allclose(got.model, x, atol=0.05)


def test_unacknowledged_push_does_not_move_the_sender():
    a, b = states()
    x = np.random.default_rng(2).normal(size=N).astype(np.float32)
    first, _ = send(a, b, x, np.zeros(N, np.float32))
    send(a, b, x * 1.01, x, ack=False)  # receiver applied, ack lost
    assert a.outgoing[B].seq == first.new_seq and b.incoming[A].seq == first.new_seq + 1
    nxt = a.prepare_push(B, x)
    with pytest.raises(NeedFull):
        b.receive(A, nxt.base_seq, nxt.new_seq, nxt.payload, x)


def test_outlier_is_refused_and_leaves_state_unchanged():
    a, b = states()
    rng = np.random.default_rng(3)
    x = rng.normal(size=N).astype(np.float32)
    local = x + rng.normal(0, 0.01, N).astype(np.float32)
    for _ in range(6):
        send(a, b, x, local)
    before = b.incoming[A].values.copy()
    push = a.prepare_push(B, x * 100)
    with pytest.raises(RefusedByUs) as refused:
        b.receive(A, push.base_seq, push.new_seq, push.payload, local)
    assert refused.value.reason == "outlier"
    assert np.array_equal(b.incoming[A].values, before)


def test_agreement_does_not_turn_honest_updates_into_outliers():
    """Once the nodes agree closely the recent distances are tiny; a peer's normal step must still pass."""
    a, b = states("float32")
    rng = np.random.default_rng(6)
    x = rng.normal(size=N).astype(np.float32)
    for _ in range(10):
        x += rng.normal(0, 1e-5, N).astype(np.float32)
        send(a, b, x, x)  # models all but equal: distances near zero
    step = x + rng.normal(0, 0.05, N).astype(np.float32)  # a normal step: 5% of the norm away
    got = b.receive(A, *_push_args(a.prepare_push(B, step)), x)
    assert got.distance > 100 * float(np.median(b.recent_distances))
    poisoned = a.prepare_push(B, x * 100)
    with pytest.raises(RefusedByUs, match="outlier"):
        b.receive(A, *_push_args(poisoned), x)


def _push_args(push):
    return push.base_seq, push.new_seq, push.payload


def test_corrupt_payload_and_bad_sequences():
    a, b = states()
    x = np.ones(N, np.float32)
    push = a.prepare_push(B, x)
    broken = bytearray(push.payload)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(RefusedByUs, match="codec"):
        b.receive(A, 0, 1, bytes(broken), x)
    with pytest.raises(RefusedByUs, match="sequence"):
        b.receive(A, 0, 0, push.payload, x)
    send(a, b, x, x)
    nxt = a.prepare_push(B, x * 1.1)
    with pytest.raises(RefusedByUs, match="sequence"):
        b.receive(A, nxt.base_seq, nxt.new_seq + 1, nxt.payload, x)
    assert b.incoming[A].seq == nxt.base_seq, "a refused delta moves nothing"


def test_chains_start_at_random_sequences():
    """Every full model starts a new chain far from the last one, so no stale copy can match its numbers."""
    a, b = states()
    x = np.ones(N, np.float32)
    starts = set()
    for _ in range(20):
        push, _ = send(a, b, x, x)
        starts.add(push.new_seq)
        a.forget(B)
        b.forget(A)
    assert len(starts) == 20 and min(starts) >= 1 and max(starts) < 2**62


def test_references_survive_a_restart_and_resume_deltas():
    a, b = states()
    x = np.random.default_rng(4).normal(size=N).astype(np.float32)
    for step in range(3):
        send(a, b, x + step, x)
    fp = b"f" * 32
    a2, b2 = states()
    assert a2.restore(a.dump(fp), fp) == 1 and b2.restore(b.dump(fp), fp) == 1
    push, got = send(a2, b2, x + 3, x)
    assert push.base_seq != 0, "restored references: a delta, not need-full and a full model"
    assert np.array_equal(a2.outgoing[B].values, b2.incoming[A].values)
    assert np.allclose(got.model, x + 3, atol=0.05)


def test_a_stale_restored_reference_meets_need_full():
    a, b = states()
    x = np.random.default_rng(5).normal(size=N).astype(np.float32)
    send(a, b, x, x)
    fp = b"f" * 32
    saved = b.dump(fp)  # the receiver checkpoints here ...
    send(a, b, x * 1.1, x)  # ... takes one more delta, and is killed before its next checkpoint
    b2 = states()[1]
    b2.restore(saved, fp)
    push = a.prepare_push(B, x * 1.2)
    with pytest.raises(NeedFull):
        b2.receive(A, push.base_seq, push.new_seq, push.payload, x)


@pytest.mark.parametrize("damage", ["truncate", "flip", "model", "count", "nan"])
def test_a_damaged_references_file_is_refused_whole(damage):
    a, b = states()
    x = np.ones(N, np.float32)
    send(a, b, x, x)
    fp = b"f" * 32
    data = bytearray(b.dump(fp))
    other_fp = fp
    fresh = GossipState(N, CodecConfig())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "model":
        other_fp = b"g" * 32
    elif damage == "count":
        fresh = GossipState(N + 1, CodecConfig())
    else:  # a NaN written by a buggy writer, with a digest that matches: the values are checked too
        body = bytearray(data[:-32])
        body[-4:] = np.array([np.nan], np.float32).tobytes()
        data = body + hashlib.sha256(body).digest()
    with pytest.raises(CodecError, match="references"):
        fresh.restore(bytes(data), other_fp)
    assert not fresh.incoming and not fresh.outgoing


def test_reference_table_is_bounded():
    codec = CodecConfig(scheme="float16")
    s = GossipState(8, codec, max_peers=3)
    for i in range(5):
        s.commit_push(s.prepare_push(bytes([i]) * 32, np.ones(8, np.float32)))
    assert list(s.outgoing) == [bytes([i]) * 32 for i in (2, 3, 4)]


def test_a_whole_model_is_never_sparsified_but_the_deltas_after_it_are():
    """A receiver averages its reconstruction of the sender's model with its own: a top-k push against
    zero would be 99% zeros, so a base-0 push under topk goes as topk's value scheme, dense."""
    a, b = states("topk")
    rng = np.random.default_rng(1)
    x = rng.normal(size=N).astype(np.float32)
    first, got = send(a, b, x, np.zeros(N, np.float32))
    assert first.base_seq == 0
    assert np.linalg.norm(got.model - x) / np.linalg.norm(x) < 0.01  # every weight arrived
    x += rng.normal(0, 0.01, N).astype(np.float32)
    second, got = send(a, b, x, np.zeros(N, np.float32))
    assert second.base_seq == first.new_seq
    assert len(second.payload) * 10 < len(first.payload), "the delta after it is top-k again"
    assert np.linalg.norm(got.model - x) / np.linalg.norm(x) < 0.02
