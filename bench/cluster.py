"""A cluster of real gossipfld processes on loopback, learning digits split non-IID, against central training.

    .venv/bin/python bench/cluster.py [--nodes 8] [--seconds 60] [--split dirichlet|iid] [--alpha 0.5]
                                      [--scheme int8] [--period 0.5]

Every node starts from the same model and holds one shard (Dirichlet(alpha) over labels by default).
While the cluster runs, the script reads each node's checkpoint (written every second, atomically)
and scores it on a held-out quarter of digits that no node trains on. It prints accuracy against time
and against bytes sent per node, the resident memory per daemon (VmRSS from /proc), the worst event-loop
lag any daemon saw, and, as the baseline measured in the same run, the same model trained centrally on
all the nodes' data together.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from gossipfl.datasets import load_digits, train_test_split
from gossipfl.errors import GossipflError
from gossipfl.trainer import Trainer
from gossipfld.cluster import Cluster, ClusterPlan, evaluate_checkpoint, prepare, train_centrally


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--split", choices=("dirichlet", "iid"), default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--scheme", choices=("float32", "float16", "int8", "topk"), default="int8")
    parser.add_argument("--period", type=float, default=0.5)
    parser.add_argument("--duty-cycle", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sample-every", type=float, default=5.0)
    args = parser.parse_args()

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
    with tempfile.TemporaryDirectory(prefix="gossipfl-bench-") as tmp:
        root = Path(tmp)
        plan = ClusterPlan(nodes=args.nodes, split=args.split, alpha=args.alpha, base_port=21000,
                           gossip={"period": args.period, "scheme": args.scheme},
                           training={"duty_cycle": args.duty_cycle, "lr": args.lr},
                           extra={"state": {"checkpoint_seconds": 1.0}})
        specs = prepare(root, plan, x_train, y_train)
        central_model = train_centrally(root / "model.onnx", x_train, y_train)
        central = float(Trainer(central_model).evaluate(x_test, y_test).accuracy)
        rows, rss = [], []
        with Cluster(specs) as cluster:
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < args.seconds:
                time.sleep(min(args.sample_every, max(args.seconds - elapsed, 0.1)))
                accs, sent = [], []
                for spec in specs:
                    try:
                        metrics, state, _ = evaluate_checkpoint(spec, x_test, y_test)
                    except GossipflError:
                        continue  # not written yet
                    accs.append(metrics.accuracy)
                    sent.append(state["counters"].get("bytes_out", 0))
                rss += [m for p in cluster.procs.values() if (m := rss_mb(p.pid)) is not None]
                if accs:
                    rows.append((time.monotonic() - start, float(np.mean(accs)), float(np.min(accs)),
                                 float(np.mean(sent))))
            codes = cluster.stop_all()
        finals = [evaluate_checkpoint(s, x_test, y_test) for s in specs]
        lags = [state.get("max_loop_lag", 0.0) for _, state, _ in finals]
        final_acc = [m.accuracy for m, _, _ in finals]
        sent = [state["counters"].get("bytes_out", 0) for _, state, _ in finals]

    print(f"{args.nodes} gossipfld daemons on loopback, digits split {args.split}"
          f"{f' (alpha {args.alpha})' if args.split == 'dirichlet' else ''}, codec {args.scheme}, "
          f"gossip period {args.period}s, lr {args.lr}, training duty cycle {args.duty_cycle}, {args.seconds:.0f}s")
    print(f"{'time s':>7} {'mean acc':>9} {'min acc':>8} {'kB sent/node':>13}")
    for t, mean, low, kb in rows:
        print(f"{t:7.1f} {mean:9.4f} {low:8.4f} {kb / 1024:13.1f}")
    print(f"final accuracy per node: {' '.join(f'{a:.4f}' for a in final_acc)}")
    print(f"central training on all data (baseline, same run): {central:.4f}")
    print(f"mean final accuracy {np.mean(final_acc):.4f}: {100 * (np.mean(final_acc) - central):+.2f} points vs "
          f"central; worst node {100 * (min(final_acc) - central):+.2f} points")
    print(f"bytes sent per node: mean {np.mean(sent) / 1024:.1f} kB over {args.seconds:.0f}s")
    print(f"resident memory per daemon: mean {np.mean(rss):.1f} MB, max {np.max(rss):.1f} MB")
    print(f"worst event-loop lag seen by any daemon: {1000 * max(lags):.1f} ms")
    print(f"exit codes after SIGTERM: {sorted(set(codes.values()), key=str)}")


if __name__ == "__main__":
    main()
