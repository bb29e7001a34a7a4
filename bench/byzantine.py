"""Honest daemons against compromised ones: each merge rule (defence) against each attack, on loopback.

    .venv/bin/python bench/byzantine.py [--honest 8] [--attackers 1] [--seconds 60]
        [--attacks sign-flip,scaled,constant,age-inflation,alie,fake-gateway,stolen-gateway]
        [--defences age,clipped]

Every run is a fresh cluster of ``--honest`` real gossipfld daemons plus ``--attackers`` compromised ones
(bench/attacker.py: the real daemon with a valid certificate of the cluster, whose shared model is forged),
all found by mDNS on loopback and learning digits split by a Dirichlet draw. The honest nodes run
``node.mode = "auto"``, so a peer that claims the gateway role would be followed if the claim were
believed; ``fake-gateway`` makes that claim. ``stolen-gateway`` is a gateway the cluster did grant (the
attackers are the cluster's gateways, without data of their own): its rounds are followed, and its global
models are checked as gossip models are (daemon/follower.py); its honest nodes' shards are drawn for
``--honest`` nodes, not ``--honest + --attackers`` as in the other runs, so its "vs no attack" compares two
draws of the shards. Each defence is ``gossip.merge``: ``age`` (the age-weighted merge with the outlier rule)
or ``clipped`` (gossipfl/learning/robust.py). "clipped merges" counts gossip merges and a gateway's global
models alike.

The baselines, measured in the same run: the same honest daemons with the attackers' slots left empty
("none": the attacker's shard is simply absent, so every run shares the honest shards), and each honest
node's local-only accuracy (the same model trained on its own shard alone, to convergence). The table
gives, for the honest nodes only, the mean (and lowest) final accuracy on a held-out quarter of digits,
its distance from the no-attack run of the same defence, and how many honest nodes ended below their
local-only accuracy: the point where joining the fleet hurt them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from attacker import ATTACKS
from cluster import node_state

from gossipfl.cli.argtypes import bounded_float, bounded_int, positive_float
from gossipfl.config import MERGES, GossipSection
from gossipfl.learning.datasets import dirichlet_shards, load_digits, train_test_split
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, free_port_base, prepare, train_centrally

ATTACKER = Path(__file__).with_name("attacker.py")


@dataclass
class Outcome:
    attack: str
    defence: str
    models: list[np.ndarray | None] = field(default_factory=list)  # honest nodes', in node order
    final: list[float] = field(default_factory=list)  # their held-out accuracy
    counters: list[dict] = field(default_factory=list)
    codes: list[int | None] = field(default_factory=list)

    def total(self, prefix: str) -> int:
        return int(sum(v for c in self.counters for k, v in c.items() if k.startswith(prefix)))


def run_one(args: argparse.Namespace, attack: str, defence: str, root: Path, x_train: np.ndarray,
            y_train: np.ndarray) -> Outcome:
    attackers = 0 if attack == "none" else args.attackers
    honest = args.honest
    per_node: dict[int, dict[str, dict]] = {}
    if attack == "fake-gateway":
        for i in range(honest, honest + args.attackers):
            per_node[i] = {"node": {"role": "gateway", "mode": "gossip"}}
    stolen = attack == "stolen-gateway"  # the granted gateways come first in a plan
    plan = ClusterPlan(nodes=honest + args.attackers, split="dirichlet", alpha=args.alpha, mode="auto",
                       base_port=free_port_base(honest + args.attackers), per_node=per_node,
                       gateways=args.attackers if stolen else 0,
                       gossip={"period": args.period, "merge": defence, "clip_factor": args.clip_factor},
                       training={"duty_cycle": args.duty_cycle, "lr": args.lr},
                       fedavg={"epochs": 1, "deadline": 3.0, "round_pause": 0.5},
                       extra={"data": {"validation_fraction": 0.0}})
    specs = prepare(root, plan, x_train, y_train)
    bad, good = (specs[:args.attackers], specs[args.attackers:]) if stolen else (specs[honest:], specs[:honest])
    for spec in bad:
        spec.program = (str(ATTACKER), attack)
    outcome = Outcome(attack, defence)
    with Cluster(good + bad[:attackers]) as cluster:
        time.sleep(args.seconds)
        for spec in good:
            state = node_state(spec)
            outcome.models.append(state[0] if state is not None else None)
            outcome.counters.append(state[1]["counters"] if state is not None else {})
        outcome.codes = list(cluster.stop_all().values())
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=bounded_int(2, 32), default=8)
    parser.add_argument("--attackers", type=bounded_int(1, 8), default=1)
    parser.add_argument("--seconds", type=bounded_float(5, 3600), default=60)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated: {', '.join(ATTACKS)}")
    parser.add_argument("--defences", default=",".join(MERGES), help=f"comma-separated: {', '.join(MERGES)}")
    parser.add_argument("--alpha", type=positive_float, default=0.5)
    parser.add_argument("--period", type=bounded_float(0.05, 60), default=0.5)
    parser.add_argument("--duty-cycle", type=bounded_float(0.01, 1), default=0.2)
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--clip-factor", type=bounded_float(1, 1000), default=GossipSection.clip_factor,
                        help="gossip.clip_factor for the clipped rule")
    args = parser.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    defences = [d for d in args.defences.split(",") if d]
    if not attacks or set(attacks) - set(ATTACKS):
        parser.error(f"--attacks: choose from {', '.join(ATTACKS)}")
    if not defences or set(defences) - set(MERGES):
        parser.error(f"--defences: choose from {', '.join(MERGES)}")

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
    outcomes: dict[tuple[str, str], Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="gfl-byz-") as tmp:
        root = Path(tmp)
        for defence in defences:
            for attack in ["none", *attacks]:
                o = outcomes[attack, defence] = run_one(args, attack, defence, root / f"{defence}-{attack}",
                                                        x_train, y_train)
                # Every run starts from the same initial model (same seed), so one scorer serves them all.
                score = HeldOut(root / f"{defence}-{attack}" / "model.onnx", x_test, y_test).accuracy
                o.final = [score(m) if m is not None else float("nan") for m in o.models]
                print(f"ran {defence:>7} against {attack:<13}: honest mean {np.nanmean(o.final):.4f}", flush=True)
        # Local-only: each honest node's shard (the same Dirichlet draw prepare made), trained alone.
        shards = dirichlet_shards(y_train, args.honest + args.attackers, args.alpha, 0)
        model_path = root / f"{defences[0]}-none" / "model.onnx"
        local = [score(train_centrally(model_path, x_train[s], y_train[s]).params) for s in shards[:args.honest]]

    print(f"\n{args.honest} honest gossipfld daemons and {args.attackers} attacker(s) with valid certificates, "
          f"digits split dirichlet (alpha {args.alpha}), {args.seconds:.0f}s each, gossip period {args.period}s")
    print("local-only accuracy of each honest node's shard (baseline, same run): "
          + " ".join(f"{a:.3f}" for a in local))
    header = ("| attack        | defence | honest acc mean (min) | vs no attack | below local-only | refused "
              "| clipped merges | followed a gateway |")
    print(header)
    print("|" + "|".join("-" * len(p) for p in header.split("|")[1:-1]) + "|")
    for defence in defences:
        clean = float(np.nanmean(outcomes["none", defence].final))
        for attack in ["none", *attacks]:
            o = outcomes[attack, defence]
            mean, low = float(np.nanmean(o.final)), float(np.nanmin(o.final))
            below = sum(1 for f, lo in zip(o.final, local, strict=True) if not f >= lo)
            print(f"| {attack:<13} | {defence:<7} | {mean:.4f} ({low:.4f})       | {100 * (mean - clean):+6.2f} pts "
                  f"| {below:>7} of {len(o.final):<6} | {o.total('refused'):>7} "
                  f"| {o.total('merges_clipped') + o.total('fedavg.global_clipped'):>14} "
                  f"| {o.total('fedavg.adopted'):>18} |")
    if len(defences) > 1:
        base = float(np.nanmean(outcomes["none", defences[0]].final))
        for defence in defences[1:]:
            cost = float(np.nanmean(outcomes["none", defence].final)) - base
            print(f"no attacker: {defence} against {defences[0]}: {100 * cost:+.2f} pts")
    codes = sorted({c for o in outcomes.values() for c in o.codes}, key=str)
    print(f"exit codes after SIGTERM: {codes}")


if __name__ == "__main__":
    main()
