"""``gossipfl privacy plan``: what a DP-SGD run needs, or costs, before it is started.

Given the data size, the expected batch and the epochs, either the noise multiplier that keeps the run
within a budget (``--epsilon``) or the epsilon that a noise multiplier spends (``--noise-multiplier``),
from the accountant in ``gossipfl.learning.privacy``. Light on purpose: numpy and the accountant, no onnx,
so that planning never loads a model runtime.

Numbers shown to a person are rounded towards caution: a noise multiplier up, an epsilon up, so that a
figure copied from the terminal never spends more than the budget. ``--json`` gives the full values.
"""

from __future__ import annotations

import argparse
import json
import math
from decimal import ROUND_CEILING, Decimal
from typing import Any

from gossipfl.cli.argtypes import positive_float, positive_int
from gossipfl.errors import ConfigError
from gossipfl.learning.privacy import epsilon_for, noise_for_budget, sample_rate, steps_for_epochs


def round_up(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, rounded up, as text: the shown figure is never below
    the computed one (exact decimal arithmetic on the float's binary value)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exact = Decimal(value)
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return f"{float(exact.quantize(step, rounding=ROUND_CEILING)):.{digits}g}"


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan as JSON-ready values; the library's ConfigError names whatever input is out of range."""
    rate = sample_rate(args.rows, args.batch)
    steps = steps_for_epochs(args.rows, args.batch, args.epochs)
    common = {"delta": args.delta, "steps": steps, "sample_rate": rate, "rows": args.rows, "batch": args.batch,
              "epochs": args.epochs}
    if args.epsilon is not None:
        sigma = noise_for_budget(args.epsilon, args.delta, rate, steps)
        return {"noise_multiplier": sigma, "epsilon": args.epsilon,
                "epsilon_spent": epsilon_for(sigma, rate, args.delta, steps), **common}
    spent = epsilon_for(args.noise_multiplier, rate, args.delta, steps)
    if not math.isfinite(spent):
        raise ConfigError(f"--noise-multiplier {args.noise_multiplier:g} is too small: epsilon is unbounded")
    return {"noise_multiplier": args.noise_multiplier, "epsilon": spent, "epsilon_spent": spent, **common}


def _human(plan: dict[str, Any], budget: bool) -> str:
    tail = (f"{plan['steps']} steps of Poisson batches, sample rate {plan['sample_rate']:.3g}")
    if budget:
        return (f"noise multiplier {round_up(plan['noise_multiplier'], 3)} (sigma) for epsilon {plan['epsilon']:g} "
                f"at delta {plan['delta']:g}: {tail}")
    return (f"epsilon {round_up(plan['epsilon'], 3)} at delta {plan['delta']:g} for noise multiplier "
            f"{plan['noise_multiplier']:g} (sigma): {tail}")


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if args.json:
        print(json.dumps(plan, allow_nan=False))
    else:
        print(_human(plan, budget=args.epsilon is not None))
    return 0


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``gossipfl privacy plan``."""
    privacy = sub.add_parser("privacy", help="differential privacy of DP-SGD training")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True, parser_class=parser_class)
    plan = privacy_sub.add_parser(
        "plan", help="the noise multiplier a privacy budget needs, or the epsilon a noise multiplier costs",
        description="DP-SGD with Poisson-sampled batches (each row joins a batch with probability batch/rows), "
                    "accounted with Rényi DP. Give --epsilon for the noise multiplier that budget needs, or "
                    "--noise-multiplier for the epsilon it costs.")
    goal = plan.add_mutually_exclusive_group(required=True)
    goal.add_argument("--epsilon", type=positive_float, help="the privacy budget: print the noise multiplier it needs")
    goal.add_argument("--noise-multiplier", type=positive_float,
                      help="noise std over the clipping norm: print the epsilon it costs")
    plan.add_argument("--delta", type=positive_float, required=True, help="below 1; 1/rows or less is usual")
    plan.add_argument("--rows", type=positive_int, required=True, help="rows of training data")
    plan.add_argument("--batch", type=positive_int, required=True, help="expected batch size (at most --rows)")
    plan.add_argument("--epochs", type=positive_float, required=True, help="passes over the data (may be fractional)")
    plan.add_argument("--json", action="store_true",
                      help="as JSON: noise_multiplier, epsilon (the budget, or the cost), epsilon_spent, delta, "
                           "steps, sample_rate, rows, batch, epochs")
    plan.set_defaults(handler=cmd_privacy_plan)
