"""Synthetic machines for the stream tests and the docs: three channels driven by a shared load, a normal level
of their own per machine, and faults injected into chosen windows.

Each machine runs a load cycle (a sine of period ``CYCLE`` steps) that moves its temperature, current and
vibration together, around levels that differ from machine to machine (machine 2 runs hotter and shakes more
than machine 0). A fault is a worn bearing: for one window, vibration is ``FAULT_FACTOR`` times its normal
value (40% more) while temperature and current stay normal. That reading is not out of range for the fleet
(machine 0's faulty vibration is machine 1's normal level): only the combination with its own temperature and
current gives it away, which is what an autoencoder learned on the whole fleet has to catch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

CHANNELS = ("temp", "vib", "cur")
CYCLE = 40  # steps per load cycle
FAULT_FACTOR = 1.4
EPOCH = 1_700_000_000.0  # the sensors' clock starts here (seconds)
STEP_SECONDS = 0.1


@dataclass(frozen=True)
class Machine:
    index: int
    seed: int = 0

    @property
    def levels(self) -> tuple[float, float, float]:
        return 40.0 + 8.0 * self.index, 1.0 + 0.4 * self.index, 5.0 + 2.0 * self.index

    def steps(self, first: int, count: int, faulty_steps: Iterable[int] = ()) -> Iterator[dict[str, float]]:
        """Readings ``first`` .. ``first + count - 1`` (each with its sensor time ``ts``), the same for the same
        step numbers whenever they are asked for; the steps in ``faulty_steps`` carry the fault."""
        faulty = set(faulty_steps)
        temp, vib, cur = self.levels
        for step in range(first, first + count):
            rng = np.random.default_rng([self.seed, self.index, step])
            noise = rng.normal(size=3)
            load = math.sin(2 * math.pi * step / CYCLE)
            value = {"temp": temp + 1.5 * load + 0.15 * noise[0],
                     "vib": vib * (1 + 0.25 * load) + 0.03 * noise[1],
                     "cur": cur + 1.0 * load + 0.08 * noise[2]}
            if step in faulty:
                value["vib"] *= FAULT_FACTOR
            yield {**{k: round(v, 4) for k, v in value.items()}, "ts": EPOCH + step * STEP_SECONDS}

    def payloads(self, first: int, count: int, faulty_steps: Iterable[int] = ()) -> list[bytes]:
        """The steps as the JSON objects a sensor would publish."""
        return [json.dumps(s).encode() for s in self.steps(first, count, faulty_steps)]

    def windows(self, first_window: int, count: int, length: int) -> np.ndarray:
        """Disjoint windows of raw readings, as the stream makes them (channel-major: temp_0..temp_{n-1},
        vib_0.., cur_0..): the rows an operator would record to make the model's schema and scaling."""
        steps = list(self.steps(first_window * length, count * length))
        values = np.array([[s[c] for c in CHANNELS] for s in steps], np.float64).reshape(count, length, 3)
        return values.transpose(0, 2, 1).reshape(count, 3 * length)


def window_columns(length: int) -> list[str]:
    return [f"{c}_{i}" for c in CHANNELS for i in range(length)]


def fault_steps(windows: Iterable[int], length: int) -> list[int]:
    """Every step of the given (disjoint) windows."""
    return [w * length + i for w in windows for i in range(length)]
