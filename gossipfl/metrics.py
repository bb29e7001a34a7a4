"""A node's status as Prometheus text exposition format (version 0.0.4).

Rendered from the same status dictionary that ``gossipfl status --json`` prints, so the two can never
disagree. The daemon's counters are named ``family.detail`` (``refused.fingerprint``); families with a
detail become one metric with a label (``gossipfl_refusals_total{reason="fingerprint"}``), which is
how Prometheus wants open-ended sets of reasons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counters:
    """A node's counters, ``family.detail`` named; every part of the daemon adds to the one instance."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, amount: float = 1) -> None:
        self.values[name] = self.values.get(name, 0) + amount


# counter family -> (metric name, label name)
_LABELLED = {
    "refused": ("gossipfl_refusals_total", "reason"),
    "failed": ("gossipfl_push_failures_total", "reason"),
    "dropped": ("gossipfl_inbound_drops_total", "reason"),
    "control": ("gossipfl_control_requests_total", "result"),
}
_DIRECTED = {
    "exchanges_in": ("gossipfl_exchanges_total", "in"),
    "exchanges_out": ("gossipfl_exchanges_total", "out"),
    "bytes_in": ("gossipfl_bytes_total", "in"),
    "bytes_out": ("gossipfl_bytes_total", "out"),
    "wire_in": ("gossipfl_wire_bytes_total", "in"),
    "wire_out": ("gossipfl_wire_bytes_total", "out"),
}
_HELP = {
    "gossipfl_refusals_total": "Connections and updates refused, by reason.",
    "gossipfl_push_failures_total": "Outgoing exchanges that failed, by reason.",
    "gossipfl_inbound_drops_total": "Inbound exchanges cut by a broken link, by error.",
    "gossipfl_control_requests_total": "Control-socket requests, by result.",
    "gossipfl_exchanges_total": "Completed model exchanges, by direction.",
    "gossipfl_bytes_total": "Protocol frame bytes on peer connections, by direction (before TLS).",
    "gossipfl_wire_bytes_total": "Bytes on the socket of peer connections, TLS and handshakes included, by direction.",
    "gossipfl_merges_total": "Remote models merged into the local one.",
    "gossipfl_train_steps_total": "Local training steps.",
    "gossipfl_train_samples_total": "Samples seen by local training.",
    "gossipfl_evictions_total": "Peers evicted after failed exchanges.",
    "gossipfl_checkpoints_total": "Checkpoints written.",
}
_GAUGES = (
    ("gossipfl_model_age", "age", "Samples the local model has learned from, merges included."),
    ("gossipfl_uptime_seconds", "uptime", "Seconds since the daemon started."),
    ("gossipfl_paused", "paused", "1 while an operator has paused training and gossip."),
    ("gossipfl_training", "training", "1 while local training runs."),
    ("gossipfl_peers_live", "peers", "Peers that are neither evicted nor blocked."),
    ("gossipfl_train_data_samples", "train_samples", "Local training samples."),
    ("gossipfl_train_loss", "train_loss", "Mean loss of the latest training slice."),
    ("gossipfl_loop_lag_max_seconds", "max_loop_lag", "Longest event-loop stall seen."),
    ("gossipfl_param_norm", "param_norm", "L2 norm of the model's parameters."),
)
_PRIVACY = (
    ("gossipfl_privacy_epsilon_spent", "epsilon_spent", "Epsilon the node's rows have spent (DP-SGD, RDP)."),
    ("gossipfl_privacy_epsilon_budget", "epsilon_budget", "The privacy budget (privacy.epsilon)."),
    ("gossipfl_privacy_steps", "steps", "Private training steps counted (reserved before they run)."),
    ("gossipfl_privacy_budget_spent", "budget_spent", "1 once training on the node's rows has stopped."),
    ("gossipfl_privacy_files_in_budget", "files_in_budget", "Data files still trained on (privacy.rows = "
                                                            "disjoint_files)."),
    ("gossipfl_privacy_files_out_of_budget", "files_out_of_budget", "Data files whose own budget is spent "
                                                                    "(privacy.rows = disjoint_files)."),
)
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _label_value(value: object) -> str:
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return None


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[dict[str, Any], Any]]) -> None:
    rendered = []
    for labels, value in samples:
        number = _number(value)
        if number is None:
            continue
        label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        rendered.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    if rendered:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rendered]


def render(status: dict[str, Any]) -> str:
    lines: list[str] = []
    _family(lines, "gossipfl_info", "gauge", "Constant 1, labelled with the node's identity.", [(
        {"node_id": status.get("node_id", ""), "name": status.get("name", ""), "role": status.get("role", ""),
         "mode": status.get("mode", ""), "fingerprint": str(status.get("fingerprint", ""))[:16]}, 1)])
    for name, key, help_text in _GAUGES:
        _family(lines, name, "gauge", help_text, [({}, status.get(key))])
    privacy = status.get("privacy") or {}
    if privacy.get("enabled"):
        for name, key, help_text in _PRIVACY:
            _family(lines, name, "gauge", help_text, [({}, privacy.get(key))])
    pace = status.get("pace") or {}
    _family(lines, "gossipfl_pace_level", "gauge", "0 at full speed; each level doubles the gossip period.",
            [({}, pace.get("level"))])
    validation = status.get("validation") or {}
    for key in ("accuracy", "loss", "rmse"):
        _family(lines, f"gossipfl_validation_{key}", "gauge", f"Validation {key} on the local held-out split.",
                [({}, validation.get(key))])
    families: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for counter, value in sorted(status.get("counters", {}).items()):
        family, _, detail = counter.partition(".")
        if detail and family in _LABELLED:
            name, label = _LABELLED[family]
            families.setdefault(name, []).append(({label: detail}, value))
        elif counter in _DIRECTED:
            name, direction = _DIRECTED[counter]
            families.setdefault(name, []).append(({"direction": direction}, value))
        else:
            families.setdefault(f"gossipfl_{_NAME.sub('_', counter)}_total", []).append(({}, value))
    for name, samples in families.items():
        _family(lines, name, "counter", _HELP.get(name, "A gossipfl counter."), samples)
    return "\n".join(lines) + "\n"
