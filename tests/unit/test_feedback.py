"""Tests of gossipfl.protocol.feedback: error feedback keeps sender and receiver references identical."""

from __future__ import annotations

import numpy as np
import pytest

from gossipfl.errors import CodecError
from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta
from gossipfl.protocol.feedback import Reference

# ---------------------------------------------------------------------------------------- error feedback


def drift(n: int, rounds: int, seed: int) -> list[np.ndarray]:
    """x_t = x_{t-1} + step_t, where steps share a direction (like SGD) plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n).astype(np.float32)
    direction = rng.normal(0, 0.01, n).astype(np.float32)
    xs = [x]
    for _ in range(rounds):
        x = (x + direction + rng.normal(0, 0.01, n)).astype(np.float32)
        xs.append(x)
    return xs


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(scheme="int8", int8_block=256),
        CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="int8", int8_block=64),
        CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="float16"),
    ],
    ids=["int8", "topk-int8", "topk-float16"],
)
def test_error_feedback_bounds_the_error_and_the_running_sum_converges(config: CodecConfig) -> None:
    n, rounds = 4096, 200
    xs = drift(n, rounds, seed=7)
    sender = Reference.from_values(xs[0], seq=1)
    receiver = Reference.from_values(xs[0], seq=1)
    errors, rel = [], []
    step = float(np.linalg.norm(xs[1] - xs[0]))
    for t in range(1, rounds + 1):
        delta_sent = xs[t] - sender.values
        payload = sender.encode_towards(xs[t], config)
        decoded = receiver.apply(payload)
        assert sender.seq == receiver.seq == t + 1
        assert sender.values.tobytes() == receiver.values.tobytes(), f"references diverged at round {t}"
        residual = xs[t].astype(np.float64) - receiver.values
        if config.scheme == "int8":
            # what is left is exactly this round's quantization error: at most half a step of the
            # largest block scale (plus float32 rounding of the reference itself)
            bound = float(np.abs(delta_sent).max()) / 127 / 2 * (1 + 1e-4) + 4 * np.spacing(np.float32(20))
            assert np.abs(residual).max() <= bound
        assert np.isfinite(decoded).all()
        errors.append(float(np.linalg.norm(residual)))
        rel.append(errors[-1] / float(np.linalg.norm(xs[t] - xs[0])))
    # the error does not grow with time: late rounds are no worse than early ones
    assert max(errors[150:]) <= 1.5 * max(errors[25:75])
    assert max(errors) <= 8 * step
    # the running sum of decoded deltas approaches the true movement
    assert rel[-1] < 0.5 * rel[49]
    assert rel[-1] < (0.002 if config.scheme == "int8" else 0.06)


def test_without_error_feedback_topk_loses_most_of_the_movement() -> None:
    """The control for the test above: summing lossy deltas of x_t - x_{t-1} does not converge."""
    n, rounds = 4096, 200
    xs = drift(n, rounds, seed=7)
    config = CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="float16")
    total = np.zeros(n, np.float32)
    for t in range(1, rounds + 1):
        total += decode_delta(encode_delta(xs[t] - xs[t - 1], config), n)
    movement = xs[-1] - xs[0]
    rel_no_feedback = float(np.linalg.norm(movement - total) / np.linalg.norm(movement))
    sender = Reference.from_values(xs[0], seq=0)
    for t in range(1, rounds + 1):
        sender.encode_towards(xs[t], config)
    rel_feedback = float(np.linalg.norm(xs[-1] - sender.values) / np.linalg.norm(movement))
    assert rel_no_feedback > 0.5
    assert rel_feedback < rel_no_feedback / 10


def test_reference_starts_at_zero_and_a_full_model_is_a_delta_against_it() -> None:
    x = np.random.default_rng(8).normal(0, 1, 1000).astype(np.float32)
    sender, receiver = Reference(1000), Reference(1000)
    assert sender.seq == 0 and not sender.values.any()
    receiver.apply(sender.encode_towards(x, CodecConfig(scheme="float32"), new_seq=17), new_seq=17)
    assert sender.seq == receiver.seq == 17
    np.testing.assert_array_equal(receiver.values, x)
    sender.reset()
    assert sender.seq == 0 and not sender.values.any()


def test_reference_apply_is_atomic_on_errors() -> None:
    x = np.random.default_rng(9).normal(0, 1, 1000).astype(np.float32)
    sender, receiver = Reference(1000), Reference(1000)
    payload = sender.encode_towards(x, CodecConfig(scheme="int8"))
    bad = bytearray(payload)
    bad[-1] ^= 0xFF
    with pytest.raises(CodecError):
        receiver.apply(bytes(bad))
    assert receiver.seq == 0 and not receiver.values.any()
    with pytest.raises(CodecError, match="elements"):
        Reference(999).apply(payload)
    receiver.apply(payload)
    assert receiver.values.tobytes() == sender.values.tobytes()


def test_reference_refuses_bad_input_without_moving() -> None:
    ref = Reference(10)
    x = np.ones(10, np.float32)
    x[3] = np.nan
    with pytest.raises(CodecError, match="index 3"):
        ref.encode_towards(x)
    assert ref.seq == 0 and not ref.values.any()
    with pytest.raises(ValueError, match="11 elements"):
        ref.encode_towards(np.ones(11, np.float32))
    with pytest.raises(ValueError, match="sequence"):
        ref.encode_towards(np.ones(10, np.float32), new_seq=-1)
    with pytest.raises(ValueError, match="read-only"):
        ref.values[0] = 1.0
    copy = ref.copy()
    copy.encode_towards(np.ones(10, np.float32), CodecConfig(scheme="float32"))
    assert not ref.values.any() and copy.values.all()
