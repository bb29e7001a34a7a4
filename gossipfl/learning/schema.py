"""The data schema a model carries: which columns are its features, in order, which one is the label, and
the names of its classes.

An operator with a CSV of sensor readings should never count columns: ``gossipfl model init --data DIR``
reads the schema off the data and writes it into the model's metadata, and from then on every data file is
read by column name against it (order does not matter, other columns are ignored, a missing feature names
itself). Class names are strings as they appear in the label column ("normal", "faulty", or "3"); a
model's output column ``i`` is class ``classes[i]``. The schema travels with the model to every node and
into every checkpoint, so the whole fleet reads its files alike.

The metadata is input from outside (a model file): it is parsed with bounds and refused with a
``ModelError`` that says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from gossipfl.errors import ModelError

SCHEMA_KEY = "gossipfl.schema"
DELIMITERS = (",", ";", "\t")  # what a data file's fields may be separated by
MAX_NAME = 256
MAX_COLUMNS = 100_000
MAX_CLASSES = 100_000


def _names(value: object, what: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"schema: {what} must be a list of strings")
    if len(value) > limit:
        raise ModelError(f"schema: {len(value)} {what}, over the limit of {limit}")
    names = tuple(v.strip() for v in value)
    if any(not n or len(n) > MAX_NAME for n in names):
        raise ModelError(f"schema: every name in {what} must be 1 to {MAX_NAME} characters")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ModelError(f"schema: {what} name {twice[0]!r} appears twice")
    return names


@dataclass(frozen=True)
class Schema:
    features: tuple[str, ...]
    label: str = "label"
    classes: tuple[str, ...] | None = None  # for classifiers: output column i is class classes[i]

    def __post_init__(self) -> None:
        if self.label in self.features:
            raise ModelError(f"schema: the label column {self.label!r} is also a feature")

    def to_json(self) -> str:
        body: dict[str, object] = {"features": list(self.features), "label": self.label}
        if self.classes is not None:
            body["classes"] = list(self.classes)
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Schema:
        if len(text) > 64 * MAX_COLUMNS:
            raise ModelError("schema: metadata too long")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ModelError(f"schema: not JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ModelError("schema: must be a JSON object")
        label = body.get("label", "label")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_NAME:
            raise ModelError("schema: label must be a column name")
        classes = body.get("classes")
        return cls(_names(body.get("features"), "features", MAX_COLUMNS), label.strip(),
                   None if classes is None else _names(classes, "classes", MAX_CLASSES))

    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes or ())}


def choose_features(header: Sequence[str], label: str, include: Sequence[str] | None = None,
                    exclude: Sequence[str] = (), require_label: bool = True) -> tuple[str, ...]:
    """The feature columns of ``header``: ``include`` as given (each must exist), else every column but the
    label and ``exclude`` (each of which must exist, so a typo is not silently a feature). Without
    ``require_label`` (an anomaly model's unlabelled data) the label column may be absent, and is still never
    a feature when it is there."""
    present = [h.strip() for h in header]
    if label not in present and require_label:
        raise ModelError(f"no label column {label!r} in the data (columns: {', '.join(present)})")
    for name in [*(include or ()), *exclude]:
        if name not in present:
            raise ModelError(f"no column {name!r} in the data (columns: {', '.join(present)})")
    if include:
        if label in include:
            raise ModelError(f"the label column {label!r} cannot be a feature")
        return tuple(include)
    features = tuple(h for h in present if h != label and h not in exclude)
    if not features:
        raise ModelError("no feature columns left")
    return features


def class_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Class names in a stable order: numerically when every label is a whole number (so "0".."9" keep
    their digits' order), else alphabetically."""
    unique = sorted(set(labels))
    try:
        numbers = [float(v) for v in unique]
    except ValueError:
        return tuple(unique)
    if all(n == int(n) for n in numbers):
        return tuple(v for _, v in sorted(zip(numbers, unique, strict=True)))
    return tuple(unique)
