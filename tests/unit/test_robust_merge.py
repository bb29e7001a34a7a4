"""The clipped merge rule against the attacks that got through the age-weighted merge and the outlier rule."""

from __future__ import annotations

import itertools

import numpy as np

from gossipfl.learning.merge import MAX_AGE, age_share, age_weighted_merge, clipped_merge
from gossipfl.learning.robust import ClipSettings, MergeGuard

N = 1000
EVIL = b"e" * 32
rng = np.random.default_rng(0)


def honest_cluster(n: int = 8) -> list[np.ndarray]:
    centre = rng.normal(0, 1, N).astype(np.float32)
    return [centre + rng.normal(0, 0.01, N).astype(np.float32) for _ in range(n)]


def merge(guard: MergeGuard, local: np.ndarray, local_age: float, peer: bytes, remote: np.ndarray, remote_age: float,
          now: float):
    believed = guard.believed_age(peer, remote_age, local_age, now)
    radius = guard.radius(float(np.linalg.norm(local)))
    merged = clipped_merge(local, local_age, remote, believed, max_share=guard.share(peer), radius=radius)
    guard.record(peer, merged, radius)
    return merged


def test_ages_at_the_top_of_the_float_range_no_longer_freeze_every_later_merge():
    assert age_share(1.8e308, 1.8e308) == 0.5  # their sum was infinity, and every share 0 ever after
    x = np.zeros(4, np.float32)
    merged = age_weighted_merge(x, 1.8e308, np.ones(4, np.float32), 1.8e308)
    assert merged.weight_remote == 0.5 and merged.age == MAX_AGE and np.allclose(x, 0.5)


def test_a_huge_claimed_age_right_after_a_restart_cannot_replace_the_model():
    nodes = honest_cluster()
    local = nodes[0].copy()
    guard = MergeGuard(ClipSettings())
    guard.restore(None)  # a restart: nothing remembered of this peer
    before = local.copy()
    merged = merge(guard, local, 5000.0, EVIL, -10 * before, 1e300, now=100.0)
    assert merged.weight_remote <= 0.5  # the claim bought no more than an equal share
    assert merged.age <= 5000.0
    # With the plain rule the same push took the model over: a share of 1 - 5e-297.
    plain = before.copy()
    assert age_weighted_merge(plain, 5000.0, -10 * before, 1e300).weight_remote > 0.999


def test_sign_flipped_models_move_the_model_a_bounded_step_and_cannot_walk_the_radius_up():
    nodes = honest_cluster()
    local = nodes[0].copy()
    guard = MergeGuard(ClipSettings())
    now = 0.0
    for step in range(40):  # honest merges set the radius
        now += 1
        merge(guard, local, 1000.0 + step, bytes([step % 7 + 1]) * 32, nodes[step % 7 + 1], 1000.0 + step, now)
    radius = guard.radius(float(np.linalg.norm(local)))
    assert radius is not None
    start = local.copy()
    for _ in range(100):  # then an attacker, one merge in eight, with growing distances
        now += 1
        moved = merge(guard, local, 2000.0, EVIL, -start * 100, 1e300, now)
        assert moved.moved <= 0.5 * radius * 1.0001
        for j in range(1, 8):
            merge(guard, local, 2000.0, bytes([j]) * 32, nodes[j], 2000.0, now)
    assert guard.radius(float(np.linalg.norm(local))) <= 2 * radius  # the median did not follow the attacker
    assert np.linalg.norm(local - start) < 0.5 * np.linalg.norm(start)  # still in the honest cluster's region


def test_only_merges_that_moved_the_model_enter_the_history():
    guard = MergeGuard(ClipSettings())
    local = np.zeros(N, np.float32)
    for i in range(10):  # pushes with age 0 against our age: a share of 0
        merge(guard, local, 100.0, EVIL, np.full(N, float(i), np.float32), 0.0, now=float(i))
    assert len(guard.distances) == 0


def test_an_honest_newcomer_far_away_is_merged_a_clipped_step_not_refused():
    nodes = honest_cluster()
    local = nodes[0].copy()
    guard = MergeGuard(ClipSettings())
    for step in range(10):
        merge(guard, local, 1000.0, bytes([step % 7 + 1]) * 32, nodes[step % 7 + 1], 1000.0, float(step))
    newcomer = rng.normal(0, 1, N).astype(np.float32)  # a fresh model, 30x further than any honest peer
    merged = merge(guard, local, 1000.0, b"n" * 32, newcomer, 0.0, now=20.0)
    assert merged.weight_remote == 0.0  # an age of 0 teaches us nothing, but nothing is refused either
    later = merge(guard, newcomer.copy(), 0.0, bytes([1]) * 32, nodes[1], 1000.0, now=21.0)
    assert later.weight_remote == 0.5  # the newcomer takes half of the cluster's model at its first merge


def test_what_the_guard_remembers_survives_a_restart():
    guard = MergeGuard(ClipSettings(max_age_rate=10.0))
    local = np.zeros(N, np.float32)
    for i in range(6):
        merge(guard, local, 100.0, bytes([i + 1]) * 32, np.full(N, 0.01 * (i + 1), np.float32), 100.0, float(i))
    state = guard.state(now=10.0)
    again = MergeGuard(ClipSettings(max_age_rate=10.0))
    assert again.restore(state) == 6
    assert list(again.distances) == list(guard.distances)
    # A peer's believable age resumes from where it was, and grows from its first merge after the restart.
    assert again.believed_age(bytes([1]) * 32, 1e300, 0.0, now=5000.0) == 200.0  # 100 + 10 s at 10 a second
    assert again.believed_age(bytes([1]) * 32, 1e300, 0.0, now=5010.0) == 300.0
    assert again.restore({"distances": ["x", -1, float("nan")], "ages": {"zz": 1, "00" * 32: "old"}}) == 6


def test_a_peer_clipped_at_every_merge_loses_its_share_and_an_honest_one_that_comes_close_earns_it_back():
    nodes = honest_cluster()
    local = nodes[0].copy()
    guard = MergeGuard(ClipSettings())
    for step in range(20):  # honest merges set the radius
        merge(guard, local, 1000.0, bytes([step % 7 + 1]) * 32, nodes[step % 7 + 1], 1000.0, float(step))
    start = local.copy()
    radius = guard.radius(float(np.linalg.norm(local)))
    moves = [merge(guard, local, 1000.0, EVIL, -start, 1000.0, 30.0 + i).moved for i in range(8)]
    assert all(later < earlier for earlier, later in itertools.pairwise(moves))  # each pull weaker
    assert guard.share(EVIL) < 0.01 * guard.settings.max_share
    # Eight sign-flip merges in all moved the model less than two merges at a full share would have.
    assert np.linalg.norm(local - start) < 2 * 0.5 * radius
    for i in range(20):  # the same peer, now sending honest models
        merge(guard, local, 1000.0, EVIL, nodes[1], 1000.0, 40.0 + i)
    assert guard.share(EVIL) == guard.settings.max_share
    state = guard.state(now=60.0)
    again = MergeGuard(ClipSettings())
    again.restore({**state, "trust": {EVIL.hex(): 0.25}})
    assert again.share(EVIL) == 0.25 * again.settings.max_share  # trust survives a restart
