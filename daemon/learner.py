"""The learner: the one owner of the node's model, its age and its pause, with named operations.

Training (in a worker thread), merges, a gateway's global model and the control socket all touch the same
parameters. They do it only through this class, under its one lock, so a merge never lands in the middle
of a training slice and nobody else writes ``model.params`` or ``age``. A slice is short, so a merge waits
at most one slice; coding, decoding and training run in worker threads, so the event loop stays free.

Operations: ``snapshot`` (a copy to send), ``merge`` (average a peer's model in by age), ``adopt`` (a
gateway's global model, never one younger than ours), ``apply_update`` (a gateway's aggregate),
``train_slice`` (free-running gossip learning), ``train_from`` (a round's local epochs, leaving the model
as it was), ``evaluate``, ``predict``, ``export``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import trio

from gossipfl.config import TrainingSection
from gossipfl.errors import GossipflError
from gossipfl.learning.data import BySource, LocalData, Table
from gossipfl.learning.merge import MAX_AGE, age_weighted_merge, clipped_merge
from gossipfl.learning.model import Model
from gossipfl.learning.robust import MergeGuard
from gossipfl.learning.trainer import Metrics, Trainer
from gossipfl.metrics import Counters

from .logs import fields
from .pacing import Pacer
from .power import PowerWatch
from .privacy import PrivateTraining

T = TypeVar("T")

log = logging.getLogger("gossipfld.learner")

EVAL_EVERY = 5.0  # seconds between validation runs
CHECK_ROWS = 256  # rows a gateway's global model is judged on
EXPLODED = 100.0  # a slice's loss this many times the recent median has diverged


@dataclass(frozen=True)
class BeforeMerge:
    """The model (when kept) and age as they were just before a merge: what the pusher's pull gets."""

    params: np.ndarray | None
    age: float
    weight_remote: float


class Learner:
    def __init__(self, model: Model, trainer: Trainer, data: LocalData, settings: TrainingSection,
                 counters: Counters, pacer: Pacer, age: float = 0.0, paused: bool = False,
                 guard: MergeGuard | None = None, private: PrivateTraining | None = None,
                 power: PowerWatch | None = None) -> None:
        self.model = model
        self.trainer = trainer
        self.data = data
        self.settings = settings
        self.counters = counters
        self._age = age
        self._paused = paused
        self.lock = trio.Lock()
        self.guard = guard  # None: the plain age-weighted merge; else the clipped rule and what it remembers
        self.pacer = pacer  # how fast to train: slower once the model stopped changing (gossipfl.protocol.pace)
        self.private = private  # None: plain training; else DP-SGD within a budget (docs/privacy.md)
        self.power = power  # None: train whatever the battery and temperature; else only when they allow
        self.validation: Metrics | None = None
        self.train_loss: float | None = None
        self.training_active = False
        self.round_training = False
        self._last_eval = -math.inf
        # The last state known to be finite (loaded at start, refreshed at every checkpoint): where a model
        # that training or a merge turned to NaN or infinity rolls back to, instead of being kept or saved.
        self._good: tuple[np.ndarray, float] = (model.params.copy(), age)
        self._recent_losses: deque[float] = deque(maxlen=20)  # of training slices: what "exploded" is against
        self._subset: tuple[BySource, tuple[str, ...], Table] | None = None  # the last rows of some files only

    @property
    def age(self) -> float:
        """Samples the model has learned from: the weight of its merges."""
        return self._age

    @property
    def paused(self) -> bool:
        return self._paused

    def set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            log.info("paused" if paused else "resumed")
        self._paused = paused

    # ------------------------------------------------------------------ the model, shared

    def _keep_finite(self, what: str) -> None:
        """After ``what`` changed the model (the caller holds the lock): a model that is no longer finite is
        never kept, shared or saved; it goes back to the last good state, and the log says why."""
        if np.isfinite(self.model.params).all():
            return
        params, age = self._good
        self.model.set_params(params)
        self._age = age
        self.trainer.reset_optimizer()  # its momentum holds the same infinities
        self.counters.add("rollbacks")
        log.error("the model stopped being finite; rolled back to the last good state (a learning rate too "
                  "high for the data's scale?)", extra=fields(after=what, age=age))

    def _diverged(self) -> bool:
        """The slice's loss is not finite, or exploded past ``EXPLODED`` times the median of recent slices.
        Under DP only a model that is not finite: the loss is computed from the raw rows, and a rollback
        decided on it would be a release that the privacy mechanism does not cover."""
        if self.private is not None:
            return not np.isfinite(self.model.params).all()
        loss = self.train_loss
        if loss is None or not math.isfinite(loss) or not np.isfinite(self.model.params).all():
            return True
        recent = self._recent_losses
        return len(recent) >= 5 and loss > EXPLODED * max(float(np.median(recent)), 1e-6)

    def _undo_slice(self, before: np.ndarray) -> None:
        """Put the model back as it was before the slice, with a lower step size, and say so: on data it was
        not tuned for, the default step once turned a node's model to NaN for good."""
        self.model.set_params(before)
        self.trainer.reset_optimizer()
        lowered = self.trainer.lower_lr()
        self._recent_losses.clear()
        self.counters.add("divergences")
        log.warning("training diverged; the slice was undone" + (" and the step size lowered" if lowered else ""),
                    extra=fields(loss=self.train_loss, lr=self.trainer.lr))

    def mark_good(self, params: np.ndarray, age: float) -> None:
        """A finite state just checkpointed: the one to roll back to."""
        self._good = (params, age)

    async def snapshot(self) -> tuple[np.ndarray, float]:
        """A copy of the parameters and the age that belongs to them."""
        async with self.lock:
            return self.model.params.copy(), self._age

    async def export(self) -> tuple[Model, float]:
        async with self.lock:
            return self.model.copy(), self._age

    async def judge_pace(self) -> None:
        """Let the pace judge its window, with a copy of the model to measure how far it moved."""
        if self.pacer.due():
            params, _ = await self.snapshot()
            self.pacer.tick(params)

    async def merge(self, peer: bytes, remote: np.ndarray, remote_age: float, *, keep_before: bool) -> BeforeMerge:
        """Merge ``peer``'s model into ours (by age, or clipped: see ``gossipfl.learning.robust``); returns ours
        as it was (the params with ``keep_before``, so merges that no pull can follow copy nothing)."""
        async with self.lock:
            before = self.model.params.copy() if keep_before else None
            age = self._age
            own = float(np.linalg.norm(self.model.params))
            self.pacer.peer_distance(float(np.linalg.norm(remote - self.model.params)) / max(own, 1e-12))
            if self.guard is None:
                merged = age_weighted_merge(self.model.params, age, remote, remote_age)
            else:
                believed = self.guard.believed_age(peer, remote_age, age, trio.current_time())
                radius = self.guard.radius(float(np.linalg.norm(self.model.params)))
                merged = clipped_merge(self.model.params, age, remote, believed, max_share=self.guard.share(peer),
                                       radius=radius)
                self.guard.record(peer, merged, radius)
                if merged.clipped:
                    self.counters.add("merges_clipped")
            self._age = merged.age
            self._keep_finite("a merge")
        self.counters.add("merges")
        return BeforeMerge(before, age, merged.weight_remote)

    async def adopt(self, params: np.ndarray, age: float) -> bool:
        """Take a gateway's global model, unless ours has learned more (gossip while it was away)."""
        async with self.lock:
            if age < self._age:
                self.counters.add("fedavg.kept_newer")
                return False
            self.model.set_params(params)
            self._age = min(age, MAX_AGE)  # a gateway's claim, believed no further than any peer's
        self.counters.add("fedavg.adopted")
        return True

    async def apply_update(self, delta: np.ndarray, ages: list[float]) -> tuple[np.ndarray, float]:
        """A gateway's aggregate: move by ``delta``; the age is the oldest of ours and the contributors'."""
        async with self.lock:
            self.model.params += delta
            self._age = max([self._age, *ages])
            self._keep_finite("a round's aggregate")
            return self.model.params.copy(), self._age

    # ------------------------------------------------------------------ training

    def _pause_after(self, busy: float) -> float:
        """Sleep after ``busy`` seconds of training, so training takes the pace's duty cycle of the wall time
        (``training.duty_cycle`` at full speed, less once the node is quiet)."""
        duty = self.pacer.duty_cycle
        return max(busy * (1 - duty) / duty, 0.001)

    async def may_train(self, steps: int) -> bool:
        """Whether ``steps`` steps on the local rows may run now (see ``rows_to_train``)."""
        return await self.rows_to_train(steps) is not None

    async def rows_to_train(self, steps: int) -> Table | None:
        """The rows ``steps`` steps may train on now, or None: when the device's power allows (``[power]``),
        and under DP within the budget, the ledger on disk counting them before they run. Under DP these are
        the rows the reservation paid for (with per-file budgets, of the files that could pay), read once:
        rows that a rescan adds meanwhile wait for a reservation of their own."""
        if self.power is not None and not self.power.allowed:
            return None  # the device's power or temperature (gossipfld.power); gossip and merges go on
        if self.private is None:
            return self.data.train
        view = self.data.train_by_source
        if len(view.table) == 0:
            return None
        try:
            noise = self.private.plan(len(view.table), self.settings.batch_size)
        except GossipflError as exc:
            if not self.private.stopped:
                log.error("no private training: the privacy budget cannot be met", extra=fields(error=str(exc)))
            self.private.stopped = True
            return None
        self.trainer.set_noise(noise)
        names = await self.private.reserve(view.rows(), self.settings.batch_size, steps)
        if not names:
            return None
        if self._subset is None or self._subset[0] is not view or self._subset[1] != names:
            self._subset = (view, names, view.of(names))  # a copy when some files are left out: made once
        return self._subset[2]

    async def _slice(self, steps: int, train: Table) -> int:
        """One slice on ``train`` in a worker thread; the caller holds the lock. Returns the samples seen."""
        loss, samples = await trio.to_thread.run_sync(self.trainer.train_steps, train.x, train.y, steps)
        self.train_loss = loss if math.isfinite(loss) or self.private is None else self.train_loss
        self.counters.add("train_steps", steps)
        self.counters.add("train_samples", samples)
        return samples

    async def run(self, learns_by_gossip: Callable[[], bool]) -> None:
        """Free-running local training while gossip drives learning; rounds train through ``train_from``."""
        t = self.settings
        while True:
            if trio.current_time() - self._last_eval > EVAL_EVERY:  # a few rows: cheap, and the pace's evidence
                await self.evaluate()
            if not t.enabled or self._paused or len(self.data.train) == 0 or not learns_by_gossip():
                self.training_active = self.round_training
                await trio.sleep(0.5)
                continue
            train = await self.rows_to_train(t.slice_steps)
            if train is None or len(train) == 0:
                self.training_active = self.round_training
                await trio.sleep(0.5)
                continue
            self.training_active = True
            start = trio.current_time()
            async with self.lock:
                before = self.model.params.copy()
                samples = await self._slice(t.slice_steps, train)
                if self._diverged():
                    self._undo_slice(before)
                else:
                    self._age += samples
                    self._recent_losses.append(self.train_loss or 0.0)
                    if self.train_loss is not None and self.private is None:
                        # The pace judges the training loss: averaged over a window it covers thousands of
                        # rows, where the validation loss of a few dozen rows jumps 25-90% between windows and
                        # rises while the accuracy still improves (bench/idle.py's loss-change column).
                        self.pacer.loss(self.train_loss)
            pause = self._pause_after(trio.current_time() - start)
            if self.private is not None:
                # A budget is a fixed number of steps. Spent flat out it is gone in seconds, before any merge: each
                # node's noisy model is then learned alone and only averaged afterwards, which measured worse than
                # training alone (bench/privacy.py). One slice per gossip period lets merges interleave with it.
                pause = max(pause, self.pacer.period)
            await self.pacer.sleep(pause)

    async def train_from(self, start: np.ndarray | None, epochs: int) -> tuple[np.ndarray, int]:
        """``epochs`` of local training from ``start`` (None: from our own model), for a FedAvg round.

        Returns the trained parameters and the samples seen, and leaves the model as it was: a client keeps
        the global model between rounds, a gateway its aggregate. The lock is held for the whole run, pauses
        included, so no merge lands in the middle of a round's training."""
        t = self.settings
        steps = math.ceil(len(self.data.train) / t.batch_size) * epochs
        train = await self.rows_to_train(steps) if t.enabled and len(self.data.train) else None
        if train is None or len(train) == 0:
            async with self.lock:
                return (self.model.params.copy() if start is None else start.copy()), 0
        samples = 0
        async with self.lock:
            saved = self.model.params.copy()
            self.round_training = True
            try:
                if start is not None:
                    self.model.set_params(start)
                self.trainer.reset_optimizer()
                done = 0
                while done < steps:
                    began = trio.current_time()
                    count = min(t.slice_steps, steps - done)
                    samples += await self._slice(count, train)
                    done += count
                    await trio.sleep(self._pause_after(trio.current_time() - began))
                if not np.isfinite(self.model.params).all():
                    self.counters.add("rollbacks")
                    log.error("a round's training stopped being finite; the update is not sent")
                    trained, samples = saved.copy(), 0
                else:
                    trained = self.model.params.copy()
            finally:
                self.model.set_params(saved)
                self.round_training = False
        return trained, samples

    async def evaluate(self) -> Metrics | None:
        self._last_eval = trio.current_time()
        validation = self.data.validation
        if len(validation) == 0:
            return None
        async with self.lock:
            self.validation = await trio.to_thread.run_sync(self.trainer.evaluate, validation.x, validation.y)
        # Under DP the pace hears nothing computed from rows: its timing is visible to peers, and a loss is not
        # covered by the privacy mechanism (docs/privacy.md). Peers' distances, from private models, still count.
        if self.private is None and self.validation.accuracy is not None:
            self.pacer.accuracy(self.validation.accuracy)
        return self.validation

    async def infer(self, function: Callable[[], T]) -> tuple[T, float]:
        """``function()``, which reads the model, in a worker thread while no training or merge changes it; with
        the age of the model it read."""
        async with self.lock:
            return await trio.to_thread.run_sync(function), self._age

    async def losses(self, candidates: list[np.ndarray]) -> list[float] | None:
        """Each candidate parameter vector's loss on (up to ``CHECK_ROWS`` of) this node's training rows: how a
        client judges a gateway's global model by what it knows. None without rows, and under DP, where a
        decision that read the rows would be a release the accountant does not count."""
        train = self.data.train
        if len(train) == 0 or self.private is not None:
            return None
        step = max(1, len(train) // CHECK_ROWS)  # the same rows for every candidate, spread over the data
        x, y = train.x[::step][:CHECK_ROWS], train.y[::step][:CHECK_ROWS]

        def run() -> list[float]:
            saved = self.model.params.copy()
            try:
                out = []
                for params in candidates:
                    self.model.set_params(params)
                    out.append(self.trainer.evaluate(x, y).loss)
                return out
            finally:
                self.model.set_params(saved)

        return (await self.infer(run))[0]

    async def predict(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        return await self.infer(functools.partial(self.trainer.predict, x))

    async def watch_data(self, rescan_seconds: float) -> None:
        """Pick up new data files as they appear; an unreadable directory is a warning, never fatal."""
        while True:
            await trio.sleep(rescan_seconds)
            try:
                loaded = await trio.to_thread.run_sync(self.data.refresh)
            except GossipflError as exc:
                log.warning("data directory unreadable", extra=fields(error=str(exc)))
                continue
            if loaded:
                log.info("new data", extra=fields(files=len(loaded), samples=len(self.data.train)))
                self.pacer.new_data(len(loaded))
