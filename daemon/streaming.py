"""A sensor stream in the daemon: the MQTT source's windows scored by the model, verdicts published, and (for
anomaly models) the windows handed to the learner as training rows.

Each window is judged by the model as it is when the window arrives, before the node has trained on it: that
is the verdict a device would act on. For an anomaly model (an autoencoder) the score is the window's
reconstruction error, and the verdict compares it with this node's own threshold: the ``1 - anomaly_rate``
quantile of the scores the *current* model gives the last ``calibration_scores`` windows judged. The fleet
averages the autoencoder by gossip, so every node learns what normal looks like from all of them; each node's
threshold stays its own, because how well the shared model reconstructs one device's normal readings differs
from device to device. Scores kept from older models would not do: a merge with a peer that trained on other
machines can lift every score of this one for a while, and a threshold set by such a moment stayed far above
the faults that followed (a 40% vibration rise scored 0.09 against a stale threshold of 0.24 in the stream
test). So each batch is judged against the threshold of the model that scores it: whenever the model has
changed since the last calibration (a training slice, a merge), the recent windows are scored again in the
same call, under the same lock. Until ``warmup_scores`` windows are judged the verdict's ``anomaly`` is
``null``. The cost is a pass over ``calibration_scores`` windows per batch while the model is training (for the
test's 12-feature autoencoder, a few milliseconds); a node whose model has settled pays it no more.

Windows judged anomalies are not trained on. An autoencoder has capacity to spare, and one that trains on the
faults in its stream learns to reconstruct them: in the stream test, after a few minutes on rows of which 1%
were faults, a 40% vibration rise scored 0.002, as low as a normal window, where it had scored 0.09. A real
change of what is normal is still learned: the threshold is a quantile, so at most ``anomaly_rate`` of the
windows are ever left out, and as the model catches up with the new normal its windows score below it.

Classifiers and regressors are judged too (class and probabilities, or the value); a stream has no labels, so
only anomaly models train on it.

What survives a restart: the number of the last window judged and the numbers of the anomalies still
buffered (``stream.json`` beside the checkpoint, written atomically at every checkpoint), and the source's
row buffer (``stream-rows.bin``), written just before, so the number never runs ahead of the rows on disk.
Windows numbered at or below it are never judged again; the ones buffered but not judged are judged after the
restart. The threshold needs no state of its own: it is computed from the buffered windows and the
checkpointed model, which both resume.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import trio

from gossipfl.atomic import read_state_bytes, write_bytes_atomic
from gossipfl.errors import ConfigError, DataError
from gossipfl.learning.anomaly import anomaly_scores, calibrated_threshold, scoring_session
from gossipfl.learning.quality import class_probabilities, predicted_classes
from gossipfl.learning.reconstruction import ANOMALY
from gossipfl.metrics import Counters
from gossipfl.streams.buffer import Row
from gossipfl.streams.homeassistant import ONLINE, Discovery
from gossipfl.streams.settings import StreamSettings

from .learner import Learner
from .logs import fields
from .mqtt import MqttSource

log = logging.getLogger("gossipfld.streaming")

ROWS_FILE = "stream-rows.bin"
STATE_FILE = "stream.json"
STATE_VERSION = 1
MAX_STATE_BYTES = 64 * 1024 * 1024
BATCH = 512  # windows judged in one worker-thread call
TRAIN_EVERY = 2.0  # seconds between handing the buffer's rows to the learner
VALIDATION_SHARE = 0.1  # of a stream's rows, kept for validation (the pace's evidence), chosen by row number
MAX_FLAGGED = 10_000_000  # as many as the buffer can hold rows


def held_for_validation(seqs: np.ndarray) -> np.ndarray:
    """Whether each row (by its number) is a validation row: fixed per row, so a row never changes sides as
    the buffer moves (Knuth's multiplicative hash spreads consecutive numbers evenly)."""
    mixed = (seqs.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return mixed < np.uint64(int(VALIDATION_SHARE * 2**32))


class StreamFeed:
    def __init__(self, settings: StreamSettings, learner: Learner, counters: Counters, state_dir: Path,
                 node_name: str) -> None:
        self.settings, self.learner, self.counters = settings, learner, counters
        self.state_file = state_dir / STATE_FILE
        self.source = MqttSource(settings, counters, state_file=state_dir / ROWS_FILE)
        model = learner.model
        if model.schema is not None:
            try:
                self.columns = np.asarray(self.source.windower.spec.columns_for(model.schema))
            except DataError as exc:
                raise ConfigError(f"mqtt.window_features: {exc}; the model's schema and the windows must "
                                  "name the same columns") from None
        elif self.source.windower.spec.width == model.features_per_sample:
            self.columns = np.arange(model.features_per_sample)
        else:
            raise ConfigError(f"mqtt: the windows make {self.source.windower.spec.width} columns, the model "
                              f"takes {model.features_per_sample}")
        self.task = model.task
        self.trains = settings.train and self.task == ANOMALY
        self.threshold: float | None = None
        self._calibrated_on: tuple[float, float] | None = None  # (age, sum of parameters) of the model it was set by
        self.judged_through: int | None = -1  # the number of the last window judged; None: unknown (damaged state)
        self.flagged: set[int] = set()  # the numbers of buffered windows judged anomalies: not trained on
        self._session: ort.InferenceSession | None = None
        self.last: dict[str, Any] | None = None
        self.discovery = Discovery(settings.discovery_prefix, node_name, settings.result_topic, self.task) \
            if settings.discovery_prefix else None
        if self.discovery is not None:
            availability = self.discovery.availability_topic
            self.source.announce = [*self.discovery.messages(), (availability, ONLINE.encode())]
            self.source.will = (availability, b"offline")
        self.node_name = node_name
        self._load()

    # ------------------------------------------------------------------ state across restarts

    def _load(self) -> None:
        try:
            data = read_state_bytes(self.state_file, MAX_STATE_BYTES)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._damaged(str(exc))
            return
        try:
            state = json.loads(data)
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise DataError(f"version {state.get('version') if isinstance(state, dict) else None!r} "
                                f"is not {STATE_VERSION}")
            judged = state.get("judged_through")
            if isinstance(judged, bool) or not isinstance(judged, int) or not -1 <= judged < 2**63:
                raise DataError(f"judged_through {judged!r} must be a whole number >= -1")
            flagged = state.get("flagged")
            if not isinstance(flagged, list) or len(flagged) > MAX_FLAGGED or not all(
                    isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= judged for n in flagged):
                raise DataError(f"flagged must be a list of at most {MAX_FLAGGED} window numbers up to {judged}")
        except (ValueError, DataError) as exc:  # json's errors are ValueErrors
            self._damaged(str(exc))
            return
        self.judged_through, self.flagged = judged, set(flagged)
        log.info("stream: resuming after window %d", judged)

    def _damaged(self, problem: str) -> None:
        """An unreadable state: the windows buffered now are taken as judged (none is judged twice; those not yet
        judged are skipped, and counted), and the file is kept aside for a look, never silently overwritten."""
        self.judged_through = None
        self.counters.add("stream.state_damaged")
        aside = self.state_file.with_name(self.state_file.name + ".damaged")
        try:
            self.state_file.replace(aside)
        except OSError:
            aside = self.state_file
        log.error("stream: state unreadable; the buffered windows are taken as judged",
                  extra=fields(path=str(aside), error=problem[:200]))

    def save(self) -> None:
        """The buffer first, then the number of the last window judged: on disk the number never runs ahead
        of the rows (a crash in between judges a few windows twice at worst, never skips one)."""
        self.source.save()
        if self.judged_through is None:
            return  # not started since the state was found damaged: nothing known to write
        first = self.source.buffer.first_seq
        self.flagged = {n for n in self.flagged if n >= first}
        state = {"version": STATE_VERSION, "judged_through": self.judged_through, "flagged": sorted(self.flagged)}
        try:
            write_bytes_atomic(self.state_file, json.dumps(state).encode(), mode=0o600)
        except OSError as exc:
            log.error("stream: cannot save its state", extra=fields(path=str(self.state_file), error=str(exc)))

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Judge every window as it comes (the source must be running); hand rows to the learner."""
        source = self.source
        # A buffer older than the number (a crash between the two writes, or a removed file) starts where it is.
        self.judged_through = min(self.judged_through if self.judged_through is not None else 2**63,
                                  source.buffer.next_seq - 1)
        handed = -1
        last_handed = -math.inf
        while True:
            rows = source.rows_after(self.judged_through, BATCH)
            if rows:
                if rows[0].seq > self.judged_through + 1 and self.judged_through >= 0:
                    self.counters.add("stream.windows_missed", rows[0].seq - self.judged_through - 1)
                await self._judge(rows)
                self.judged_through = rows[-1].seq
            now = trio.current_time()
            if self.trains and source.buffer.next_seq - 1 != handed and now - last_handed >= TRAIN_EVERY:
                handed, last_handed = source.buffer.next_seq - 1, now
                self._hand_to_learner()
            if not rows:
                with trio.move_on_after(TRAIN_EVERY):
                    await source.wait_until(lambda: source.buffer.next_seq - 1 > self.judged_through)

    def _hand_to_learner(self) -> None:
        first = self.source.buffer.first_seq
        self.flagged = {n for n in self.flagged if n >= first}
        rows = [r for r in self.source.rows_after(-1) if r.seq not in self.flagged]
        if not rows:
            return
        x = np.asarray([r.values for r in rows], np.float32)[:, self.columns]
        self.learner.data.set_stream(x, held_for_validation(np.asarray([r.seq for r in rows])))

    async def _judge(self, rows: list[Row]) -> None:
        x = np.asarray([r.values for r in rows], np.float32)[:, self.columns]
        if self.task == ANOMALY:
            recent = self._recent()
            (scores, self.threshold), age = await self.learner.infer(lambda: self._scores(x, recent))
            verdicts = self._anomaly_verdicts(rows, scores)
        else:
            out, age = await self.learner.predict(x)
            verdicts = self._model_verdicts(rows, out.reshape(len(x), -1))
        self.counters.add("stream.windows_judged", len(rows))
        for verdict in verdicts:
            verdict["age"] = age
            payload = json.dumps(verdict).encode()
            if self.settings.result_topic:
                self.source.publish(self.settings.result_topic, payload, retain=True)
            if verdict.get("anomaly"):
                self.flagged.add(verdict["seq"])
                self.counters.add("stream.anomalies")
                if self.settings.alert_topic:
                    self.source.publish(self.settings.alert_topic, payload)
        self.last = verdicts[-1]

    def _recent(self) -> np.ndarray | None:
        """The last ``calibration_scores`` windows judged, or None while fewer than ``warmup_scores`` are."""
        s = self.settings
        rows = self.source.rows_after(max(self.judged_through - s.calibration_scores, -1))
        rows = [r for r in rows if r.seq <= self.judged_through]
        if len(rows) < s.warmup_scores:
            return None
        return np.asarray([r.values for r in rows], np.float32)[:, self.columns]

    def _scores(self, x: np.ndarray, recent: np.ndarray | None) -> tuple[np.ndarray, float | None]:
        """In a worker thread, under the learner's lock: the windows' scores, and the threshold the same model
        sets on the recent windows (None while too few, or when the model no longer scores them finitely)."""
        if self._session is None:  # parameters are fed per run: one session serves every merge and step
            self._session = scoring_session(self.learner.model)
        model = self.learner.model
        scores = anomaly_scores(model, x, self._session)
        if recent is None:
            return scores, None
        version = (self.learner.age, float(np.sum(model.params, dtype=np.float64)))
        if version == self._calibrated_on and self.threshold is not None:
            return scores, self.threshold
        self._calibrated_on = version
        reference = anomaly_scores(model, recent, self._session)
        reference = reference[np.isfinite(reference)]
        if len(reference) < self.settings.warmup_scores:
            return scores, None
        return scores, calibrated_threshold(reference, self.settings.anomaly_rate)

    def _anomaly_verdicts(self, rows: list[Row], scores: np.ndarray) -> list[dict[str, Any]]:
        finite = np.isfinite(scores)
        if not finite.all():  # a model that diverged: no verdict
            self.counters.add("stream.unscored", int((~finite).sum()))
        threshold = self.threshold
        return [{"node": self.node_name, "seq": row.seq, "time": row.time, "score": score if ok else None,
                 "threshold": threshold, "anomaly": None if threshold is None or not ok else score > threshold}
                for row, score, ok in zip(rows, scores.tolist(), finite.tolist(), strict=True)]

    def _model_verdicts(self, rows: list[Row], out: np.ndarray) -> list[dict[str, Any]]:
        model = self.learner.model
        verdicts = []
        if self.task == "classification":
            labels = predicted_classes(out).tolist()
            probabilities = class_probabilities(out).tolist()
            names = list(model.schema.classes) if model.schema and model.schema.classes else None
            for row, label, p in zip(rows, labels, probabilities, strict=True):
                verdicts.append({"node": self.node_name, "seq": row.seq, "time": row.time,
                                 "class": names[label] if names else label,
                                 "probabilities": dict(zip(names, p, strict=True)) if names else p})
        else:
            for row, value in zip(rows, out.tolist(), strict=True):
                verdicts.append({"node": self.node_name, "seq": row.seq, "time": row.time,
                                 "value": value[0] if len(value) == 1 else value})
        return verdicts

    def status(self) -> dict[str, Any]:
        return {**self.source.status(), "task": self.task, "trains": self.trains,
                "judged_through": self.judged_through, "threshold": self.threshold, "last": self.last}
