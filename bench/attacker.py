"""A compromised gossipfld for bench/byzantine.py: the real daemon, with a valid certificate, whose shared
model is forged.

What an attacker who stole a device's certificate would run: the same binary with the model it shares
replaced. It learns and merges like an honest node (so it keeps up with the cluster and its forgeries stay
plausible); only what leaves it is forged, in gossip pushes, in answers to pulls and, as a gateway, in the
global model of its rounds.

    python bench/attacker.py ATTACK --config node.toml

Attacks (``ATTACKS``):
- ``sign-flip``: the negated model;
- ``scaled``: the model times ``SCALE``;
- ``constant``: every parameter 1.0;
- ``age-inflation``: its own model, trained on its own shard only (it never merges), claiming age 1e300;
- ``alie``: "a little is enough" (Baruch, Baruch, Goldberg 2019): the mean of the honest models it has
  received minus ``ALIE_Z`` times their per-parameter spread, claiming the largest age it has seen; a shift
  inside the honest spread, so no distance rule tells it apart;
- ``fake-gateway``: sign-flip, run with ``node.role = "gateway"`` by bench/byzantine.py: a member certificate
  claiming a role the cluster never granted;
- ``stolen-gateway``: sign-flip, run by bench/byzantine.py as a gateway the cluster did grant (its id is in
  every node's ``fedavg.gateways``): the certificate of a real gateway, stolen.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable

import numpy as np

from gossipfld import main
from gossipfld.learner import BeforeMerge, Learner

SCALE = 10.0
ALIE_Z = 1.0
INFLATED_AGE = 1e300
OBSERVED = 8  # recent honest models the ALIE attacker averages


class Forger:
    def __init__(self, attack: str) -> None:
        self.attack = attack
        self.seen: deque[np.ndarray] = deque(maxlen=OBSERVED)
        self.seen_ages: deque[float] = deque(maxlen=OBSERVED)

    @property
    def merges(self) -> bool:
        return self.attack != "age-inflation"

    def observe(self, remote: np.ndarray, age: float) -> None:
        self.seen.append(remote.copy())
        self.seen_ages.append(float(age))

    def forge(self, params: np.ndarray, age: float) -> tuple[np.ndarray, float]:
        if self.attack in ("sign-flip", "fake-gateway", "stolen-gateway"):
            return -params, age
        if self.attack == "scaled":
            return params * np.float32(SCALE), age
        if self.attack == "constant":
            return np.ones_like(params), age
        if self.attack == "age-inflation":
            return params, INFLATED_AGE
        if self.attack == "alie":
            if len(self.seen) < 2:
                return params, age
            stack = np.stack(self.seen)
            forged = stack.mean(axis=0) - np.float32(ALIE_Z) * stack.std(axis=0)
            return forged.astype(np.float32), max(self.seen_ages)
        raise ValueError(f"unknown attack {self.attack!r}")


ATTACKS = ("sign-flip", "scaled", "constant", "age-inflation", "alie", "fake-gateway", "stolen-gateway")


def install(forger: Forger) -> None:
    """Swap the learner's two ways out (``snapshot`` for pushes and rounds, ``merge``'s kept model for pulls)."""
    honest_snapshot: Callable = Learner.snapshot
    honest_merge: Callable = Learner.merge

    async def snapshot(self: Learner) -> tuple[np.ndarray, float]:
        params, age = await honest_snapshot(self)
        return forger.forge(params, age)

    async def merge(self: Learner, peer: bytes, remote: np.ndarray, remote_age: float, *,
                    keep_before: bool) -> BeforeMerge:
        forger.observe(remote, remote_age)
        if forger.merges:
            before = await honest_merge(self, peer, remote, remote_age, keep_before=True)
            params, age = forger.forge(before.params, before.age)
            return BeforeMerge(params if keep_before else None, age, before.weight_remote)
        params, age = forger.forge(*(await honest_snapshot(self)))
        return BeforeMerge(params if keep_before else None, age, 0.0)

    Learner.snapshot = snapshot  # type: ignore[method-assign]
    Learner.merge = merge  # type: ignore[method-assign]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ATTACKS:
        sys.exit(f"usage: attacker.py {{{','.join(ATTACKS)}}} --config node.toml")
    install(Forger(sys.argv[1]))
    sys.exit(main.main(sys.argv[2:]))
