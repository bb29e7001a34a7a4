"""A cluster that has learned should rest: CPU and bytes on the wire per daemon over time, quiet against constant.

    .venv/bin/python bench/idle.py [--nodes 8] [--minutes 10] [--period 2.0] [--duty-cycle 0.2] [--csv F]

Two runs of the same cluster of real gossipfld daemons on loopback, one after the other, from the same
initial model and the same shards (digits, Dirichlet 0.5): ``quiet`` with the default pace (``[quiet]``:
the node slows its gossip and training step by step once its loss stops moving, and wakes on new rows, a
far peer or a drop in accuracy), and ``constant``, the baseline, with ``quiet.enabled = false`` (today's
constant rate). Nodes keep their default validation split, which is what their pace watches.

Every ``--sample-every`` seconds it reads each daemon's CPU time (/proc) and its bytes on the wire (the
``wire_in`` and ``wire_out`` counters: TLS records and handshakes included) and scores every node's model
on a held-out quarter of digits. It prints, per run, accuracy, CPU (% of one core) and wire bytes per
second per daemon over time, then one table: the rate over the last ``--tail`` minutes, and the final
accuracy, quiet beside constant.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cluster import cpu_seconds, node_state

from gossipfl.cli.argtypes import bounded_float, bounded_int
from gossipfl.learning.datasets import load_digits, train_test_split
from gossipfl.testing.cluster import Cluster, ClusterPlan, HeldOut, free_port_base, prepare


@dataclass
class Sample:
    seconds: float
    accuracy: float  # mean over nodes
    cpu: float  # CPU seconds per daemon, cumulative
    wire: float  # bytes on the wire (up + down) per daemon, cumulative
    cpus: list[float]  # each daemon's, cumulative (the goals are per daemon: the busiest is printed too)
    wires: list[float]
    quiet: int  # nodes whose pace is not full speed
    change: float  # median over nodes of the model movement per window their pace last measured


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    wakes: float = 0.0
    wakes_by_kind: dict[str, int] = field(default_factory=dict)  # over all nodes

    def rate(self, since: float) -> tuple[float, float, float, float]:
        """CPU (% of a core) and wire bytes a second between ``since`` and the last sample: the mean per daemon,
        and the busiest daemon's."""
        first = next(s for s in self.samples if s.seconds >= since)
        last = self.samples[-1]
        span = max(last.seconds - first.seconds, 1e-9)
        cpus = [100 * (b - a) / span for a, b in zip(first.cpus, last.cpus, strict=True)]
        wires = [(b - a) / span for a, b in zip(first.wires, last.wires, strict=True)]
        return (100 * (last.cpu - first.cpu) / span, max(cpus, default=0.0), (last.wire - first.wire) / span,
                max(wires, default=0.0))


def run_cluster(args: argparse.Namespace, name: str, quiet: bool, root: Path, data) -> Run:
    x_train, y_train, x_test, y_test = data
    plan = ClusterPlan(nodes=args.nodes, split="dirichlet", alpha=0.5, base_port=free_port_base(args.nodes),
                       gossip={"period": args.period}, training={"duty_cycle": args.duty_cycle, "lr": 0.05},
                       # the daemon's default checkpoint period: the test clusters' 5 s is a cost no device pays
                       extra={"quiet": {"enabled": quiet}, "state": {"checkpoint_seconds": 30.0}})
    specs = prepare(root, plan, x_train, y_train)
    score = HeldOut(root / "model.onnx", x_test, y_test).accuracy
    run = Run(name)
    with Cluster(specs) as cluster:
        start = time.monotonic()
        pids = [p.pid for p in cluster.procs.values()]
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(min(args.sample_every, max(args.minutes * 60 - elapsed, 0.1)))
            states = [s for s in map(node_state, specs) if s is not None]
            if not states:
                continue
            if len(states) < len(specs):
                continue  # every daemon in every sample: the busiest one is compared with itself
            counters = [st["counters"] for _, st in states]
            cpus = [c for pid in pids if (c := cpu_seconds(pid)) is not None]
            wires = [float(c.get("wire_in", 0) + c.get("wire_out", 0)) for c in counters]
            if len(cpus) < len(pids):
                continue
            run.samples.append(Sample(
                seconds=time.monotonic() - start,
                accuracy=float(np.mean([score(params) for params, _ in states])),
                cpu=float(np.mean(cpus)), wire=float(np.mean(wires)), cpus=cpus, wires=wires,
                quiet=sum(st.get("pace", {}).get("state", "full") != "full" for _, st in states),
                change=float(np.median([abs(c) if (c := st.get("pace", {}).get("last_move")) is not None
                                        else np.nan for _, st in states]))))
        finals = [s for s in map(node_state, specs) if s is not None]
        run.final = [score(params) for params, _ in finals]
        run.wakes = float(np.mean([st["counters"].get("pace.wakes", 0) for _, st in finals]))
        for _, st in finals:
            for kind, count in st.get("pace", {}).get("wakes_by_kind", {}).items():
                run.wakes_by_kind[kind] = run.wakes_by_kind.get(kind, 0) + count
        cluster.stop_all()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=bounded_int(2, 64), default=8)
    parser.add_argument("--minutes", type=bounded_float(1, 600), default=10)
    parser.add_argument("--tail", type=bounded_float(0.5, 600), default=3, help="minutes the final rates are over")
    parser.add_argument("--period", type=bounded_float(0.05, 60), default=2.0, help="gossip period at full speed")
    parser.add_argument("--duty-cycle", type=bounded_float(0.01, 1), default=0.2)
    parser.add_argument("--sample-every", type=bounded_float(1, 600), default=15.0)
    parser.add_argument("--only", choices=("quiet", "constant"), help="one run only (calibration; no ratio)")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    if args.tail >= args.minutes:
        parser.error("--tail must be shorter than --minutes")

    x, y = load_digits()
    data = train_test_split(x, y, test_fraction=0.25, seed=1)
    with tempfile.TemporaryDirectory(prefix="gfl-idle-") as tmp:
        runs = [run_cluster(args, name, quiet, Path(tmp) / name, data)
                for name, quiet in (("quiet", True), ("constant", False)) if args.only in (None, name)]

    print(f"{args.nodes} gossipfld daemons on loopback, digits Dirichlet 0.5, {args.minutes:g} min per run; "
          f"gossip period {args.period:g} s and duty cycle {args.duty_cycle:g} at full speed")
    for run in runs:
        print(f"\n{run.name}: per daemon, over each interval")
        print(f"{'min':>6} {'mean acc':>9} {'CPU % core':>11} {'wire B/s':>10} {'nodes quiet':>12} "
              f"{'model moves':>12}")
        for before, s in zip(run.samples, run.samples[1:], strict=False):
            span = s.seconds - before.seconds
            print(f"{s.seconds / 60:6.1f} {s.accuracy:9.4f} {100 * (s.cpu - before.cpu) / span:11.2f} "
                  f"{(s.wire - before.wire) / span:10.0f} {s.quiet:>6}/{args.nodes} {100 * s.change:11.2f}%")
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(run.wakes_by_kind.items())) or "none"
        print(f"wakes over all nodes, by kind: {kinds}")
    if len(runs) < 2:
        return
    since = (args.minutes - args.tail) * 60
    quiet, constant = runs
    (q_cpu, q_cpu_max, q_wire, q_wire_max), (c_cpu, c_cpu_max, c_wire, c_wire_max) = (quiet.rate(since),
                                                                                      constant.rate(since))
    print(f"\nlast {args.tail:g} minutes, per daemon (baseline: the constant-rate run, same script):")
    print("| run | final acc mean (min) | CPU % of a core: mean (busiest) | wire B/s up+down: mean (busiest) "
          "| wakes per node |")
    print("|---|---|---|---|---|")
    for run, cpu, cpu_max, wire, wire_max in ((quiet, q_cpu, q_cpu_max, q_wire, q_wire_max),
                                              (constant, c_cpu, c_cpu_max, c_wire, c_wire_max)):
        print(f"| {run.name} | {np.mean(run.final):.4f} ({min(run.final):.4f}) | {cpu:.2f} ({cpu_max:.2f}) "
              f"| {wire:.0f} ({wire_max:.0f}) | {run.wakes:.1f} |")
    print(f"quiet / constant: CPU {q_cpu / max(c_cpu, 1e-9):.3f}x, wire {q_wire / max(c_wire, 1e-9):.3f}x; "
          f"final accuracy {100 * (np.mean(quiet.final) - np.mean(constant.final)):+.2f} points")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["run", "seconds", "mean_accuracy", "cpu_seconds_per_daemon", "wire_bytes_per_daemon",
                          "nodes_quiet"])
            for run in runs:
                for s in run.samples:
                    out.writerow([run.name, f"{s.seconds:.1f}", f"{s.accuracy:.4f}", f"{s.cpu:.2f}",
                                  f"{s.wire:.0f}", s.quiet])
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
