"""Differential-privacy accounting for DP-SGD with Poisson-sampled batches.

Each training step samples every row into the batch independently with probability ``q = B / N``, clips
each row's gradient to norm ``C`` and adds Gaussian noise of std ``sigma * C`` (``sigma`` is the noise
multiplier). What such a run costs in (epsilon, delta) is tracked here with Rényi differential privacy
(RDP), the accountant behind DP-SGD since Abadi et al. 2016, because RDP composes by addition: T identical
steps cost T times one step, per order, so the per-step RDP is computed once and the epsilon of any
number of steps is a cheap conversion.

The per-step RDP is the computation of Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the
Sampled Gaussian Mechanism" (arXiv:1908.10530): an exact sum for integer orders, the two-sided series of
their section 3.3 for fractional ones. The conversion to (epsilon, delta) is the improved bound of
Balle et al. 2020 (arXiv:2004.00010, Proposition 12), with the KL shortcut for tiny RDP. Both follow
Google's dp-accounting ``RdpAccountant`` (``dp_accounting/rdp/rdp_privacy_accountant.py``, version 0.6)
step for step, with the same default orders, so the numbers an operator reads here are the numbers the
reference library gives; ``tests/unit/test_privacy.py`` holds them to 1 % of it over a grid.

Why not import dp-accounting: the daemon must stay light. Importing ``dp_accounting`` loads scipy
(special, optimize, stats), absl-py, attrs, dm-tree and mpmath, about 750 modules, 1.2 s and 75 MB of
resident memory on the development machine, and its ``attrs<24`` pin downgrades the attrs that trio uses.
This module needs numpy and ``math`` only; dp-accounting is a test dependency, the reference, never
imported by the library.

The neighbouring relation is add-or-remove-one (the one Poisson sampling is analysed under): the
guarantee protects the presence of any one row in the node's local data. Sans-I/O: no prints, no files;
the trainer calls :meth:`Accountant.step` and saves :meth:`Accountant.to_dict` in its checkpoint.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np

from gossipfl.errors import ConfigError

#: The Rényi orders, dp-accounting's ``DEFAULT_RDP_ORDERS``: dense near 1 (where small epsilons are
#: decided), every integer to 63, then a few large ones for loose budgets.
ORDERS: tuple[float, ...] = tuple(
    float(a) for a in [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)

#: Most steps an accountant counts: 2**53 is the largest count a float holds exactly, and more steps
#: than a million a second for 285 years.
MAX_STEPS = 2**53
#: Largest noise multiplier accepted. Beyond it epsilon is zero to every digit an operator reads, and
#: ``sigma**2`` would head for overflow.
MAX_NOISE_MULTIPLIER = 1e6
#: :func:`noise_for_budget` looks no further: a noise multiplier of a thousand drowns any gradient, so a
#: budget that needs more is a budget to rethink (fewer steps, a smaller batch), not a noise to add.
NOISE_SEARCH_LIMIT = 1e3
#: :func:`noise_for_budget` stops when its bracket is this narrow, relative to the noise multiplier.
NOISE_RTOL = 1e-6

# Below this the Gaussian's variance underflows, and the mechanism is as good as noiseless: its RDP is
# infinite (the limit as sigma -> 0, and an upper bound, so never an understatement of the loss).
_TINY_SIGMA = 1e-100
# dp-accounting's cap on the terms of the fractional-order series; an order that has not converged by
# then is left out (its RDP is infinite), as there.
_MAX_TERMS_FRAC = 1000
# erfc underflows past x = 26.5; from here on its asymptotic series is exact to double precision.
_ERFC_ASYMPTOTIC = 25.0


@dataclass(frozen=True)
class PrivacySpent:
    """What a run has spent: ``(epsilon, delta)``-DP after ``steps``; ``order`` is the Rényi order whose
    bound was tightest (an order at the edge of :data:`ORDERS` hints that more orders would tighten it)."""

    epsilon: float
    delta: float
    steps: int
    order: float


# ---------------------------------------------------------------- checks


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or a ConfigError naming ``name``; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be finite, got {out}")
    return out


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number, got {type(value).__name__}")
    out = int(value)
    if not 0 <= out <= MAX_STEPS:
        raise ConfigError(f"{name} must be 0 to {MAX_STEPS}, got {out}")
    return out


def _check_delta(delta: object) -> float:
    value = _real("delta", delta)
    if not 0 < value < 1:
        raise ConfigError(f"delta must be between 0 and 1 (exclusive), got {value:g}; 1/rows or less is usual")
    return value


def _check_sample_rate(sample_rate: object, *, zero_ok: bool = False) -> float:
    value = _real("sample_rate", sample_rate)
    if not (0 <= value <= 1 if zero_ok else 0 < value <= 1):
        low = "0" if zero_ok else "above 0"
        raise ConfigError(f"sample_rate must be {low} and at most 1 (batch / rows), got {value:g}")
    return value


def _check_noise(noise_multiplier: object) -> float:
    value = _real("noise_multiplier", noise_multiplier)
    if not 0 <= value <= MAX_NOISE_MULTIPLIER:
        raise ConfigError(f"noise_multiplier must be 0 to {MAX_NOISE_MULTIPLIER:g}, got {value:g}")
    return value


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ConfigError("orders must be a non-empty list of Rényi orders")
    if not np.all(alphas >= 1) or np.any(np.isnan(alphas)):
        raise ConfigError("orders must all be at least 1")
    return alphas


# ---------------------------------------------------------------- RDP of one step


def _log_add(logx: float, logy: float) -> float:
    """log(exp(logx) + exp(logy)) without overflow."""
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc itself underflows (dp-accounting uses scipy's log_ndtr)."""
    if x < _ERFC_ASYMPTOTIC:
        return math.log(math.erfc(x))
    # The Laurent series at infinity: erfc(x) ~ exp(-x^2 - 0.5/x^2 + 0.625/x^4 ...) / (x sqrt(pi)).
    # Products, not powers: a float power raises OverflowError where a product gives inf (or 0).
    x2 = x * x
    u = 1 / x2
    return -math.log(math.pi) / 2 - math.log(x) - x2 + u * (-0.5 + u * (0.625 + u * (-37.0 / 24.0 + u * 353.0 / 64.0)))


def _log_comb(n: float, k: float) -> float:
    """log |binomial(n, k)| for real n (lgamma is log |Gamma|, as scipy's gammaln)."""
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@cache
def _log_comb_row(alpha: int) -> np.ndarray:
    """log binomial(alpha, i) for i = 0..alpha, kept: the same orders come back at every noise tried."""
    log_fact = np.array([math.lgamma(k + 1) for k in range(alpha + 1)])
    row = log_fact[alpha] - log_fact - log_fact[::-1]
    row.setflags(write=False)
    return row


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha and 0 < q < 1: the binomial expansion, all terms at once."""
    i = np.arange(alpha + 1, dtype=np.float64)
    terms = _log_comb_row(alpha) + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma * sigma)
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha and 0 < q < 1: the two series of MTZ19 section 3.3 (integrals over
    (-inf, z0] and [z0, inf)), summed until both terms decrease and are e^-30 of the total."""
    log_a0, log_a1 = -math.inf, -math.inf
    sigma2 = sigma * sigma
    z0 = sigma2 * math.log(1 / q - 1) + 0.5
    log_q, log1mq = math.log(q), math.log1p(-q)
    root2_sigma = math.sqrt(2) * sigma
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_TERMS_FRAC):
        log_coef = _log_comb(alpha, i)
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log1mq
        log_t1 = log_coef + j * log_q + i * log1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / root2_sigma)
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / root2_sigma)
        log_s0 = log_t0 + (i * i - i) / (2 * sigma2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma2) + log_e1
        log_a0 = _log_add(log_a0, log_s0)
        log_a1 = _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf  # not converged: the order is left out of the epsilon, as dp-accounting does


def _rdp_one_order(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if math.isinf(alpha) or sigma < _TINY_SIGMA:
        return math.inf
    if q == 1:
        return alpha / (2 * sigma * sigma)
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


def rdp_subsampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP, per order, of one step of the Poisson-subsampled Gaussian mechanism.

    ``q`` is the sampling rate (0 allowed: a step that samples nobody costs nothing), ``noise_multiplier``
    the noise std over the clipping norm (0 allowed: infinite cost). Orders must be at least 1; an order of
    exactly 1 gives a value the conversion ignores, as in dp-accounting. A fractional order whose series has
    not converged in 1000 terms (small orders at low noise and a large rate) is inf, so the conversion
    leaves it out, as dp-accounting does (it also logs a warning; a library that never prints does not).
    """
    rate = _check_sample_rate(q, zero_ok=True)
    sigma = _check_noise(noise_multiplier)
    alphas = _check_orders(orders)
    return np.array([_rdp_one_order(rate, sigma, float(a)) for a in alphas], dtype=np.float64)


# ---------------------------------------------------------------- RDP to (epsilon, delta)


def _epsilon_and_order(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    """The smallest epsilon over the orders, and the order that gives it (dp-accounting's
    ``compute_epsilon``): the improved conversion ``r + log1p(-1/a) - log(delta * a) / (a - 1)`` for
    orders above 1.01 (it is unstable nearer 1), and epsilon 0 where the RDP is so small that the KL
    bound ``delta <= sqrt(1 - exp(-r))`` already meets delta."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        improved = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
        eps = np.where(orders > 1.01, improved, np.inf)
        eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
    eps = np.where(rdp < 0, 0.0, eps)  # a negative RDP is rounding in an extreme case: dp-accounting says 0
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def epsilon_from_rdp(rdp: Sequence[float] | np.ndarray, orders: Sequence[float], delta: float) -> float:
    """The epsilon of ``(epsilon, delta)``-DP implied by RDP values at ``orders`` (inf if none bounds it)."""
    d = _check_delta(delta)
    alphas = _check_orders(orders)
    values = np.asarray(rdp, dtype=np.float64)
    if values.shape != alphas.shape:
        raise ConfigError(f"rdp has {values.size} values for {alphas.size} orders")
    if np.any(np.isnan(values)):
        raise ConfigError("rdp holds NaN")
    return _epsilon_and_order(values, alphas, d)[0]


def _compose(rdp_step: np.ndarray, steps: int) -> np.ndarray:
    """RDP of ``steps`` identical steps; zero steps cost nothing even when one step costs inf (0 * inf)."""
    if steps == 0:
        return np.zeros_like(rdp_step)
    return rdp_step * float(steps)


# ---------------------------------------------------------------- the accountant


class Accountant:
    """The privacy a training run has spent so far, for one mechanism (noise multiplier, sample rate).

    The per-step RDP is computed once, here; :attr:`epsilon` scales it by the step count and converts,
    which costs microseconds, so a trainer can read it after every step. Not thread-safe.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 0) -> None:
        self._noise = _check_noise(noise_multiplier)
        self._rate = _check_sample_rate(sample_rate)
        self._delta = _check_delta(delta)
        self._steps = _count("steps", steps)
        self._orders = np.asarray(ORDERS, dtype=np.float64)
        self._rdp_step = rdp_subsampled_gaussian(self._rate, self._noise, ORDERS)
        self._spent: PrivacySpent | None = None

    @property
    def noise_multiplier(self) -> float:
        return self._noise

    @property
    def sample_rate(self) -> float:
        return self._rate

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, n: int = 1) -> None:
        """Count ``n`` more steps (each one Poisson batch, one noisy update)."""
        more = _count("n", n)
        if self._steps + more > MAX_STEPS:
            raise ConfigError(f"steps would exceed {MAX_STEPS}")
        if more:
            self._steps += more
            self._spent = None

    def spent(self) -> PrivacySpent:
        """Epsilon at this accountant's delta after the steps so far (kept until the next step)."""
        if self._spent is None:
            eps, order = _epsilon_and_order(_compose(self._rdp_step, self._steps), self._orders, self._delta)
            self._spent = PrivacySpent(epsilon=eps, delta=self._delta, steps=self._steps, order=order)
        return self._spent

    @property
    def epsilon(self) -> float:
        return self.spent().epsilon

    def to_dict(self) -> dict[str, Any]:
        """The accountant as JSON-ready values for a checkpoint: the mechanism and the step count. The epsilon
        is not stored: it is recomputed on load, so a checkpoint cannot claim a smaller one."""
        return {"noise_multiplier": self._noise, "sample_rate": self._rate, "delta": self._delta,
                "steps": self._steps}

    @classmethod
    def from_dict(cls, data: object) -> Accountant:
        """The accountant :meth:`to_dict` saved, read as hostile input: exactly its keys, each of its type and
        range, else a ConfigError naming the field. Unknown keys are refused rather than dropped, so state
        that would change the accounting is never silently lost."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"privacy accountant state must be a mapping, got {type(data).__name__}")
        expected = {"noise_multiplier", "sample_rate", "delta", "steps"}
        missing = sorted(expected - set(data))
        if missing:
            raise ConfigError(f"privacy accountant state lacks {', '.join(missing)}")
        unknown = sorted(str(k) for k in set(data) - expected)
        if unknown:
            raise ConfigError(f"privacy accountant state has unknown field {unknown[0]!r}")
        return cls(noise_multiplier=data["noise_multiplier"], sample_rate=data["sample_rate"],
                   delta=data["delta"], steps=data["steps"])

    def __repr__(self) -> str:
        return (f"Accountant(noise_multiplier={self._noise!r}, sample_rate={self._rate!r}, delta={self._delta!r}, "
                f"steps={self._steps})")


# ---------------------------------------------------------------- planning


def sample_rate(rows: int, batch: int) -> float:
    """The Poisson sampling rate of batches of expected size ``batch`` from ``rows`` rows."""
    n, b = _positive_count("rows", rows), _positive_count("batch", batch)
    if b > n:
        raise ConfigError(f"batch ({b}) must not exceed rows ({n}): the sample rate batch/rows is at most 1")
    return b / n


def _positive_count(name: str, value: object) -> int:
    out = _count(name, value)
    if out == 0:
        raise ConfigError(f"{name} must be positive, got 0")
    return out


def steps_for_epochs(rows: int, batch: int, epochs: float) -> int:
    """Steps of ``epochs`` passes over the data: with Poisson sampling a step sees ``batch`` rows on
    average, so an epoch is rows / batch steps, rounded up over the whole run (never fewer steps, and so
    never a smaller epsilon, than the training will take). Exact arithmetic: 3 epochs of 100 rows in
    batches of 3 are 100 steps, not 101."""
    sample_rate(rows, batch)  # the checks: positive counts, and a batch no larger than the data
    n, b = int(rows), int(batch)
    e = _real("epochs", epochs)
    if e <= 0:
        raise ConfigError(f"epochs must be positive, got {e:g}")
    exact = (Fraction(int(epochs)) if isinstance(epochs, numbers.Integral) else Fraction(repr(e))) * n / b
    steps = math.ceil(exact)
    if steps > MAX_STEPS:
        raise ConfigError(f"{steps} steps is more than the accountant counts ({MAX_STEPS})")
    return steps


def epsilon_for(noise_multiplier: float, sample_rate: float, delta: float, steps: int) -> float:
    """Epsilon after ``steps`` Poisson-sampled steps of the Gaussian mechanism: the cost of a planned run."""
    return Accountant(noise_multiplier, sample_rate, delta, steps).epsilon


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` is at most ``epsilon``, to within a
    relative :data:`NOISE_RTOL` above it.

    Bisection, as epsilon falls as the noise grows: the bracket is doubled from 1 until its top meets the
    budget, then halved until it is :data:`NOISE_RTOL` wide relative to its top. The top is returned, whose
    epsilon was computed and is within the budget: rounding never lets the answer overspend. A budget that
    :data:`NOISE_SEARCH_LIMIT` cannot meet is a ConfigError. Zero steps cost nothing: the answer is 0.
    """
    target = _real("epsilon", epsilon)
    if target <= 0:
        raise ConfigError(f"epsilon must be positive, got {target:g}")
    d, q, t = _check_delta(delta), _check_sample_rate(sample_rate), _count("steps", steps)
    if t == 0:
        return 0.0
    orders = np.asarray(ORDERS, dtype=np.float64)

    def fits(sigma: float) -> bool:
        return _epsilon_and_order(_compose(rdp_subsampled_gaussian(q, sigma, ORDERS), t), orders, d)[0] <= target

    if not fits(NOISE_SEARCH_LIMIT):
        raise ConfigError(f"epsilon {target:g} at delta {d:g} is out of reach in {t} steps at sample rate {q:g} "
                          f"(it needs a noise multiplier above {NOISE_SEARCH_LIMIT:g}): allow a larger epsilon, "
                          "fewer steps or a smaller batch")
    low, high = 0.0, 1.0
    while not fits(high):
        low, high = high, min(2 * high, NOISE_SEARCH_LIMIT)
    while high - low > NOISE_RTOL * high:
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high
