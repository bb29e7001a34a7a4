"""The pace: a node whose model stopped moving slows down step by step, and anything new brings it back at once."""

from __future__ import annotations

import pytest

from gossipfl.protocol.pace import FULL, QUIET, SLOWING, Pace, PaceSettings

PERIOD, DUTY = 1.0, 0.5
STILL, MOVING = 0.001, 0.05  # a model's movement per window, of its norm: under and over the tolerance


def _pace(**settings) -> Pace:
    return Pace(PaceSettings(**{"window": 4, "tolerance": 0.01, "max_period": 16.0, "min_duty_cycle": 0.02,
                                **settings}), PERIOD, DUTY, now=0.0)


def _windows(pace: Pace, moves, now: float = 0.0, losses=None, distance: float = 0.1,
             accuracy: float | None = None) -> float:
    """One window per movement (None: not measured yet): a loss (1.0 unless ``losses`` says), an accuracy and a
    peer's distance each period, then the window is judged with that movement."""
    for i, moved in enumerate(moves):
        loss = 1.0 if losses is None else losses[i]
        while True:
            now += pace.period
            pace.loss(loss, now)
            if accuracy is not None:
                pace.accuracy(accuracy, now)
            pace.peer_distance(distance, now)
            if pace.due(now):
                pace.tick(now, moved)
                break
    return now


def test_a_quiet_node_judges_longer_windows_but_reaches_its_floor_in_a_few():
    pace = _pace(window=10)  # 10 s windows at full speed
    assert pace.window_seconds == 10
    pace.level = pace.max_level  # 16 s periods: a window holds one of them
    assert pace.window_seconds == 16


def test_a_model_that_stopped_moving_steps_down_to_the_floors_and_no_further():
    pace = _pace()
    assert (pace.state, pace.period, pace.duty_cycle) == (FULL, PERIOD, DUTY)
    # 16 s is 4 doublings of the period; 0.02 is under 3 quarterings of 0.5 (0.5 / 64): 4 steps in all
    assert pace.max_level == 4
    now = _windows(pace, [STILL] * 2)
    assert pace.level == 2 and pace.state == SLOWING and pace.period == 4.0 and pace.duty_cycle == 0.5 / 16
    assert "the model moves 0.1% of its norm per window of 4 periods, under 1%" in pace.reason
    _windows(pace, [STILL] * 10, now)
    assert pace.level == 4 and pace.state == QUIET
    assert pace.period == 16.0 and pace.duty_cycle == 0.02
    assert pace.slowdown == 16.0 and pace.last_move == STILL


def test_a_model_that_still_moves_keeps_full_speed_whatever_its_loss_does():
    # the loss of a node that fits its own rows stops falling long before the fleet's models stop closing in
    pace = _pace()
    _windows(pace, [MOVING] * 6, losses=[1.0, 1.1, 0.95, 1.08, 0.96, 1.1])
    assert pace.level == 0 and pace.state == FULL and pace.wakes == 0


def test_no_rest_before_the_movement_is_measured():
    pace = _pace()
    _windows(pace, [None] * 6)
    assert pace.level == 0 and pace.last_move is None


def test_new_rows_wake_a_quiet_node_at_once_and_measure_the_movement_afresh():
    pace = _pace()
    now = _windows(pace, [STILL] * 8)
    assert pace.state == QUIET
    assert pace.new_data(1, now + 0.1) is True
    assert (pace.state, pace.period, pace.duty_cycle) == (FULL, PERIOD, DUTY)
    assert pace.reason.startswith("woken: new rows") and pace.wakes == 1 and pace.wake_kinds == {"new_rows": 1}
    assert pace.measured_since == now + 0.1  # what the model did while resting says nothing of the new rows
    assert pace.new_data(1, now + 0.2) is False  # already at full speed: not a second wake


def test_a_far_peer_wakes_a_quiet_node_and_an_ordinary_one_does_not():
    pace = _pace(wake_distance=4.0)
    now = _windows(pace, [STILL] * 8, distance=0.1)
    assert pace.state == QUIET
    assert pace.peer_distance(0.3, now) is False  # three times the usual: within what peers do
    assert pace.state == QUIET
    assert pace.peer_distance(0.5, now) is True  # five times: a newcomer, or a changed world
    assert pace.state == FULL and "farther than usual" in pace.reason


def test_a_window_whose_validation_accuracy_fell_wakes_it():
    pace = _pace(accuracy_drop=0.05)
    now = _windows(pace, [STILL] * 8, accuracy=0.95)
    assert pace.state == QUIET
    now = _windows(pace, [STILL], now, accuracy=0.92)  # one row of a small validation set: not a fall
    assert pace.state == QUIET
    _windows(pace, [STILL], now, accuracy=0.85)
    assert pace.state == FULL and "validation accuracy fell from 0.950 to 0.850" in pace.reason


def test_a_training_loss_that_jumps_at_the_floor_wakes_nothing():
    # a resting node's window holds a few slices between merges: its mean jumped 7-fold (bench/idle.py)
    pace = _pace()
    now = _windows(pace, [STILL] * 8)
    assert pace.state == QUIET
    _windows(pace, [STILL] * 4, now, losses=[7.0, 6.9, 2.8, 1.8])
    assert pace.state == QUIET and pace.wakes == 0 and pace.last_loss == 1.8


def test_a_wake_that_finds_nothing_to_learn_goes_straight_back_to_its_level():
    pace = _pace()
    now = _windows(pace, [STILL] * 8)
    assert pace.state == QUIET
    pace.new_data(1, now)
    assert pace.level == 0
    now = _windows(pace, [None, None], now)  # at full speed, until the movement is measured afresh
    assert pace.level == 0
    _windows(pace, [STILL], now)  # the model hardly moved: the new rows taught nothing
    assert pace.state == QUIET and "the wake found nothing to learn: back to level 4" in pace.reason


def test_a_wake_that_finds_something_to_learn_stays_and_comes_down_step_by_step():
    pace = _pace()
    now = _windows(pace, [STILL] * 8)
    pace.new_data(1, now)
    now = _windows(pace, [None, MOVING, MOVING], now)  # the new rows are being learned
    assert pace.level == 0
    _windows(pace, [STILL], now)  # learned: the way down is the usual one, a step at a time
    assert pace.level == 1


def test_a_false_alarm_costs_one_measured_stretch_at_full_speed():
    pace = _pace(accuracy_drop=0.05)
    now = _windows(pace, [STILL] * 8, accuracy=0.95)
    now = _windows(pace, [STILL], now, accuracy=0.85)  # a bad draw of validation rows wakes it ...
    assert pace.level == 0 and pace.wake_kinds == {"accuracy": 1}
    now = _windows(pace, [None, None, STILL], now, accuracy=0.95)  # ... and the model did not move
    assert pace.state == QUIET
    _windows(pace, [STILL] * 3, now, accuracy=0.95)
    assert pace.state == QUIET and pace.wakes == 1


def test_quieting_off_stays_at_full_speed():
    pace = _pace(enabled=False)
    _windows(pace, [STILL] * 10)
    assert pace.max_level == 0 and pace.level == 0 and pace.state == FULL


@pytest.mark.parametrize("moved", [float("nan"), float("inf")])
def test_a_movement_that_is_not_finite_is_not_evidence_of_rest(moved):
    pace = _pace()
    _windows(pace, [moved] * 6)
    assert pace.level == 0


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_is_not_shown(loss):
    pace = _pace()
    now = _windows(pace, [STILL] * 8)
    _windows(pace, [STILL] * 2, now, losses=[loss] * 2)
    assert pace.state == QUIET and pace.wakes == 0 and pace.last_loss == 1.0
