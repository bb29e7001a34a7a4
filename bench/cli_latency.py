"""How long ``gossipfl status`` takes against a running daemon: the fast path beside the full parser.

    .venv/bin/python bench/cli_latency.py [--runs 20]

One real daemon on loopback (digits, no peers). ``gossipfl status`` is timed as an operator's shell runs it,
a new process each time, wall clock from spawn to exit, with its peak resident memory. The baseline,
measured in the same run, is the same command through the full parser (``gossipfl.cli.app``, every
command registered, onnx and numpy imported), which is what every command cost before the fast path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gossipfl.cli.argtypes import bounded_int
from gossipfl.cli.client import ControlClient
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import Cluster, ClusterPlan, free_port_base, prepare

FULL_PARSER = "import sys; from gossipfl.cli.app import main; sys.exit(main(sys.argv[1:]))"


def timed(command: list[str], runs: int) -> tuple[float, float]:
    """Median wall seconds and the largest peak RSS (MB) over ``runs`` runs of ``command``."""
    walls, peaks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
        walls.append(time.perf_counter() - start)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{command[-3:]} exited with {proc.returncode}")
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(walls), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=bounded_int(3, 1000), default=20)
    args = parser.parse_args()
    x, y = load_digits()
    with tempfile.TemporaryDirectory(prefix="gfl-cli-") as tmp:
        spec = prepare(Path(tmp), ClusterPlan(nodes=1, base_port=free_port_base(), mdns=False), x[:200], y[:200])[0]
        with Cluster([spec]) as cluster:
            if not cluster.wait_for_log(spec, "node started", 60):
                raise SystemExit("the daemon did not start")
            ControlClient(spec.socket, timeout=10).call("status")
            status = ["status", "--socket", str(spec.socket)]
            fast = timed([sys.executable, "-m", "gossipfl.cli", *status], args.runs)
            full = timed([sys.executable, "-c", FULL_PARSER, *status], args.runs)
            cluster.stop_all()
    print(f"gossipfl status against a running daemon, median of {args.runs} runs, a new process each")
    print(f"{'path':<40} {'wall ms':>8} {'peak RSS MB':>12} {'vs full':>8}")
    print(f"{'full parser (every command, onnx, numpy)':<40} {1000 * full[0]:8.1f} {full[1]:12.1f} {'1.00x':>8}")
    print(f"{'fast path (control commands only)':<40} {1000 * fast[0]:8.1f} {fast[1]:12.1f} "
          f"{fast[0] / full[0]:7.2f}x")


if __name__ == "__main__":
    main()
