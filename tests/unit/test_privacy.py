"""The DP accountant against Google's dp-accounting, its planning helpers, and ``gossipfl privacy plan``."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as reference
from hypothesis import given, settings
from hypothesis import strategies as st

from gossipfl.cli import main
from gossipfl.errors import ConfigError
from gossipfl.learning.privacy import (
    MAX_STEPS,
    NOISE_RTOL,
    ORDERS,
    Accountant,
    PrivacySpent,
    epsilon_for,
    epsilon_from_rdp,
    noise_for_budget,
    rdp_subsampled_gaussian,
    sample_rate,
    steps_for_epochs,
)

RATES = (0.001, 0.01, 0.05, 0.2, 1.0)
SIGMAS = (0.5, 0.8, 1.0, 2.0, 5.0)
STEPS = (1, 100, 10000)
DELTAS = (1e-5, 1e-6)


def reference_epsilons(q: float, sigma: float, steps: int) -> list[float]:
    """dp-accounting's epsilon at each of DELTAS for ``steps`` Poisson-sampled Gaussian steps."""
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return [acc.get_epsilon(delta) for delta in DELTAS]


# ---------------------------------------------------------------- against the reference


def test_orders_are_dp_accountings_defaults():
    assert list(ORDERS) == [float(a) for a in reference.DEFAULT_RDP_ORDERS]


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product(RATES, SIGMAS)))
def test_epsilon_matches_dp_accounting(q, sigma):
    for steps in STEPS:
        acc = Accountant(sigma, q, DELTAS[0])
        acc.step(steps)
        ours = [acc.epsilon, epsilon_for(sigma, q, DELTAS[1], steps)]
        for delta, mine, theirs in zip(DELTAS, ours, reference_epsilons(q, sigma, steps), strict=True):
            assert mine == pytest.approx(theirs, rel=0.01, abs=1e-9), (q, sigma, steps, delta)


@settings(max_examples=40, deadline=None)
@given(rdp=st.lists(st.floats(0, 50), min_size=len(ORDERS), max_size=len(ORDERS)),
       delta=st.floats(1e-12, 0.5))
def test_conversion_is_dp_accountings(rdp, delta):
    theirs, _ = reference.compute_epsilon(ORDERS, rdp, delta)
    assert epsilon_from_rdp(rdp, ORDERS, delta) == pytest.approx(theirs, rel=1e-12, abs=1e-12)


def test_conversion_is_tighter_than_the_plain_bound():
    rdp = rdp_subsampled_gaussian(0.01, 1.0) * 1000
    orders = np.asarray(ORDERS)
    plain = float(np.min((rdp - math.log(1e-5) / (orders - 1))[orders > 1]))
    assert epsilon_from_rdp(rdp, ORDERS, 1e-5) < plain


# ---------------------------------------------------------------- edge cases and monotonicity


def test_rdp_edge_cases():
    orders = np.asarray(ORDERS)
    assert np.all(rdp_subsampled_gaussian(0.0, 1.0) == 0)
    assert np.all(rdp_subsampled_gaussian(0.0, 0.0) == 0)  # nobody sampled: nothing spent, noise or not
    assert np.allclose(rdp_subsampled_gaussian(1.0, 2.0), orders / 8)
    assert np.all(np.isinf(rdp_subsampled_gaussian(0.3, 0.0)))
    assert np.all(np.isinf(rdp_subsampled_gaussian(0.3, 1e-300)))  # underflowing variance: noiseless


def test_zero_steps_cost_nothing_even_without_noise():
    assert Accountant(0.0, 0.5, 1e-5).epsilon == 0
    assert Accountant(0.0, 0.5, 1e-5, steps=1).epsilon == math.inf
    assert noise_for_budget(1.0, 1e-5, 0.5, 0) == 0.0


@settings(max_examples=30, deadline=None)
@given(q=st.floats(1e-12, 1.0), sigma=st.floats(0.0, 1e6), steps=st.integers(0, MAX_STEPS))
def test_extreme_inputs_give_numbers_not_nan(q, sigma, steps):
    rdp = rdp_subsampled_gaussian(q, sigma)
    assert not np.any(np.isnan(rdp))
    eps = epsilon_for(sigma, q, 1e-5, steps)
    assert eps >= 0 and not math.isnan(eps)


def test_more_noise_spends_less():
    for q in (0.01, 0.2, 1.0):
        eps = [epsilon_for(sigma, q, 1e-5, 500) for sigma in (0.6, 0.9, 1.3, 2.0, 4.0, 10.0)]
        assert all(a > b for a, b in itertools.pairwise(eps)), (q, eps)


def test_more_steps_spend_more():
    acc = Accountant(1.0, 0.02, 1e-5)
    seen = []
    for more in (0, 1, 9, 90, 900, 9000):
        acc.step(more)
        seen.append(acc.epsilon)
    assert seen[0] == 0 and all(a < b for a, b in itertools.pairwise(seen)), seen


def test_accountant_steps_and_cache():
    acc = Accountant(1.1, 0.01, 1e-5)
    acc.step()
    acc.step(99)
    assert acc.steps == 100
    spent = acc.spent()
    assert isinstance(spent, PrivacySpent) and spent.steps == 100 and spent.delta == 1e-5 and spent.order in ORDERS
    assert acc.spent() is spent  # no step since: the same answer, not a new computation
    assert spent.epsilon == Accountant(1.1, 0.01, 1e-5, steps=100).epsilon
    acc.step(0)
    assert acc.spent() is spent
    acc.step(1)
    assert acc.spent().steps == 101 and acc.epsilon > spent.epsilon


# ---------------------------------------------------------------- planning


def test_steps_for_epochs():
    assert steps_for_epochs(14400, 256, 30) == 1688
    assert steps_for_epochs(100, 3, 3) == 100  # exact: not 101 from 3 * 100 / 3 in floats
    assert steps_for_epochs(100, 3, 3.0) == 100
    assert steps_for_epochs(10, 3, 0.5) == 2
    assert steps_for_epochs(1000, 10, 0.1) == 10
    assert sample_rate(14400, 256) == 256 / 14400


@pytest.mark.parametrize(("rows", "batch", "epochs", "field"), [
    (0, 1, 1, "rows"), (-5, 1, 1, "rows"), (10, 0, 1, "batch"), (10, 11, 1, "batch"), (10, 2, 0, "epochs"),
    (10, 2, -1, "epochs"), (10, 2, math.nan, "epochs"), (10, 2, math.inf, "epochs"), (True, 1, 1, "rows"),
    (10.0, 2, 1, "rows"),
])
def test_steps_for_epochs_refuses(rows, batch, epochs, field):
    with pytest.raises(ConfigError, match=field):
        steps_for_epochs(rows, batch, epochs)


@pytest.mark.parametrize(("epsilon", "delta", "q", "steps"), [
    (3.0, 1e-5, 256 / 14400, 1688), (1.0, 1e-6, 0.001, 10000), (8.0, 1e-5, 0.2, 100), (0.5, 1e-5, 1.0, 1),
    (10.0, 1e-5, 0.05, 1),
])
def test_noise_for_budget_round_trips(epsilon, delta, q, steps):
    sigma = noise_for_budget(epsilon, delta, q, steps)
    spent = epsilon_for(sigma, q, delta, steps)
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=1e-3)
    assert epsilon_for(sigma * (1 - 10 * NOISE_RTOL), q, delta, steps) > epsilon  # the smallest, to the tolerance


def test_noise_for_budget_refuses_the_unreachable():
    with pytest.raises(ConfigError, match="out of reach"):
        noise_for_budget(1e-4, 1e-5, 1.0, 10000)


@pytest.mark.parametrize(("args", "field"), [
    ((0.0, 1e-5, 0.1, 10), "epsilon"), ((-1.0, 1e-5, 0.1, 10), "epsilon"), ((math.inf, 1e-5, 0.1, 10), "epsilon"),
    ((1.0, 0.0, 0.1, 10), "delta"), ((1.0, 1.0, 0.1, 10), "delta"), ((1.0, 1e-5, 0.0, 10), "sample_rate"),
    ((1.0, 1e-5, 1.5, 10), "sample_rate"), ((1.0, 1e-5, 0.1, -1), "steps"), ((1.0, 1e-5, 0.1, 2.5), "steps"),
])
def test_noise_for_budget_refuses_bad_input(args, field):
    with pytest.raises(ConfigError, match=field):
        noise_for_budget(*args)


def test_rdp_and_conversion_refuse_bad_input():
    with pytest.raises(ConfigError, match="sample_rate"):
        rdp_subsampled_gaussian(-0.1, 1.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        rdp_subsampled_gaussian(0.1, -1.0)
    with pytest.raises(ConfigError, match="orders"):
        rdp_subsampled_gaussian(0.1, 1.0, [0.5, 2.0])
    with pytest.raises(ConfigError, match="delta"):
        epsilon_from_rdp([0.1, 0.2], [2.0, 3.0], 1.5)
    with pytest.raises(ConfigError, match="rdp"):
        epsilon_from_rdp([0.1], [2.0, 3.0], 1e-5)
    with pytest.raises(ConfigError, match="NaN"):
        epsilon_from_rdp([math.nan, 0.2], [2.0, 3.0], 1e-5)


# ---------------------------------------------------------------- persisting


def test_to_dict_round_trips_through_json():
    acc = Accountant(1.3, 0.02, 1e-6)
    acc.step(321)
    back = Accountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back.to_dict() == acc.to_dict()
    assert back.epsilon == acc.epsilon and back.steps == 321


GOOD = {"noise_multiplier": 1.0, "sample_rate": 0.01, "delta": 1e-5, "steps": 10}


@pytest.mark.parametrize(("data", "field"), [
    (None, "mapping"), ([1, 2], "mapping"), ("x", "mapping"),
    ({k: v for k, v in GOOD.items() if k != "steps"}, "steps"),
    ({**GOOD, "epsilon": 0.0}, "epsilon"),
    ({**GOOD, "steps": True}, "steps"), ({**GOOD, "steps": 3.0}, "steps"), ({**GOOD, "steps": "10"}, "steps"),
    ({**GOOD, "steps": -1}, "steps"), ({**GOOD, "steps": 2**60}, "steps"),
    ({**GOOD, "noise_multiplier": "1"}, "noise_multiplier"),
    ({**GOOD, "noise_multiplier": math.nan}, "noise_multiplier"),
    ({**GOOD, "noise_multiplier": -0.5}, "noise_multiplier"), ({**GOOD, "noise_multiplier": 1e300}, "noise_multiplier"),
    ({**GOOD, "noise_multiplier": None}, "noise_multiplier"),
    ({**GOOD, "sample_rate": 0.0}, "sample_rate"), ({**GOOD, "sample_rate": 1.01}, "sample_rate"),
    ({**GOOD, "sample_rate": math.inf}, "sample_rate"), ({**GOOD, "sample_rate": False}, "sample_rate"),
    ({**GOOD, "delta": 0.0}, "delta"), ({**GOOD, "delta": 1.0}, "delta"), ({**GOOD, "delta": -math.inf}, "delta"),
    ({**GOOD, "delta": [1e-5]}, "delta"),
])
def test_from_dict_refuses_hostile_state(data, field):
    with pytest.raises(ConfigError, match=field) as info:
        Accountant.from_dict(data)
    assert "\n" not in str(info.value)


def test_step_refuses_bad_counts():
    acc = Accountant(1.0, 0.01, 1e-5, steps=MAX_STEPS - 1)
    with pytest.raises(ConfigError, match="steps"):
        acc.step(2)
    with pytest.raises(ConfigError, match="n must"):
        acc.step(-1)
    assert acc.steps == MAX_STEPS - 1


# ---------------------------------------------------------------- the CLI


PLAN = ["privacy", "plan", "--delta", "1e-5", "--rows", "14400", "--batch", "256", "--epochs", "30"]


def test_cli_plan_for_a_budget(capsys):
    assert main([*PLAN, "--epsilon", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("noise multiplier ") and "for epsilon 3 at delta 1e-05: 1688 steps" in line
    assert "sample rate 0.0178" in line
    shown = float(line.split()[2])  # rounded up: the figure a person copies stays within the budget
    assert epsilon_for(shown, 256 / 14400, 1e-5, 1688) <= 3

    assert main([*PLAN, "--epsilon", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == 3 and out["delta"] == 1e-5 and out["steps"] == 1688
    assert out["sample_rate"] == pytest.approx(256 / 14400)
    assert out["noise_multiplier"] <= shown
    assert out["epsilon_spent"] <= 3
    assert out["noise_multiplier"] == pytest.approx(noise_for_budget(3, 1e-5, 256 / 14400, 1688))


def test_cli_cost_of_a_noise_multiplier(capsys):
    assert main([*PLAN, "--noise-multiplier", "1.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = epsilon_for(1.1, 256 / 14400, 1e-5, 1688)
    assert out["epsilon"] == pytest.approx(expected) and out["noise_multiplier"] == 1.1 and out["steps"] == 1688
    assert main([*PLAN, "--noise-multiplier", "1.1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("epsilon ") and "for noise multiplier 1.1" in line
    assert float(line.split()[1]) >= expected  # rounded up, never understated


@pytest.mark.parametrize(("change", "words"), [
    (["--delta", "1"], "delta"), (["--batch", "20000"], "batch"), (["--epsilon", "1e-6", "--batch", "14400"],
                                                                    "out of reach"),
])
def test_cli_bad_values_are_one_line(capsys, change, words):
    args = [*PLAN, "--epsilon", "3"]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        args[args.index(flag) + 1] = value
    assert main(args) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and captured.out == ""


@pytest.mark.parametrize("args", [
    [*PLAN],  # neither --epsilon nor --noise-multiplier
    [*PLAN, "--epsilon", "3", "--noise-multiplier", "1"],
    [*PLAN[:6], "-100", *PLAN[7:], "--epsilon", "3"],  # negative rows
    [*PLAN, "--epsilon", "-3"],
])
def test_cli_usage_errors(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_command_and_library_stay_light():
    """Neither the accountant nor its command loads onnx, or the reference and its scipy."""
    code = ("import sys, gossipfl.cli.cli_privacy, gossipfl.learning.privacy; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'onnxruntime', 'dp_accounting', "
            "'scipy', 'absl'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
