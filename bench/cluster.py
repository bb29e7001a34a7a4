"""Clusters of real gossipfld processes on loopback learning digits, side by side, against central training.

    .venv/bin/python bench/cluster.py [--nodes 8] [--seconds 60] [--split dirichlet|iid] [--alpha 0.5]
        [--modes gossip,push,age,fedavg] [--schemes int8,float32,topk] [--period 0.5] [--csv F] [--png F]

Each configuration (a mode and a codec scheme) runs as its own cluster, one after the other, from the
same initial model and the same shards: ``gossip`` is N daemons gossiping push-pull with the default
(clipped) merge rule; ``push`` the same with push-only exchanges; ``age`` push-pull with the plain
age-weighted merge and the outlier rule (``gossip.merge = "age"``) instead of the clipped one
(gossipfl/learning/robust.py);
``fedavg`` is the same N daemons following one extra gateway daemon (which holds no data). While a
cluster runs, the script fetches every node's current model over its control socket (``model.export``) and scores
it on a held-out quarter of digits that no node trains on. The baseline, measured in the same run, is the same
model trained centrally on all the nodes' data together.

It prints accuracy against time and against bytes sent per node for every configuration, then one
table: final accuracy, the time and the bytes per node to reach 95% of central accuracy, resident memory
(VmRSS) and CPU seconds per daemon, and the worst event-loop lag. ``--csv`` and ``--png`` write the
samples as CSV and as a two-panel plot (needs matplotlib, from the ``bench`` extra).

Nodes keep no validation split of their own here (``data.validation_fraction = 0``), so the federated
runs and the central run learn from exactly the same rows.
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gossipfl.cli.argtypes import bounded_float, bounded_int, positive_float
from gossipfl.cli.client import ControlClient
from gossipfl.config import SCHEMES
from gossipfl.errors import GossipflError
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.learning.model import Model
from gossipfl.learning.trainer import Trainer
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, NodeSpec, free_port_base, prepare, train_centrally

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


@dataclass
class Run:
    mode: str
    scheme: str
    # t, mean acc, min acc, then per node: frame bytes sent, bytes on the wire up and down (TLS included)
    samples: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    lag: float = 0.0
    codes: set = field(default_factory=set)
    ages: list[float] = field(default_factory=list)
    counters: list[dict] = field(default_factory=list)
    consensus: float = 0.0  # accuracy of the mean of the nodes' final models
    spread: float = 0.0  # mean distance of a node's final model from that mean

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.scheme}"

    def reach(self, target: float) -> tuple[float, float, float, float] | None:
        """Seconds, frame bytes sent, wire bytes up and down per node when the mean accuracy first reached
        ``target``; None if it never did."""
        for t, mean, _, sent, up, down in self.samples:
            if mean >= target:
                return t, sent, up, down
        return None


def node_state(spec: NodeSpec) -> tuple[np.ndarray, dict] | None:
    client = ControlClient(spec.socket, timeout=10)
    try:
        exported = client.call("model.export")
        status = client.call("status")
    except GossipflError:
        return None
    return Model.from_bytes(base64.b64decode(exported["onnx"])).params, status


def run_config(args: argparse.Namespace, mode: str, scheme: str, root: Path, x_train, y_train, x_test,
               y_test) -> Run:
    fedavg = mode == "fedavg"
    gossip = {"period": args.period, "scheme": scheme, "push_pull": mode != "push", "topk_fraction": args.topk_fraction,
              **({"merge": "age"} if mode == "age" else {})}
    plan = ClusterPlan(nodes=args.nodes + (1 if fedavg else 0), gateways=1 if fedavg else 0,
                       mode="fedavg" if fedavg else "gossip", split=args.split, alpha=args.alpha,
                       base_port=free_port_base(args.nodes + 1), gossip=gossip,
                       training={"duty_cycle": args.duty_cycle, "lr": args.lr},
                       fedavg={"epochs": args.fedavg_epochs, "deadline": 10.0, "round_pause": args.period},
                       extra={"data": {"validation_fraction": 0.0}})
    specs = prepare(root, plan, x_train, y_train)
    score = HeldOut(root / "model.onnx", x_test, y_test).accuracy
    learners = specs[plan.gateways:]
    run = Run(mode, scheme)
    with Cluster(specs) as cluster:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.seconds:
            time.sleep(min(args.sample_every, max(args.seconds - elapsed, 0.1)))
            states = [s for s in map(node_state, learners) if s is not None]
            if states:
                accs = [score(params) for params, _ in states]
                per_node = [[st["counters"].get(key, 0) for _, st in states]
                            for key in ("bytes_out", "wire_out", "wire_in")]
                run.samples.append((time.monotonic() - start, float(np.mean(accs)), float(np.min(accs)),
                                    *(float(np.mean(v)) for v in per_node)))
            run.rss += [m for p in cluster.procs.values() if (m := rss_mb(p.pid)) is not None]
        finals = [s for s in map(node_state, specs) if s is not None]
        run.cpu = [c for p in cluster.procs.values() if (c := cpu_seconds(p.pid)) is not None]
        run.final = [score(params) for params, _ in finals[plan.gateways:]]
        run.ages = [st["age"] for _, st in finals[plan.gateways:]]
        run.counters = [st["counters"] for _, st in finals[plan.gateways:]]
        learned = np.stack([params for params, _ in finals[plan.gateways:]])
        run.consensus = score(learned.mean(axis=0))
        run.spread = float(np.mean(np.linalg.norm(learned - learned.mean(axis=0), axis=1)))
        run.lag = max((st["max_loop_lag"] for _, st in finals), default=0.0)
        run.codes = set(cluster.stop_all().values())
    return run


def write_csv(path: Path, runs: list[Run]) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["mode", "scheme", "seconds", "mean_accuracy", "min_accuracy", "frame_bytes_sent_per_node",
                      "wire_bytes_up_per_node", "wire_bytes_down_per_node"])
        for run in runs:
            for t, mean, low, sent, up, down in run.samples:
                out.writerow([run.mode, run.scheme, f"{t:.2f}", f"{mean:.4f}", f"{low:.4f}", f"{sent:.0f}",
                              f"{up:.0f}", f"{down:.0f}"])


def write_png(path: Path, runs: list[Run], central: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        t = [s[0] for s in run.samples]
        acc = [s[1] for s in run.samples]
        kb = [(s[4] + s[5]) / 1024 for s in run.samples]  # on the wire, up + down
        by_time.plot(t, acc, label=run.name)
        by_bytes.plot(kb, acc, label=run.name)
    for ax, xlabel in ((by_time, "seconds"), (by_bytes, "kB on the wire per node (up + down, TLS included)")):
        ax.axhline(central, color="black", linestyle="--", linewidth=1, label="central")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean accuracy (held-out)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    by_bytes.set_xscale("symlog")
    by_time.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=bounded_int(2, 64), default=8,
                        help="learning daemons (fedavg adds one gateway)")
    parser.add_argument("--seconds", type=bounded_float(5, 3600), default=60)
    parser.add_argument("--split", choices=("dirichlet", "iid"), default="dirichlet")
    parser.add_argument("--alpha", type=positive_float, default=0.5)
    parser.add_argument("--modes", default="gossip",
                        help="comma-separated: gossip (push-pull), push (push-only gossip), age (push-pull, "
                             "the age-weighted merge), fedavg")
    parser.add_argument("--mode", dest="modes", help="alias: --mode fedavg runs gossip and fedavg side by side")
    parser.add_argument("--schemes", default="int8", help="comma-separated: float32, float16, int8, topk")
    parser.add_argument("--topk-fraction", type=bounded_float(1e-4, 1), default=0.01,
                        help="share of the entries topk sends")
    parser.add_argument("--period", type=bounded_float(0.05, 60), default=0.5,
                        help="gossip period, and pause between rounds")
    parser.add_argument("--duty-cycle", type=bounded_float(0.01, 1), default=0.2)
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--fedavg-epochs", type=bounded_int(1, 1000), default=2)
    parser.add_argument("--sample-every", type=bounded_float(0.5, 600), default=2.0)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    schemes = [s for s in args.schemes.split(",") if s]
    for name, given, known in (("mode", modes, ("gossip", "push", "age", "fedavg")),
                               ("scheme", schemes, SCHEMES)):
        if not given or set(given) - set(known):
            parser.error(f"--{name}s: choose from {', '.join(known)}, got {','.join(given) or 'nothing'}")
    if modes == ["fedavg"]:
        modes = ["gossip", "fedavg"]  # FedAvg is always shown beside gossip

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="gfl-bench-") as tmp:
        root = Path(tmp)
        for mode in modes:
            for scheme in schemes:
                runs.append(run_config(args, mode, scheme, root / f"{mode}-{scheme}", x_train, y_train, x_test,
                                       y_test))
        # Every run starts from the same initial model (same seed); central training starts there too.
        central_model = train_centrally(root / f"{modes[0]}-{schemes[0]}" / "model.onnx", x_train, y_train)
        central = float(Trainer(central_model).evaluate(x_test, y_test).accuracy)

    split = f"{args.split}{f' (alpha {args.alpha})' if args.split == 'dirichlet' else ''}"
    title = (f"{args.nodes} gossipfld daemons on loopback, digits split {split}, {args.seconds:.0f}s each; "
             f"gossip period {args.period}s, topk fraction {args.topk_fraction}, lr {args.lr}, "
             f"duty cycle {args.duty_cycle}, "
             f"fedavg {args.fedavg_epochs} epochs/round")
    print(title)
    for run in runs:
        print(f"\n{run.name}: accuracy against time and kB per node (frames sent; on the wire up and down)")
        print(f"{'time s':>7} {'mean acc':>9} {'min acc':>8} {'frames':>9} {'wire up':>9} {'wire down':>10}")
        for t, mean, low, sent, up, down in run.samples:
            print(f"{t:7.1f} {mean:9.4f} {low:8.4f} {sent / 1024:9.1f} {up / 1024:9.1f} {down / 1024:10.1f}")
    target = 0.95 * central
    print(f"\ncentral training on all data (baseline, same run): {central:.4f}; 95% of it: {target:.4f}")
    header = (f"| {'config':<15} | final acc mean (min) | vs central | s to 95% | kB/node to 95%: frames sent "
              f"| wire up | wire down | wire up+down | RSS MB/daemon | CPU s/daemon | max loop lag |")
    print(header)
    print("|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|")
    for run in runs:
        reached = run.reach(target)
        reach_t = f"{reached[0]:.1f}" if reached else "not reached"
        sent, up, down = (f"{v / 1024:.1f}" if reached else "-" for v in (reached or (0, 0, 0, 0))[1:])
        both = f"{(reached[2] + reached[3]) / 1024:.1f}" if reached else "-"
        print(f"| {run.name:<15} | {np.mean(run.final):.4f} ({min(run.final):.4f})     "
              f"| {100 * (np.mean(run.final) - central):+6.2f} pts | {reach_t:>8} | {sent:>26} | {up:>7} "
              f"| {down:>9} | {both:>12} "
              f"| {np.mean(run.rss):13.1f} | {np.mean(run.cpu):12.1f} | {1000 * run.lag:9.1f} ms |")
    for r in runs:
        print(f"{r.name}: median final age {np.median(r.ages):,.0f} samples; mean of the final models scores "
              f"{r.consensus:.4f}; mean distance of a node from it {r.spread:.3f}")
        merges, pulls = (float(np.median([c.get(k, 0) for c in r.counters])) for k in ("merges", "pulls"))
        print(f"{r.name}: median merges per node {merges:.0f}, of which pulled (push-pull) {pulls:.0f}")
    print(f"exit codes after SIGTERM: {sorted(set().union(*(r.codes for r in runs)), key=str)}")
    if args.csv:
        write_csv(args.csv, runs)
        print(f"wrote {args.csv}")
    if args.png:
        write_png(args.png, runs, central, title)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
