"""``make demo``: the whole offline pipeline on the bundled digits data, end to end.

It writes a held-out test set and a training directory, creates an MLP from the zoo, trains it with
``gossipfl train`` and scores it with ``gossipfl eval``, exactly as an operator would by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gossipfl import cli
from gossipfl.datasets import load_digits, train_test_split, write_csv


def main(out: str = "demo-out") -> int:
    root = Path(out)
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
        code = cli.main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
