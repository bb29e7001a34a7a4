"""The ``gossipfl`` commands that talk to a running daemon over its control socket.

Each prints a human view by default and the daemon's JSON with ``--json``. A stopped daemon is one
line and exit code 3 (``DaemonNotRunning``); a refused caller exit code 4 (``ControlForbidden``).

``status``, ``peers``, ``metrics``, ``pause``, ``resume`` and ``peer`` import nothing beyond the standard
library and the control client (``gossipfl.cli.main`` takes a fast path for them): onnx, numpy and the
config parser cost about 0.7 s of CPU before anything happened, a monitoring script polling 8 daemons spent
a core. Only the commands that need models (``predict``, ``model export``) import them, when run.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossipfl.cli.argtypes import positive_float
from gossipfl.cli.client import ControlClient
from gossipfl.control import socket_path
from gossipfl.errors import ControlError, DataError, ModelError

if TYPE_CHECKING:
    import numpy as np

REQUEST_BUDGET = 512 * 1024  # bytes of rows per predict request, well under the daemon's default limit


def client(args: argparse.Namespace) -> ControlClient:
    config_socket = None
    if args.config:
        from gossipfl.config import load_config

        config_socket = load_config(args.config).control.socket
    return ControlClient(socket_path(args.socket, config_socket), timeout=args.timeout)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    return " ".join([*parts, f"{secs}s"])


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _print(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> int:
    print(json.dumps(result) if args.json else human(result))
    return 0


# counter family -> how the status line names it; the same families as the metrics' labelled counters
_PROBLEMS = (("refused", "refused"), ("failed", "failed pushes"), ("dropped", "dropped links"))


def _problems(counters: dict[str, Any], recent: dict[str, Any] | None = None) -> str:
    """One line an operator can scan: what was refused, failed or dropped, and the commonest reasons; with
    ``recent`` (status's growth of the counters lately), how many of each family are recent, since the totals
    never reset."""
    parts = []
    grown = (recent or {}).get("counters") or {}
    window = _duration((recent or {}).get("seconds") or 0)
    for family, label in _PROBLEMS:
        reasons = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith(family + ".")}
        if reasons:
            top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            more = ", ..." if len(reasons) > 3 else ""
            lately = sum(v for k, v in grown.items() if k.startswith(family + "."))
            parts.append(f"{label} {sum(reasons.values()):.0f} ("
                         + ", ".join(f"{k} {v:.0f}" for k, v in top) + more + ")"
                         + (f", {lately:.0f} in the last {window}" if recent is not None else ""))
    return "; ".join(parts) or "none"


def _data_text(d: dict[str, Any]) -> str:
    if not d:
        return "unknown"
    skipped = d.get("skipped_rows") or {}
    rows = f"{d.get('rows', 0)} rows from {d.get('files', 0)} files"
    if skipped:
        rows += "; rows skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()))
    if d.get("skipped_files"):
        rows += f"; files skipped: {len(d['skipped_files'])}"
    return rows


def _status_text(s: dict[str, Any]) -> str:
    v = s.get("validation") or {}
    if v.get("accuracy") is not None:
        quality = f"accuracy {v['accuracy']:.4f}, loss {v['loss']:.4f} on {v['count']} held-out samples"
    elif v.get("rmse") is not None:
        quality = f"rmse {v['rmse']:.4f}, loss {v['loss']:.4f} on {v['count']} held-out samples"
    else:
        quality = "not evaluated yet"
    training = "paused" if s["paused"] else "running" if s["training"] else "idle (no data or disabled)"
    c = s.get("counters", {})
    counted = [] if _problems(c) == "none" else [_problems(c, s.get("recent"))]
    return "\n".join([
        f"node        {s['node_id']}  ({s['name']})",
        f"role        {s['role']}, mode {s['mode']}",
        f"model       {s['fingerprint'][:16]}  {s['model']['params']} parameters, {s['model']['task']}",
        f"age         {s['age']:.0f} samples",
        f"training    {training}, {s['train_samples']} local samples",
        f"validation  {quality}",
        f"peers       {s['peers']} live, {len(s['blocked'])} blocked",
        f"exchanges   {c.get('exchanges_out', 0):.0f} out, {c.get('exchanges_in', 0):.0f} in; "
        f"on the wire {human_size(c.get('wire_out', 0))} up, {human_size(c.get('wire_in', 0))} down "
        f"(frames {human_size(c.get('bytes_out', 0))} sent, {human_size(c.get('bytes_in', 0))} received)",
        f"data        {_data_text(s.get('data') or {})}",
        f"pace        {_pace_text(s.get('pace') or {})}",
        f"privacy     {_privacy_text(s.get('privacy') or {})}",
        f"power       {_power_text(s.get('power') or {})}",
        *([f"stream      {_stream_text(s['stream'])}"] if s.get("stream") else []),
        f"problems    {'; '.join([*s.get('problems', []), *counted]) or 'none'}",
        f"uptime      {_duration(s['uptime'])}",
    ])


def _power_text(p: dict[str, Any]) -> str:
    if not p.get("enabled"):
        return "not checked (power.enabled is false)"
    return f"{'training allowed' if p.get('training_allowed') else 'TRAINING STOPPED'}: {p.get('reason')}"


def _stream_text(m: dict[str, Any]) -> str:
    link = "subscribed" if m.get("subscribed") else "connected" if m.get("connected") else "not connected"
    text = f"MQTT {m.get('broker')} {link}; {m.get('rows', 0)} windows held, last judged {m.get('judged_through')}"
    if m.get("task") == "anomaly":
        threshold = m.get("threshold")
        text += f"; threshold {threshold:.4g}" if threshold is not None else "; threshold warming up"
        last = m.get("last") or {}
        if last.get("score") is not None:
            text += f"; last score {last['score']:.4g}" + (" (ANOMALY)" if last.get("anomaly") else "")
    if m.get("last_error"):
        text += f"; last error: {m['last_error']}"
    return text


def _privacy_text(p: dict[str, Any]) -> str:
    if not p.get("enabled"):
        return "off (no differential privacy: peers receive models trained on the rows as they are)"
    spent = "unknown" if p["epsilon_spent"] is None else f"{p['epsilon_spent']:.3g}"
    per_file = p.get("rows") == "disjoint_files"
    text = (f"epsilon {spent}{' (the most of any file)' if per_file else ''} of {p['epsilon_budget']:g} spent at "
            f"delta {p['delta']:g} (noise multiplier {p['noise_multiplier']:.3g}, clip {p['clip']:g}, "
            f"{p['steps']} steps)")
    if per_file and "files" in p:
        text += f"; {p['files_out_of_budget']} of {p['files']} files out of budget"
    return f"{text}; {p['state']}"


def _pace_text(p: dict[str, Any]) -> str:
    if not p:
        return "unknown"
    if not p.get("enabled", True):
        return "full speed (quieting is off)"
    speed = "full speed" if p["state"] == "full" else (
        f"{p['state']} (level {p['level']} of {p['max_level']}: gossip every {p['period']:g} s, "
        f"training {100 * p['duty_cycle']:.1f}% of the time)")
    return f"{speed} for {_duration(p['for_seconds'])}: {p['reason']}"


def _peers_text(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers known"
    # IN and OUT are bytes on the wire (TLS included); --json has the protocol's frame bytes too
    width = max(6, *(len(p.get("name") or "-") for p in peers)) + 2
    header = (f"{'NODE':<14}{'NAME':<{width}}{'ADDRESS':<24}{'STATE':<14}{'LAST SEEN':>10}{'EXCH':>7}{'IN':>11}"
              f"{'OUT':>11}  REFUSALS")
    lines = [header]
    for p in peers:
        seen = "-" if p["last_seen_ago"] is None else f"{p['last_seen_ago']:.0f}s ago"
        refusals = ",".join(f"{k}={v}" for k, v in sorted(p["refusals"].items())) or "-"
        lines.append(f"{p['node_id'][:12]:<14}{p.get('name') or '-':<{width}}{p['address']:<24}{p['state']:<14}"
                     f"{seen:>10}{p['exchanges']:>7}"
                     f"{human_size(p['wire_in']):>11}{human_size(p['wire_out']):>11}  {refusals}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    return _print(args, client(args).call("status"), _status_text)


def cmd_peers(args: argparse.Namespace) -> int:
    return _print(args, client(args).call("peers"), _peers_text)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metrics_json(text: str) -> dict[str, list[dict[str, Any]]]:
    """Prometheus text as JSON a script can read: each metric name to its samples' labels and values."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if line.startswith("#") or match is None:
            continue
        name, labels, value = match.groups()
        out.setdefault(name, []).append({"labels": dict(_LABEL.findall(labels or "")), "value": float(value)})
    return out


def cmd_metrics(args: argparse.Namespace) -> int:
    text = client(args).call("metrics")
    print(json.dumps(metrics_json(text)) if args.json else text, end="" if not args.json else "\n")
    return 0


def _switch(command: str, word: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _print(args, client(args).call(command), lambda _: f"{word}: training and gossip")
    return run


def _peer_id(ctl: ControlClient, given: str) -> str:
    """A full node id from a full one, a peer's name (its certificate's), or a unique prefix of a known or
    blocked peer's id (at least 4 digits)."""
    text = given.strip().lower()
    if len(text) == 64:
        return text
    peers = ctl.call("peers")
    named = sorted({p["node_id"] for p in peers if p.get("name") and p["name"].lower() == text})
    if len(named) == 1:
        return named[0]
    if len(named) > 1:  # two certificates with one name: the id must say which
        raise ControlError(f"{given!r} names {len(named)} peers: {', '.join(m[:16] for m in named)}; give the id")
    if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
        raise ControlError(f"{given!r}: give a peer's name, its node id, or at least 4 of its first hex digits")
    known = {p["node_id"] for p in peers} | set(ctl.call("status")["blocked"])
    matches = sorted(i for i in known if i.startswith(text))
    if len(matches) != 1:
        raise ControlError(f"{given!r} matches {len(matches)} peers" + (f": {', '.join(m[:16] for m in matches)}"
                                                                       if matches else "; see gossipfl peers"))
    return matches[0]


def cmd_block(args: argparse.Namespace) -> int:
    ctl = client(args)
    node = _peer_id(ctl, args.id)
    result = ctl.call("peer.block", id=node)
    return _print(args, result, lambda r: f"blocked {node}; {len(r['blocked'])} blocked in all")


def cmd_unblock(args: argparse.Namespace) -> int:
    ctl = client(args)
    node = _peer_id(ctl, args.id)
    result = ctl.call("peer.unblock", id=node)
    return _print(args, result, lambda r: f"unblocked {node}; {len(r['blocked'])} blocked in all")


def cmd_export(args: argparse.Namespace) -> int:
    from gossipfl.atomic import write_bytes_atomic
    from gossipfl.learning.model import Model

    result = client(args).call("model.export")
    try:
        data = base64.b64decode(result["onnx"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ControlError(f"the daemon's export is malformed: {exc}") from None
    model = Model.from_bytes(data)  # refuses anything that is not a loadable model
    if model.fingerprint_hex != result.get("fingerprint"):
        raise ModelError("the exported model's fingerprint does not match what the daemon reported")
    write_bytes_atomic(Path(args.out), data, mode=0o644)
    summary = {"out": args.out, "fingerprint": model.fingerprint_hex, "age": result.get("age"),
               "parameters": model.num_params, "bytes": len(data)}
    return _print(args, summary, lambda s: f"wrote {s['out']}: {s['parameters']} parameters, age {s['age']:.0f}, "
                                           f"{s['bytes']} bytes")


def predict_via_daemon(args: argparse.Namespace
                       ) -> tuple[str, np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """(task, outputs, labels, class names) for the rows of ``args.input`` through the daemon's current model."""
    import numpy as np

    from gossipfl.learning.data import DataSpec, read_file
    from gossipfl.learning.schema import Schema

    ctl = client(args)
    info = ctl.call("status")["model"]
    schema = Schema.from_json(json.dumps(info["schema"])) if info.get("schema") else None
    spec = DataSpec(features=info["features"], task=info["task"],
                    classes=info["outputs"] if info["task"] == "classification" else None,
                    outputs=info["outputs"], label_column=args.label_column or (schema.label if schema else "label"),
                    schema=schema)
    table = read_file(Path(args.input), spec, require_labels=False)
    if len(table) == 0:
        raise DataError(f"{args.input}: no samples")
    x = table.x.reshape(len(table), -1).astype(np.float64)
    row_bytes = len(json.dumps(x[0].tolist())) + 2
    chunk = max(1, REQUEST_BUDGET // row_bytes)
    outputs, labels = [], []
    for start in range(0, len(x), chunk):
        reply = ctl.call("predict", rows=x[start : start + chunk].tolist())
        outputs.append(np.asarray(reply["outputs"], dtype=np.float32))
        labels.extend(reply.get("labels", []))
    out = np.concatenate(outputs)
    return (info["task"], out, np.asarray(labels) if info["task"] == "classification" else None,
            schema.classes if schema is not None else None)


def connection_options(parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """How to reach the daemon; a parent parser for every command that talks to it."""
    options = parser_class(add_help=False)
    options.add_argument("--socket", help="the daemon's control socket (default: $GOSSIPFL_SOCKET, the "
                                          "config's control.socket, or /run/gossipfl/control.sock)")
    options.add_argument("--config", help="read the socket path from this node config")
    options.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for the daemon")
    return options


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the daemon commands; returns the shared options parser for commands defined elsewhere."""
    common = parser_class(add_help=False, parents=[connection_options(parser_class)])
    common.add_argument("--json", action="store_true", help="print the daemon's JSON")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, parent: Any = sub) -> Any:
        command = parent.add_parser(name, help=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    add("status", cmd_status, "the running daemon: identity, model, training, accuracy, peers")
    add("peers", cmd_peers, "the daemon's peers: address, state, exchanges, bytes, refusals")
    add("metrics", cmd_metrics, "the daemon's metrics in Prometheus text format")
    add("pause", _switch("pause", "paused"), "pause training and gossip (survives restarts)")
    add("resume", _switch("resume", "resumed"), "resume training and gossip")
    peer = sub.add_parser("peer", help="block or unblock a peer by node id")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True, parser_class=parser_class)
    add("block", cmd_block, "refuse a peer and never dial it", peer_sub).add_argument(
        "id", help="the peer's name (as `gossipfl peers` shows it), node id, or a unique prefix of the id")
    add("unblock", cmd_unblock, "take a blocked peer back", peer_sub).add_argument(
        "id", help="the peer's name (as `gossipfl peers` shows it), node id, or a unique prefix of the id")
    return common


def register_export(model_sub: Any, common: argparse.ArgumentParser) -> None:
    export = model_sub.add_parser("export", help="write the running daemon's current model as an ONNX file",
                                  parents=[common])
    export.add_argument("--out", required=True)
    export.set_defaults(handler=cmd_export)
