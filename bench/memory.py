"""Resident memory of a node, stage by stage, and of a real ``gossipfld`` daemon, in one run.

    .venv/bin/python bench/memory.py [--daemon-seconds 20] [--steps 200] [--no-daemon]

Each stage runs in a fresh interpreter that does everything the stages before it did and then its own
step, so every row is an independent measurement of a process that has got that far; the first row
(python + numpy) is the baseline measured in the same run, and the other rows are shown against it
("vs base") and against the row before ("step"). Columns: VmRSS from /proc/self/status, PSS and USS
(private clean + private dirty) from /proc/self/smaps_rollup, and the number of threads. RSS is the
figure the memory goal is stated in. PSS divides each shared page among the processes that map it, so
it drops while other Python processes using the same libraries run (it varies from run to run on a
busy machine); USS is what only this process holds, about what one more daemon would add.

The model is the default digits MLP 64-128-10, trained as the daemon trains it (SGD with momentum,
batch 32, one thread); the delta is coded as the daemon codes it (int8, blocks of 256, one blosc2 thread).

Then one real ``gossipfld`` process is started through ``gossipfl.testing.cluster`` (a throwaway CA, certificate,
config and digits shard; mDNS off, no peers), left to train for ``--daemon-seconds``, and its VmRSS,
PSS and USS are read from /proc while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HIDDEN = 128
SLICE = 10  # training steps per slice, as the daemon's training.slice_steps default


def memory(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, PSS and USS in MB, and the thread count, of a process."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss"] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out["threads"] = int(value)
    private = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            out["pss"] = int(value.split()[0]) / 1024
        elif key in ("Private_Clean", "Private_Dirty"):
            private += int(value.split()[0])
    out["uss"] = private / 1024
    return out


# ------------------------------------------------------------------------------------------ stages
# Each function is one stage; a stage's process runs every function up to and including its own.
# Imports are inside the functions so that a stage pays only for what it has reached.


def _numpy(ctx: dict) -> None:
    import numpy  # noqa: F401


def _trio(ctx: dict) -> None:
    import trio  # noqa: F401


def _zeroconf(ctx: dict) -> None:
    import zeroconf  # noqa: F401


def _onnx(ctx: dict) -> None:
    import onnx  # noqa: F401


def _onnxruntime(ctx: dict) -> None:
    import onnxruntime  # noqa: F401


def _blosc2(ctx: dict) -> None:
    # What the codec loads: the C library through gossipfl.protocol._blosc where that module exists (it falls
    # back to python-blosc2 itself when the library is unusable), python-blosc2 in older trees.
    import importlib.util

    import gossipfl.protocol

    spec = importlib.util.find_spec("gossipfl.protocol._blosc")
    if spec is not None and spec.origin and Path(spec.origin).parent == Path(gossipfl.protocol.__file__).parent:
        from gossipfl.protocol import _blosc

        ctx["notes"].append(f"blosc2 layer: {_blosc.BACKEND.name}")
    else:
        import blosc2

        ctx["notes"].append(f"blosc2 layer: python-blosc2 {blosc2.__version__}")


def _gossipfl(ctx: dict) -> None:
    import gossipfl.cli.tls
    import gossipfl.identity.node
    import gossipfl.learning.checkpoint
    import gossipfl.learning.data
    import gossipfl.learning.trainer
    import gossipfl.protocol.codec
    import gossipfl.protocol.framing
    import gossipfl.protocol.messages  # noqa: F401

    try:  # the daemon's own modules; tolerated missing while the daemon is being edited
        import gossipfld.app  # noqa: F401
    except ImportError as exc:
        ctx["notes"].append(f"gossipfld.app not importable: {exc}")
    if "cryptography" in sys.modules:  # gossipfl.cli.certs needs it, the daemon must not (about 11 MB)
        ctx["notes"].append("cryptography got imported by the daemon's modules")


def _model(ctx: dict) -> None:
    from gossipfl.learning.model import Model

    ctx["model"] = Model.load(Path(ctx["workdir"]) / "model.onnx")


def _trainer(ctx: dict) -> None:
    from gossipfl.learning.optim import OptimizerConfig
    from gossipfl.learning.trainer import TrainConfig, Trainer

    ctx["trainer"] = Trainer(ctx["model"], TrainConfig(
        optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.9), batch_size=32, seed=0, threads=1))


def _train(ctx: dict) -> None:
    import numpy as np

    x, y = np.load(Path(ctx["workdir"]) / "x.npy"), np.load(Path(ctx["workdir"]) / "y.npy")
    cut = len(x) * 4 // 5
    ctx["train"], ctx["validation"] = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    for _ in range(ctx["steps"] // SLICE):
        ctx["trainer"].train_steps(*ctx["train"], SLICE)


def _evaluate(ctx: dict) -> None:
    ctx["trainer"].evaluate(*ctx["validation"])


def _codec(ctx: dict) -> None:
    import numpy as np

    from gossipfl.protocol.codec import CodecConfig
    from gossipfl.protocol.feedback import Reference

    config = CodecConfig(scheme="int8", int8_block=256, nthreads=1)  # as the daemon's
    params = ctx["model"].params
    sender, receiver = Reference(params.size), Reference(params.size)
    for _ in range(5):
        ctx["trainer"].train_steps(*ctx["train"], SLICE)
        payload = sender.encode_towards(params, config)
        receiver.apply(payload)
    assert np.array_equal(sender.values, receiver.values)


STAGES = [
    ("python + numpy (baseline)", _numpy),
    ("+ trio", _trio),
    ("+ zeroconf", _zeroconf),
    ("+ onnx", _onnx),
    ("+ onnxruntime", _onnxruntime),
    ("+ blosc2 (as the codec loads it)", _blosc2),
    ("+ gossipfl, gossipfld modules", _gossipfl),
    ("+ model loaded", _model),
    ("+ trainer sessions built", _trainer),
    ("+ training steps", _train),
    ("+ evaluation", _evaluate),
    ("+ delta encode/decode", _codec),
]


def run_stage(index: int, workdir: str, steps: int) -> None:
    ctx: dict = {"workdir": workdir, "steps": steps, "notes": []}
    for _, stage in STAGES[: index + 1]:
        stage(ctx)
    import gc

    gc.collect()
    result = memory()
    result["notes"] = ctx["notes"]  # type: ignore[assignment]
    print(json.dumps(result))


def measure_stage(index: int, workdir: Path, steps: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--stage", str(index), "--workdir", str(workdir),
                           "--steps", str(steps)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"stage {STAGES[index][0]!r} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ daemon


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_daemon(root: Path, x, y, seconds: float) -> dict[str, float]:
    from gossipfl.learning.checkpoint import load_checkpoint
    from gossipfl.testing.cluster import Cluster, ClusterPlan, prepare

    plan = ClusterPlan(nodes=1, hidden=(HIDDEN,), mdns=False, static_peers=False, base_port=free_port(),
                       extra={"state": {"checkpoint_seconds": 2.0}})
    (spec,) = prepare(root / "cluster", plan, x, y)
    samples: list[dict[str, float]] = []
    with Cluster([spec]) as cluster:
        if not cluster.wait_for_log(spec, "node started", 60):
            raise SystemExit("gossipfld did not start:\n" + "\n".join(cluster.log_lines(spec)[-20:]))
        pid = cluster.procs[spec.name].pid
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            time.sleep(1.0)
            if not cluster.running(spec):
                raise SystemExit("gossipfld exited:\n" + "\n".join(cluster.log_lines(spec)[-20:]))
            samples.append(memory(pid))
        codes = cluster.stop_all()
    _, state = load_checkpoint(spec.checkpoint)
    last = samples[-1]
    return {**last, "max_rss": max(s["rss"] for s in samples), "steps": state["counters"].get("train_steps", 0),
            "exit": codes.get(spec.name)}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps in the training stage")
    parser.add_argument("--daemon-seconds", type=float, default=20.0)
    parser.add_argument("--no-daemon", action="store_true", help="skip the real gossipfld process")
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage is not None:
        run_stage(args.stage, args.workdir, args.steps)
        return

    import numpy as np

    from gossipfl.learning.datasets import load_digits
    from gossipfl.learning.zoo import ArchSpec, build

    x, y = load_digits()
    with tempfile.TemporaryDirectory(prefix="gossipfl-memory-") as tmp:
        root = Path(tmp)
        np.save(root / "x.npy", x)
        np.save(root / "y.npy", y)
        build(ArchSpec("mlp", x.shape[1], int(y.max()) + 1, hidden=(HIDDEN,), seed=0)).save(root / "model.onnx")

        print(f"python {sys.version.split()[0]}, pid per stage, MLP 64-{HIDDEN}-10, {args.steps} training steps")
        print(f"{'stage':<34} {'RSS MB':>7} {'vs base':>8} {'step':>7} {'PSS MB':>7} {'USS MB':>7} {'thr':>4}")
        base = prev = None
        notes = []
        for index, (name, _) in enumerate(STAGES):
            m = measure_stage(index, root, args.steps)
            base = base or m
            prev = prev or m
            label = name.replace("training steps", f"{args.steps} training steps")
            print(f"{label:<34} {m['rss']:7.1f} {m['rss'] - base['rss']:+8.1f} {m['rss'] - prev['rss']:+7.1f} "
                  f"{m['pss']:7.1f} {m['uss']:7.1f} {int(m['threads']):4d}")
            notes += [n for n in m["notes"] if n not in notes]
            prev = m
        uncompiled = [name for name in ("gossipfl", "daemon") if not any((REPO / name / "__pycache__").glob("*.pyc"))]
        if sys.dont_write_bytecode and uncompiled:
            notes.append(f"PYTHONDONTWRITEBYTECODE is set and {', '.join(uncompiled)} has no cached .pyc: its modules "
                         "are compiled at every start, which costs a few MB of RSS (`make bytecode` writes them)")
        for note in notes:
            print(f"note: {note}")

        if not args.no_daemon:
            d = measure_daemon(root, x, y, args.daemon_seconds)
            print(f"gossipfld (1 node, mDNS off, no peers) after {args.daemon_seconds:.0f}s, "
                  f"{d['steps']:.0f} training steps: VmRSS {d['rss']:.1f} MB (max {d['max_rss']:.1f}), "
                  f"PSS {d['pss']:.1f} MB, USS {d['uss']:.1f} MB, {int(d['threads'])} threads, "
                  f"{d['rss'] - base['rss']:+.1f} MB vs baseline; exit code {d['exit']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
