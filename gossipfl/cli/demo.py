"""``make demo`` / ``gossipfl demo``: a local cluster of real ``gossipfld`` daemons learning digits on loopback.

Each daemon is its own process with its own state directory, certificate (one cluster CA) and non-IID
shard of the digits data set shipped in scikit-learn's wheel; they find each other by mDNS on 127.0.0.1
and gossip over mutual TLS (or, with ``--mode fedavg``, follow one extra gateway daemon in FedAvg rounds).

While the cluster runs, the demo asks every daemon for its ``status`` and, every few seconds, for its
current model (``model.export``), which it scores on a held-out quarter of digits that no node trains on.
A terminal gets a table refreshed in place; a pipe or a file gets one compact line every few seconds.
At the end the demo stops every daemon it started (also on Ctrl-C, SIGTERM or an error), prints a
summary next to the same model trained centrally on all the nodes' data in the same run, and writes a
PNG of accuracy against time and against bytes sent.

``gossipfl demo --offline`` runs the earlier single-process pipeline instead (train, then eval).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gossipfl.cli.argtypes import bounded_float, bounded_int
from gossipfl.cli.cli_control import human_size
from gossipfl.cli.client import ControlClient
from gossipfl.cli.command import Parser, top_parser
from gossipfl.cli.command import run as run_command
from gossipfl.cli.demo_processes import Stopped, kill_leftovers, stop_everything, stop_on_signals
from gossipfl.cli.offline import register_model, register_train_eval
from gossipfl.control import MAX_SOCKET_PATH
from gossipfl.errors import ControlError, DaemonNotRunning, GossipflError
from gossipfl.learning.checkpoint import load_checkpoint
from gossipfl.learning.datasets import dirichlet_shards, load_digits, train_test_split, write_csv
from gossipfl.testing.cluster import (
    CONTROL_SOCKET,
    Cluster,
    ClusterPlan,
    HeldOut,
    NodeSpec,
    free_port_base,
    prepare,
    train_centrally,
)

DEFAULT_OUT = "demo-out"
MARKER = ".gossipfl-demo"  # marks a cluster directory as the demo's own, so a rerun may replace it
ALPHA = 0.5
TICK = 1.0  # seconds between status polls (and redraws)
LINE_EVERY = 5.0  # seconds between lines when stdout is not a terminal
SPARK = "▁▂▃▄▅▆▇█"


class DemoError(GossipflError):
    """The demo could not run: a directory it may not replace, a daemon that died, a missing extra."""


# ---------------------------------------------------------------- what the demo knows about each node


@dataclass
class NodeView:
    spec: NodeSpec
    role: str
    rows: int
    state: str = "starting"
    accuracy: float | None = None
    peers: int = 0
    bytes_out: float = 0.0
    exchanges: float = 0.0
    history: list[tuple[float, float, float]] = field(default_factory=list)  # (seconds, accuracy, bytes out)

    @property
    def name(self) -> str:
        return self.spec.name


def exchanges(counters: dict[str, float]) -> float:
    """Model transfers a node took part in: gossip pushes sent and merged, FedAvg updates sent and received."""
    keys = ("exchanges_out", "exchanges_in", "fedavg.updates_sent", "fedavg.updates_received")
    return float(sum(counters.get(k, 0) for k in keys))


def poll(view: NodeView, cluster: Cluster, held_out: HeldOut, ours: set[str], elapsed: float, sample: bool) -> None:
    """Refresh one node from its control socket: status and peers, and with ``sample`` its model, scored."""
    proc = cluster.procs.get(view.name)
    if proc is None or proc.poll() is not None:
        view.state = f"exited {proc.returncode if proc else '?'}"
        return
    client = ControlClient(view.spec.socket, timeout=5.0)
    try:
        status = client.call("status")
    except DaemonNotRunning:
        view.state = "starting"
        return
    except ControlError:
        view.state = "no answer"
        return
    view.state = "running"
    counters = status.get("counters", {})
    with contextlib.suppress(ControlError):  # peers of this cluster only: other clusters' nodes on the same
        # link show up in mDNS too, and are refused at the TLS handshake (their certificates are not our CA's)
        view.peers = sum(p["node_id"] in ours and p["state"] == "live" for p in client.call("peers"))
    view.bytes_out = float(counters.get("bytes_out", 0))
    view.exchanges = exchanges(counters)
    if sample:
        try:
            view.accuracy = held_out.of_export(client.call("model.export"))
        except GossipflError:  # ControlError included
            return
        view.history.append((elapsed, view.accuracy, view.bytes_out))


# ---------------------------------------------------------------- the live view


def sparkline(values: Sequence[float], width: int = 16) -> str:
    """The last ``width`` values, scaled to their own range: on a 0-1 scale every bar was full after ten
    seconds (accuracy above 0.9), and the history said nothing."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    lo, hi = min(tail), max(tail)
    span = hi - lo if hi - lo > 1e-9 else 1.0
    return "".join(SPARK[min(int((v - lo) / span * len(SPARK)), len(SPARK) - 1)] for v in tail)


@dataclass
class LiveView:
    """A table redrawn in place on a terminal; a compact line every ``LINE_EVERY`` seconds otherwise."""

    title: str
    seconds: float
    untrained: float
    central: float
    out: TextIO = sys.stdout
    tty: bool = False
    drawn: int = 0
    next_line: float = 0.0

    def show(self, views: list[NodeView], elapsed: float, final: bool = False) -> None:
        if self.tty:
            self._draw(views, elapsed)
        elif final or elapsed >= self.next_line:
            self.next_line = elapsed + LINE_EVERY
            self.out.write(self._line(views, elapsed) + "\n")
            self.out.flush()

    def _line(self, views: list[NodeView], elapsed: float) -> str:
        accs = " ".join("  -  " if v.accuracy is None else f"{v.accuracy:.3f}" for v in views)
        known = [v.accuracy for v in views if v.accuracy is not None]
        mean = f"{np.mean(known):.3f}" if known else "-"
        peers = "/".join(str(v.peers) for v in views)
        sent = sum(v.bytes_out for v in views) / max(len(views), 1)
        return (f"{elapsed:5.0f}s  held-out acc {accs}  mean {mean}  peers {peers}  "
                f"sent {human_size(sent)}/node  (central {self.central:.3f})")

    def _draw(self, views: list[NodeView], elapsed: float) -> None:
        done = min(elapsed / self.seconds, 1.0)
        bar = "█" * round(24 * done) + "·" * (24 - round(24 * done))
        lines = [f"{self.title}   {bar} {elapsed:3.0f}/{self.seconds:.0f} s", "",
                 f"  {'node':<7}{'role':<9}{'rows':>5}  {'held-out acc':<12} {'history':<16} {'peers':>5}"
                 f"{'sent':>12}{'exchanges':>11}  state"]
        for v in views:
            acc = "-" if v.accuracy is None else f"{v.accuracy:.4f}"
            spark = sparkline([a for _, a, _ in v.history])
            lines.append(f"  {v.name:<7}{v.role:<9}{v.rows:>5}  {acc:<12} {spark:<16} {v.peers:>5}"
                         f"{human_size(v.bytes_out):>12}{v.exchanges:>11.0f}  {v.state}")
        known = [v.accuracy for v in views if v.accuracy is not None]
        mean = f"{np.mean(known):.4f}" if known else "-"
        lines += ["", f"  mean held-out accuracy {mean}   untrained {self.untrained:.4f}   "
                      f"central training (same data, same run) {self.central:.4f}"]
        text = "".join(f"\x1b[2K{line}\n" for line in lines)
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + text + "\x1b[J")
        self.out.flush()
        self.drawn = len(lines)


# ---------------------------------------------------------------- the run


@dataclass
class Final:
    name: str
    role: str
    accuracy: float | None
    bytes_out: float
    exchanges: float
    code: int | None
    alone: float | None = None  # the same model trained on this node's shard only (None: a gateway)


def fresh_directory(root: Path) -> None:
    """Replace a previous demo's cluster directory (stopping anything still running from it)."""
    if root.exists():
        if not (root / MARKER).exists():
            raise DemoError(f"{root} exists and is not a gossipfl demo directory; choose another --out")
        kill_leftovers(root)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("written by gossipfl demo; replaced by the next run\n")


def plan_for(args: argparse.Namespace) -> ClusterPlan:
    gateways = 1 if args.mode == "fedavg" else 0
    return ClusterPlan(
        nodes=args.nodes + gateways, gateways=gateways, mode=args.mode, split="dirichlet", alpha=ALPHA, seed=0,
        hidden=(32,), base_port=free_port_base(args.nodes + gateways), mdns=True,
        gossip={"period": 0.5, "scheme": "int8"},
        # A small duty cycle leaves CPU for every daemon on a small machine (and for the demo itself).
        training={"lr": 0.05, "duty_cycle": 0.2},
        fedavg={"epochs": 1, "deadline": 5.0, "round_pause": 0.3},
        # No validation split: each node learns from all of its shard, so the nodes together see exactly
        # the rows the central reference is trained on. Accuracy is measured on the common held-out set.
        extra={"data": {"validation_fraction": 0.0}, "state": {"checkpoint_seconds": 5.0}},
    )


def alone_accuracies(root: Path, plan: ClusterPlan, x_train: np.ndarray, y_train: np.ndarray,
                     held_out: HeldOut) -> list[float]:
    """Each learner's shard (the draw ``prepare`` made) trained alone, centrally, scored on the held-out set:
    what a node would reach without the fleet, the question every operator asks first."""
    shards = dirichlet_shards(y_train, plan.nodes - plan.gateways, plan.alpha, plan.seed)
    return [held_out.accuracy(train_centrally(root / "model.onnx", x_train[s], y_train[s]).params) for s in shards]


def final_results(views: list[NodeView], held_out: HeldOut, codes: dict[str, int | None],
                  alone: list[float]) -> list[Final]:
    """Each node's last checkpoint (written at SIGTERM), scored on the held-out set; live values as a fallback."""
    results = []
    learners = iter(alone)
    for v in views:
        accuracy, sent, exch = v.accuracy, v.bytes_out, v.exchanges
        with contextlib.suppress(GossipflError, OSError):
            model, state = load_checkpoint(v.spec.checkpoint)
            accuracy = held_out.accuracy(model.params)
            counters = state.get("counters", {})
            sent, exch = float(counters.get("bytes_out", sent)), exchanges(counters)
        results.append(Final(v.name, v.role, accuracy, sent, exch, codes.get(v.name),
                             None if v.role == "gateway" else next(learners, None)))
    return results


def summary_lines(args: argparse.Namespace, results: list[Final], untrained: float, central: float,
                  elapsed: float, held_out_rows: int) -> list[str]:
    learners = args.nodes
    what = (f"{learners} gossipfld daemons gossiping" if args.mode == "gossip"
            else f"1 gateway + {learners} client gossipfld daemons in FedAvg rounds")
    lines = [f"summary: {what} on 127.0.0.1 for {elapsed:.0f} s, digits split Dirichlet({ALPHA}), "
             f"accuracy on {held_out_rows} held-out rows",
             f"  {'node':<7}{'role':<9}{'accuracy':>9}{'vs central':>12}{'alone':>8}{'vs alone':>11}{'sent':>12}"
             f"{'exchanges':>11}  exit"]
    for r in results:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        gap = "-" if r.accuracy is None else f"{100 * (r.accuracy - central):+.2f} pt"
        alone = "-" if r.alone is None else f"{r.alone:.4f}"
        gain = "-" if r.alone is None or r.accuracy is None else f"{100 * (r.accuracy - r.alone):+.2f} pt"
        code = "killed" if r.code is None else str(r.code)
        sent = human_size(r.bytes_out)
        lines.append(f"  {r.name:<7}{r.role:<9}{acc:>9}{gap:>12}{alone:>8}{gain:>11}{sent:>12}"
                     f"{r.exchanges:>11.0f}  {code}")
    accs = [r.accuracy for r in results if r.accuracy is not None and r.role != "gateway"]
    if accs:
        lines.append(f"  mean of the {'nodes' if args.mode == 'gossip' else 'clients'}: {np.mean(accs):.4f} "
                     f"({100 * (np.mean(accs) - central):+.2f} pt vs central), worst {min(accs):.4f}")
    alone_accs = [r.alone for r in results if r.alone is not None]
    if alone_accs:
        lines.append(f"  each node trained alone on its own shard (same model, this run): mean "
                     f"{np.mean(alone_accs):.4f}, worst {min(alone_accs):.4f}"
                     + (f"; learning together gained {100 * (np.mean(accs) - np.mean(alone_accs)):+.2f} pt"
                        if accs else ""))
    lines.append(f"  untrained model: {untrained:.4f}; central training on all the nodes' data "
                 f"(reference, this run): {central:.4f}")
    lines.append("  (accuracy: each node's last checkpoint; exchanges: gossip pushes sent and merged, "
                 "or FedAvg updates sent and received)")
    return lines


def plot(path: Path, title: str, views: list[NodeView], untrained: float, central: float,
         alone: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    by_time, by_bytes = fig.subplots(1, 2, sharey=True)
    learners = iter(alone)
    for v in views:
        if not v.history:
            continue
        t, acc, sent = (np.array(col, dtype=float) for col in zip(*v.history, strict=True))
        label = f"{v.name} ({v.role})" if v.role == "gateway" else v.name
        (line,) = by_time.plot(t, acc, marker=".", linewidth=1.2, label=label)
        by_bytes.plot(sent / 1024, acc, marker=".", linewidth=1.2, label=label)
        own = None if v.role == "gateway" else next(learners, None)
        if own is not None:  # the same node trained alone: a dotted line in its colour
            by_time.axhline(own, color=line.get_color(), linestyle=":", linewidth=1)
    # Zoomed to where the nodes and their alone levels are: on 0-1, everything after the first seconds was a
    # flat band at the top. The untrained start, below, is named in the legend.
    finals = [v.history[-1][1] for v in views if v.history]
    low = max(0.0, min([*alone, *finals, central]) - 0.05)
    for ax in (by_time, by_bytes):
        ax.axhline(central, color="black", linestyle="--", linewidth=1, label=f"central training {central:.3f}")
        ax.plot([], [], color="grey", linestyle=":", label="each node trained alone (its colour)")
        ax.plot([], [], " ", label=f"untrained {untrained:.3f}" + (" (below the axis)" if untrained < low else ""))
        ax.grid(alpha=0.3)
        ax.set_ylim(low, 1.0 + (1.0 - low) * 0.02)
    by_time.set_xlabel("seconds since the daemons started")
    by_time.set_ylabel("accuracy on the common held-out set")
    by_bytes.set_xlabel("KiB sent by the node")
    by_time.set_title("accuracy against time")
    by_bytes.set_title("accuracy against bytes sent")
    by_bytes.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def write_samples(path: Path, views: list[NodeView]) -> None:
    rows = ["node,seconds,accuracy,bytes_out"]
    rows += [f"{v.name},{t:.2f},{a:.4f},{b:.0f}" for v in views for t, a, b in v.history]
    path.write_text("\n".join(rows) + "\n")


def run(args: argparse.Namespace) -> int:
    """The cluster demo; returns the exit code (0, 1 when a daemon failed, 128+signal when interrupted)."""
    if args.offline:
        return offline(args.out)
    if importlib.util.find_spec("matplotlib") is None:
        raise DemoError("the demo's plot needs matplotlib: pip install 'gossipfl[demo]'")
    out = Path(args.out).resolve()
    root = out / "cluster"
    longest = root / f"node{args.nodes}" / CONTROL_SOCKET
    if len(os.fsencode(str(longest))) > MAX_SOCKET_PATH:
        raise DemoError(f"--out {args.out} is too deep: control sockets under it would be longer than "
                        f"{MAX_SOCKET_PATH} bytes; choose a shorter path")
    tty = sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")

    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=1)
    fresh_directory(root)
    write_csv(out / "held-out" / "digits.csv", x_test, y_test)
    plan = plan_for(args)
    specs = prepare(root, plan, x_train, y_train)
    held_out = HeldOut(root / "model.onnx", x_test, y_test)
    untrained = held_out.accuracy()
    central = held_out.accuracy(train_centrally(root / "model.onnx", x_train, y_train).params)
    alone = alone_accuracies(root, plan, x_train, y_train, held_out)
    learner = "client" if args.mode == "fedavg" else "node"
    views = [NodeView(s, "gateway" if i < plan.gateways else learner, rows=_shard_rows(s),
                      history=[(0.0, untrained, 0.0)])  # every node starts from the same untrained model
             for i, s in enumerate(specs)]
    ours = {s.node_id.hex() for s in specs}
    what = (f"{args.nodes} daemons gossiping" if args.mode == "gossip"
            else f"1 gateway + {args.nodes} FedAvg clients")
    title = f"gossipfl demo: {what}, digits split Dirichlet({ALPHA}), mDNS on 127.0.0.1"
    print(f"{title}\n  cluster, certificates, configs and logs: {root}/node*/\n"
          f"  untrained accuracy {untrained:.4f}; central training on the same data {central:.4f}; "
          f"running {args.seconds:.0f} s (Ctrl-C stops early)", flush=True)
    live = LiveView(title="gossipfl demo", seconds=args.seconds, untrained=untrained, central=central, tty=tty)

    cluster = Cluster(specs)
    elapsed, interrupted = 0.0, 0
    with stop_on_signals():
        try:
            start = time.monotonic()
            cluster.start_all()
            next_sample = start + args.sample_every
            while (elapsed := time.monotonic() - start) < args.seconds:
                sample = time.monotonic() >= next_sample
                if sample:
                    next_sample += args.sample_every
                for v in views:
                    poll(v, cluster, held_out, ours, elapsed, sample)
                live.show(views, elapsed)
                if all(v.state.startswith("exited") for v in views):
                    raise DemoError(f"every daemon exited; see {views[0].spec.log}:\n" + _tail(views[0].spec.log))
                time.sleep(max(0.0, min(TICK - (time.monotonic() - start - elapsed), args.seconds - elapsed)))
            for v in views:  # one last sample at the end, so every curve reaches the right edge
                poll(v, cluster, held_out, ours, elapsed, True)
            live.show(views, elapsed, final=True)
        except KeyboardInterrupt:
            interrupted = signal.SIGINT
        except Stopped as stop:
            interrupted = stop.signum
        finally:
            if tty and live.drawn:
                sys.stdout.write("\n")
            codes = stop_everything(cluster, root, timeout=5.0 if interrupted else 20.0)
    if interrupted:
        print(f"gossipfl demo: interrupted; stopped all {len(specs)} daemons. Logs: {root}/node*/gossipfld.log",
              file=sys.stderr)
        return 128 + interrupted

    results = final_results(views, held_out, codes, alone)
    lines = summary_lines(args, results, untrained, central, elapsed, len(y_test))
    png = out / "accuracy.png"
    plot(png, title, views, untrained, central, alone)
    write_samples(out / "samples.csv", views)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    print(f"plot: {png}\nsamples: {out / 'samples.csv'}\nlogs: {root}/node*/gossipfld.log\n"
          f"held-out set: {out / 'held-out'} ({_cli_name()} eval --model {root}/node0/state/checkpoint.onnx "
          f"--data {out / 'held-out'})")
    failed = [r.name for r in results if r.code != 0]
    if failed:
        print(f"gossipfl demo: {', '.join(failed)} did not stop cleanly; see their logs", file=sys.stderr)
        return 1
    return 0


def _cli_name() -> str:
    """How to run the CLI from here: ``gossipfl`` when it is on PATH (an activated venv, a system install),
    else its path beside this interpreter (``make demo`` runs .venv/bin/python; .venv/bin is seldom on PATH)."""
    if shutil.which("gossipfl"):
        return "gossipfl"
    beside = Path(sys.executable).parent / "gossipfl"
    return str(beside) if beside.exists() else f"{sys.executable} -m gossipfl.cli"


def _shard_rows(spec: NodeSpec) -> int:
    shard = spec.directory / "data" / "shard.csv"
    return max(len(shard.read_bytes().splitlines()) - 1, 0) if shard.exists() else 0


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- the earlier offline pipeline


def offline(out: str = DEFAULT_OUT) -> int:
    """Writes train and held-out sets, makes an MLP, trains it with ``gossipfl train``, scores it with ``eval``."""
    parser, sub = top_parser()  # the commands the pipeline runs, as ``gossipfl`` parses and runs them
    register_model(sub, Parser)
    register_train_eval(sub, Parser)
    root = Path(out) / "offline"
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, test_fraction=0.25, seed=0)
    write_csv(root / "train" / "digits.csv", x_train, y_train)
    write_csv(root / "test" / "digits.csv", x_test, y_test)
    print(f"digits: {len(x_train)} training rows in {root / 'train'}, {len(x_test)} held out in {root / 'test'}")
    model, trained = str(root / "model.onnx"), str(root / "trained.onnx")
    steps = [
        ["model", "init", "--arch", "mlp", "--inputs", "64", "--classes", "10", "--hidden", "128", "--out", model],
        ["train", "--model", model, "--data", str(root / "train"), "--epochs", "20", "--out", trained],
        ["eval", "--model", trained, "--data", str(root / "test")],
    ]
    for argv in steps:
        print("$ gossipfl " + " ".join(argv), flush=True)
        code = run_command(parser, argv)
        if code:
            return code
    return 0


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=bounded_int(2, 32), default=4, help="daemons that learn (default 4)")
    parser.add_argument("--mode", choices=("gossip", "fedavg"), default="gossip",
                        help="gossip between the nodes, or FedAvg rounds through one extra gateway daemon")
    parser.add_argument("--seconds", type=bounded_float(1, 24 * 3600), default=60.0,
                        help="how long the cluster runs (default 60)")
    parser.add_argument("--sample-every", type=bounded_float(1, 24 * 3600), default=2.0,
                        help="seconds between held-out evaluations of every node's model (default 2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--offline", action="store_true",
                        help="the single-process pipeline instead: gossipfl train, then gossipfl eval")


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """The ``gossipfl demo`` command."""
    demo = sub.add_parser("demo", help="run a local cluster of daemons on loopback, watch them learn, plot it")
    add_arguments(demo)
    demo.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gossipfl.cli.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except GossipflError as exc:
        print(f"gossipfl demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before any daemon started (run() handles it once they have)
        print("gossipfl demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
