"""Time per training step of an MLP 64-128-10, batch 64, float32, against its baselines in one run.

    .venv/bin/python bench/train_step.py [--steps N] [--threads T]

Rows: gossipfl's training graph (forward, backward and SGD in one onnxruntime call, IOBinding);
the same gradient graph with the SGD step in numpy (the alternative design); a hand-written numpy
MLP; PyTorch CPU autograd with torch.optim.SGD (when torch is installed: pip install torch==2.13.0),
each with the same number of threads. Each figure is the median over repeats; ratios are against
gossipfl's row, measured in this same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from gossipfl.learning.autodiff import LABELS, build_gradient_graph
from gossipfl.learning.optim import OptimizerConfig
from gossipfl.learning.trainer import TrainConfig, Trainer, session_options
from gossipfl.learning.zoo import ArchSpec, build

BATCH, INPUTS, HIDDEN, CLASSES = 64, 64, 128, 10


def timed(step: Callable[[], object], steps: int, repeats: int = 7) -> float:
    for _ in range(max(steps // 10, 20)):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        samples.append((time.perf_counter() - start) / steps)
    return statistics.median(samples)


def gossipfl_step(x, y, threads: int) -> Callable[[], object]:
    model = build(ArchSpec("mlp", INPUTS, CLASSES, hidden=(HIDDEN,), seed=0))
    trainer = Trainer(model, TrainConfig(optimizer=OptimizerConfig("sgd", lr=0.01, momentum=0.0), threads=threads))
    return lambda: trainer.step(x, y)


def ort_numpy_sgd_step(x, y, threads: int) -> Callable[[], object]:
    model = build(ArchSpec("mlp", INPUTS, CLASSES, hidden=(HIDDEN,), seed=0))
    graph = build_gradient_graph(model)
    session = ort.InferenceSession(graph.proto.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [graph.grad_names[s.name] for s in model.specs]

    def step() -> None:
        grads = session.run(names, {model.input_name: x, LABELS: y, **model.views})
        for spec, g in zip(model.specs, grads, strict=True):
            model.views[spec.name] -= 0.01 * g

    return step


def numpy_step(x, y) -> Callable[[], object]:
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-0.1, 0.1, (INPUTS, HIDDEN)).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w2 = rng.uniform(-0.1, 0.1, (HIDDEN, CLASSES)).astype(np.float32)
    b2 = np.zeros(CLASSES, np.float32)
    onehot = np.eye(CLASSES, dtype=np.float32)[y]

    def step() -> None:
        h = x @ w1 + b1
        a = np.maximum(h, 0)
        z = a @ w2 + b2
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        dz = (p - onehot) / len(x)
        dw2, db2 = a.T @ dz, dz.sum(0)
        da = dz @ w2.T
        da[h <= 0] = 0
        dw1, db1 = x.T @ da, da.sum(0)
        for param, grad in ((w1, dw1), (b1, db1), (w2, dw2), (b2, db2)):
            param -= 0.01 * grad

    return step


def torch_step(x, y, threads: int) -> Callable[[], object] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(INPUTS, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(tx), ty)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, INPUTS)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int64)

    rows: list[tuple[str, float]] = [
        ("gossipfl: ORT, SGD in graph, IOBinding", timed(gossipfl_step(x, y, args.threads), args.steps)),
        ("ORT gradient graph, SGD in numpy", timed(ort_numpy_sgd_step(x, y, args.threads), args.steps)),
        ("hand-written numpy", timed(numpy_step(x, y), args.steps)),
    ]
    torch_fn = torch_step(x, y, args.threads)
    if torch_fn is not None:
        import torch
        rows.append((f"PyTorch {torch.__version__} CPU autograd", timed(torch_fn, args.steps)))
    ours = rows[0][1]
    print(f"MLP {INPUTS}-{HIDDEN}-{CLASSES}, batch {BATCH}, float32, {args.threads} thread(s), "
          f"median of 7 x {args.steps} steps; onnxruntime {ort.__version__}, numpy {np.__version__}")
    print(f"{'implementation':44} {'us/step':>9} {'vs gossipfl':>12}")
    for name, seconds in rows:
        print(f"{name:44} {seconds * 1e6:9.1f} {seconds / ours:11.2f}x")
    if torch_fn is None:
        print("PyTorch not installed: pip install torch==2.13.0 to add its row")


if __name__ == "__main__":
    main()
