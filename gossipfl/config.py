"""The node's configuration: one TOML file, checked strictly before anything starts.

Every section is a dataclass and every key a field. An unknown key, a value of the wrong type or out
of range is refused with the key's dotted name (``gossip.period: must be > 0, got -1``), so a typo
never silently falls back to a default. Relative paths are resolved against the config file's
directory, so a config and the files it names can move together.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossipfl.errors import ConfigError
from gossipfl.learning.schema import DELIMITERS
from gossipfl.protocol.pace import PaceSettings
from gossipfl.protocol.power import PowerSettings
from gossipfl.streams.settings import StreamSettings

if typing.TYPE_CHECKING:
    from gossipfl.learning.aggregate import AggregatorConfig

ROLES = ("node", "gateway")
MODES = ("gossip", "fedavg", "auto")
SCHEMES = ("float32", "float16", "int8", "topk")
MERGES = ("age", "clipped")
LOG_FORMATS = ("text", "json")
PRIVACY_ROWS = ("shared", "disjoint_files")  # shared: one ledger for every row (the safe reading; docs/privacy.md)
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class NodeSection:
    name: str = "gossipfl-node"
    role: str = "node"
    mode: str = "gossip"
    state_dir: Path = Path("state")


@dataclass(frozen=True)
class ListenSection:
    address: str = "127.0.0.1"
    port: int = 7878


@dataclass(frozen=True)
class DiscoverySection:
    mdns: bool = True
    interfaces: list[str] = field(default_factory=list)  # addresses to run mDNS on; empty = the listen address
    static_peers: list[str] = field(default_factory=list)  # "host:port"


@dataclass(frozen=True)
class TlsSection:
    cert: Path = Path("certs/node.crt")
    key: Path = Path("certs/node.key")
    ca: Path = Path("certs/ca.crt")
    allowlist: list[str] = field(default_factory=list)  # node ids (hex); empty = anyone the CA signed


@dataclass(frozen=True)
class ModelSection:
    path: Path = Path("model.onnx")


@dataclass(frozen=True)
class DataSection:
    directory: Path = Path("data")
    label_column: str = ""  # "": the model's schema says (gossipfl model init --data), else "label"
    delimiter: str = ""  # "": detected from each file's header (comma, semicolon or tab)
    max_rows: int = 1_000_000  # rows held in memory; past it the oldest files' rows are left out
    validation_fraction: float = 0.2
    rescan_seconds: float = 30.0


@dataclass(frozen=True)
class TrainingSection:
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    threads: int = 1
    duty_cycle: float = 0.5  # share of wall time spent training, so the device stays usable
    slice_steps: int = 10  # steps per slice; merges wait at most one slice
    seed: int = 0
    enabled: bool = True


@dataclass(frozen=True)
class GossipSection:
    period: float = 2.0
    jitter: float = 0.5  # the period varies by up to this fraction either way
    scheme: str = "int8"
    # After each push, pull the peer's model back and merge it too: both ends of an exchange then hold the
    # same average, which keeps the cluster's mean model in place and roughly doubles the mixing per push.
    push_pull: bool = True
    topk_fraction: float = 0.01
    max_peers: int = 16  # peers we keep delta references for (least recently used go first)
    failures_to_evict: int = 3
    max_backoff: float = 30.0
    # Seconds a connection to a peer is kept open after an exchange, for the next one (up to max_peers of
    # them): each new connection costs a mutual TLS handshake, about as many bytes as an int8 delta of a small
    # model. 0 opens a new connection for every exchange. The listener keeps a peer's connection this long
    # plus its read timeout, and closes idle ones first when its connection slots run out.
    keep_alive: float = 120.0
    # How a peer's model is merged: "clipped" (the default: the peer's claimed age believed only as far as it
    # could have trained, its share capped at max_share times its trust, the step cut to clip_factor times the
    # median of recent merges; far models are merged a bounded step, never refused) or "age" (the plain
    # age-weighted average; the outlier rule of limits.outlier_factor refuses far models). bench/byzantine.py
    # measured both under attack; gossipfl/learning/robust.py and docs/daemon.md say why.
    merge: str = "clipped"
    max_share: float = 0.5
    clip_factor: float = 1.5
    max_age_rate: float = 100000.0  # samples a second a peer may have trained since first seen


@dataclass(frozen=True)
class FedavgSection:
    """Server-assisted FedAvg: the gateway's rounds and aggregation, and how clients follow a gateway."""

    # gateway side: one round
    fraction: float = 1.0  # share of live clients asked to each round
    min_clients: int = 1  # fewer live clients than this: no round (a gateway that trains counts itself)
    quorum: float = 1.0  # share of the asked clients whose answers end a round before its deadline
    deadline: float = 20.0  # seconds clients have to answer
    epochs: int = 1  # local epochs per round
    round_pause: float = 0.5  # seconds between rounds
    max_rounds: int = 0  # stop running rounds after this many (a finite training campaign); 0 = never stop
    late_updates: str = "drop"  # "drop", or "discount": apply late updates next round, scaled 1/sqrt(1+staleness)
    max_staleness: int = 3  # rounds after which a late update is dropped even when discounting
    # gateway side: aggregation (gossipfl.learning.aggregate)
    rule: str = "mean"  # mean, fedavgm, trimmed_mean, median
    clip_norm: float = 0.0  # clip each update to this L2 norm; 0 = off
    clip_factor: float = 0.0  # clip each update to this times the round's median norm; 0 = off
    trim_fraction: float = 0.2
    server_lr: float = 1.0
    server_momentum: float = 0.9
    # client side (mode auto)
    fallback_seconds: float = 30.0  # a gateway silent this long is gone: learn by gossip until it is back
    # The node ids (hex) that may act as gateways: a role the cluster grants, never one a peer claims. A node
    # follows, and a gateway gossips with, only these; empty: nobody is followed as a gateway.
    gateways: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LimitsSection:
    max_frame_bytes: int = 64 * 1024 * 1024
    max_connections: int = 32
    read_timeout: float = 10.0
    connect_timeout: float = 5.0
    outlier_factor: float = 10.0  # refuse updates whose norm exceeds this times the recent median


@dataclass(frozen=True)
class StateSection:
    checkpoint_seconds: float = 30.0
    # Keep the per-peer delta references in state/references.bin with every checkpoint, so a restart goes
    # on with deltas instead of one full model per peer. Costs 2 x gossip.max_peers x the model's size on
    # disk at every checkpoint: turn it off for large models on flash that must be spared.
    save_references: bool = True


@dataclass(frozen=True)
class ControlSection:
    enabled: bool = True
    socket: Path = Path("/run/gossipfl/control.sock")
    group: str = ""  # group that may read through the socket (name or gid); empty = the daemon's own group
    max_request_bytes: int = 1024 * 1024
    max_connections: int = 8
    timeout: float = 5.0  # seconds for a client to send its request and for the daemon to answer it
    metrics_listen: str = ""  # "127.0.0.1:9464" serves Prometheus metrics over HTTP; empty = off


@dataclass(frozen=True)
class LogSection:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class PrivacySection:
    """Record-level differential privacy for the rows this node trains on (docs/privacy.md)."""

    enabled: bool = False
    epsilon: float = 8.0  # the budget: the epsilon no training may take the node's rows past
    delta: float = 1e-5
    clip: float = 1.0  # C: the L2 bound on each row's gradient
    noise_multiplier: float = 0.0  # sigma; 0: the least noise that lets `epochs` passes fit in the budget
    epochs: float = 30.0  # passes over the rows the budget is planned for, when the noise is derived
    # "disjoint_files": the operator states that no person or record is in two data files, so each file has a
    # budget (ledger) of its own and a new file brings a fresh one. "shared" assumes nothing: one ledger.
    rows: str = "shared"


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    listen: ListenSection = field(default_factory=ListenSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    tls: TlsSection = field(default_factory=TlsSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    fedavg: FedavgSection = field(default_factory=FedavgSection)
    quiet: PaceSettings = field(default_factory=PaceSettings)  # the section is the pace's own settings
    privacy: PrivacySection = field(default_factory=PrivacySection)
    power: PowerSettings = field(default_factory=PowerSettings)  # the section is the power policy's own settings
    mqtt: StreamSettings = field(default_factory=StreamSettings)  # a sensor stream: the streams package's settings
    limits: LimitsSection = field(default_factory=LimitsSection)
    state: StateSection = field(default_factory=StateSection)
    control: ControlSection = field(default_factory=ControlSection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None  # the file this came from

    @property
    def mdns_interfaces(self) -> list[str]:
        return self.discovery.interfaces or [self.listen.address]


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {file} is over {MAX_CONFIG_BYTES} bytes")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    return config_from_dict(table, base_dir=file.resolve().parent, source=file)


def check_named_files(c: NodeConfig) -> None:
    """Refuse a config whose certificate, key, CA, model or data directory is missing, naming the key.

    The loaders that read these files name only the path; an operator on a fresh install (the shipped
    config names /etc/gossipfl/certs before any certificate is there) needs to know which key to fix
    and how to make what is missing."""
    issue = "make one with `gossipfl certs issue --ca CA_DIR --name NAME --out DIR` (docs/identity.md)"
    files = (("tls.cert", c.tls.cert, issue), ("tls.key", c.tls.key, issue),
             ("tls.ca", c.tls.ca, "copy the cluster's ca.crt there, or start a cluster with `gossipfl certs init-ca`"),
             ("model.path", c.model.path, "put the cluster's ONNX model there (`gossipfl model init` makes one)"))
    for key, path, hint in files:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"{key}: {path} {what}; {hint}")
    if not c.data.directory.is_dir():
        what = "is not a directory" if c.data.directory.exists() else "does not exist"
        raise ConfigError(f"data.directory: {c.data.directory} {what}; the node's training data go there")


def config_from_dict(table: dict[str, Any], base_dir: Path | None = None, source: Path | None = None) -> NodeConfig:
    base = base_dir or Path.cwd()
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(NodeConfig) if f.name != "source"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(known)})")
    hints = typing.get_type_hints(NodeConfig)
    for key in known:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table ([{key}])")
        sections[key] = _build_section(hints[key], value, key, base)
    config = NodeConfig(**sections, source=source)
    _validate(config)
    return config


def _build_section(cls: type, table: dict[str, Any], prefix: str, base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (known in [{prefix}]: {', '.join(sorted(names))})")
        values[key] = _coerce(hints[key], value, dotted, base)
    defaults = cls()
    for name in names - values.keys():
        if hints[name] is Path:
            values[name] = _resolve(getattr(defaults, name), base)
    return cls(**values)


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _coerce(hint: Any, value: Any, key: str, base: Path) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a path string, got {value!r}")
        return _resolve(Path(value), base)
    if hint == Path | None:  # an optional file: "" (the default) is none
        if value == "":
            return None
        return _coerce(Path, value, key, base)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]", base) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported option type {hint!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    _check(bool(sep) and bool(host) and port_text.isdigit(), key, f"must be host:port, got {text!r}")
    port = int(port_text)
    _check(0 < port < 65536, key, f"port {port} is out of range")
    return host, port


def _within(value: float, key: str, lo: float, hi: float, unit: str = "") -> None:
    """A number in its sane range: a setting far outside it is a typo or an attack, never a choice (a period
    of 1e-9 s burns a core; a learning rate of 1e30 turns the model to NaN)."""
    _check(lo <= value <= hi, key, f"must be {lo:g} to {hi:g}{unit}, got {value:g}")


def _check_ip(text: str, key: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an IP address") from None


def _validate(c: NodeConfig) -> None:
    _check(0 < len(c.node.name) <= 63, "node.name", "must be 1 to 63 characters")
    _check(c.node.role in ROLES, "node.role", f"must be one of {', '.join(ROLES)}, got {c.node.role!r}")
    _check(c.node.mode in MODES, "node.mode", f"must be one of {', '.join(MODES)}, got {c.node.mode!r}")
    _check_ip(c.listen.address, "listen.address")
    _check(0 <= c.listen.port < 65536, "listen.port", f"must be 0 to 65535, got {c.listen.port}")
    for i, addr in enumerate(c.discovery.interfaces):
        _check_ip(addr, f"discovery.interfaces[{i}]")
    for i, peer in enumerate(c.discovery.static_peers):
        parse_host_port(peer, f"discovery.static_peers[{i}]")
    for i, node_id in enumerate(c.tls.allowlist):
        _check(len(node_id) == 64 and all(ch in "0123456789abcdef" for ch in node_id.lower()),
               f"tls.allowlist[{i}]", f"must be a 64-character hex node id, got {node_id!r}")
    _check(0 <= c.data.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)")
    _within(c.data.max_rows, "data.max_rows", 1, 100_000_000, " rows")
    _check(c.data.delimiter in ("", *DELIMITERS), "data.delimiter",
           f"must be one of {', '.join(map(repr, DELIMITERS))} or \"\" (detect), got {c.data.delimiter!r}")
    _within(c.data.rescan_seconds, "data.rescan_seconds", 0.1, 86400, " s")
    t = c.training
    _check(t.optimizer in ("sgd", "adam"), "training.optimizer", f"must be sgd or adam, got {t.optimizer!r}")
    _within(t.lr, "training.lr", 1e-9, 10)
    _check(0 <= t.momentum < 1, "training.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(1 <= t.batch_size <= 65536, "training.batch_size", f"must be 1 to 65536, got {t.batch_size}")
    _check(1 <= t.threads <= 64, "training.threads", f"must be 1 to 64, got {t.threads}")
    _check(0 < t.duty_cycle <= 1, "training.duty_cycle", f"must be in (0, 1], got {t.duty_cycle}")
    _check(0 <= t.seed < 2**32, "training.seed", f"must be 0 to {2**32 - 1}, got {t.seed}")
    _check(1 <= t.slice_steps <= 10000, "training.slice_steps", f"must be 1 to 10000, got {t.slice_steps}")
    g = c.gossip
    _within(g.period, "gossip.period", 0.05, 3600, " s")
    _check(0 <= g.jitter < 1, "gossip.jitter", f"must be in [0, 1), got {g.jitter}")
    _check(g.scheme in SCHEMES, "gossip.scheme", f"must be one of {', '.join(SCHEMES)}, got {g.scheme!r}")
    _check(0 < g.topk_fraction <= 1, "gossip.topk_fraction", f"must be in (0, 1], got {g.topk_fraction}")
    _check(1 <= g.max_peers <= 1024, "gossip.max_peers", f"must be 1 to 1024, got {g.max_peers}")
    _within(g.failures_to_evict, "gossip.failures_to_evict", 1, 1000)
    _check(g.max_backoff >= g.period, "gossip.max_backoff", "must be at least gossip.period")
    _within(g.max_backoff, "gossip.max_backoff", 0.05, 86400, " s")
    _within(g.keep_alive, "gossip.keep_alive", 0, 3600, " s")
    _check(g.merge in MERGES, "gossip.merge", f"must be one of {', '.join(MERGES)}, got {g.merge!r}")
    _within(g.max_share, "gossip.max_share", 0.01, 1)
    _within(g.clip_factor, "gossip.clip_factor", 1, 1000)
    _within(g.max_age_rate, "gossip.max_age_rate", 1, 1e9, " samples/s")
    f = c.fedavg
    _check(0 < f.fraction <= 1, "fedavg.fraction", f"must be in (0, 1], got {f.fraction}")
    _check(1 <= f.min_clients <= 10000, "fedavg.min_clients", f"must be 1 to 10000, got {f.min_clients}")
    _check(0 < f.quorum <= 1, "fedavg.quorum", f"must be in (0, 1], got {f.quorum}")
    _within(f.deadline, "fedavg.deadline", 0.1, 86400, " s")
    _check(1 <= f.epochs <= 1000, "fedavg.epochs", f"must be 1 to 1000, got {f.epochs}")
    _within(f.round_pause, "fedavg.round_pause", 0, 86400, " s")
    _check(f.max_rounds >= 0, "fedavg.max_rounds", "must be >= 0 (0 = no limit)")
    _check(f.late_updates in ("drop", "discount"), "fedavg.late_updates",
           f"must be drop or discount, got {f.late_updates!r}")
    _check(0 <= f.max_staleness <= 100, "fedavg.max_staleness", "must be 0 to 100")
    _check(f.clip_norm >= 0, "fedavg.clip_norm", "must be >= 0 (0 = off)")
    _check(f.clip_factor >= 0, "fedavg.clip_factor", "must be >= 0 (0 = off)")
    _within(f.fallback_seconds, "fedavg.fallback_seconds", 0.1, 86400, " s")
    for i, node_id in enumerate(f.gateways):
        _check(len(node_id) == 64 and all(ch in "0123456789abcdef" for ch in node_id.lower()),
               f"fedavg.gateways[{i}]", f"must be a 64-character hex node id, got {node_id!r}")
    aggregator_config(f)  # the aggregation keys, checked where they are used
    q = c.quiet
    _within(q.window, "quiet.window", 2, 10000, " periods")
    _within(q.tolerance, "quiet.tolerance", 1e-6, 1)
    _within(q.wake_distance, "quiet.wake_distance", 1.01, 1e6)
    _within(q.accuracy_drop, "quiet.accuracy_drop", 1e-4, 1)
    _within(q.max_period, "quiet.max_period", 0.05, 86400, " s")
    _check(q.max_period >= g.period, "quiet.max_period", f"must be at least gossip.period ({g.period:g} s)")
    _check(0 < q.min_duty_cycle <= t.duty_cycle, "quiet.min_duty_cycle",
           f"must be in (0, training.duty_cycle = {t.duty_cycle:g}], got {q.min_duty_cycle:g}")
    p = c.privacy
    _within(p.epsilon, "privacy.epsilon", 0.01, 100)
    _check(0 < p.delta < 0.01, "privacy.delta", f"must be above 0 and below 0.01 (1/rows or less), got {p.delta:g}")
    _within(p.clip, "privacy.clip", 1e-6, 1e6)
    _check(p.noise_multiplier == 0 or 0.1 <= p.noise_multiplier <= 1000, "privacy.noise_multiplier",
           f"must be 0 (derived from the budget) or 0.1 to 1000, got {p.noise_multiplier:g}")
    _within(p.epochs, "privacy.epochs", 0.01, 1e6, " passes")
    _check(p.rows in PRIVACY_ROWS, "privacy.rows", f"must be one of {', '.join(PRIVACY_ROWS)}, got {p.rows!r}")
    w = c.power
    _within(w.min_battery, "power.min_battery", 0, 100, "%")
    _within(w.max_temperature, "power.max_temperature", 20, 150, " C")
    _within(w.check_seconds, "power.check_seconds", 0.05, 3600, " s")
    if c.mqtt.enabled:
        c.mqtt.validate()
    lim = c.limits
    _check(1024 <= lim.max_frame_bytes <= 2**31, "limits.max_frame_bytes", "must be 1 KiB to 2 GiB")
    _check(1 <= lim.max_connections <= 10000, "limits.max_connections", "must be 1 to 10000")
    _within(lim.read_timeout, "limits.read_timeout", 0.1, 3600, " s")
    _within(lim.connect_timeout, "limits.connect_timeout", 0.1, 600, " s")
    _check(1 < lim.outlier_factor <= 1e6, "limits.outlier_factor", f"must be above 1, at most 1e6, got "
                                                                     f"{lim.outlier_factor:g}")
    ctl = c.control
    _check(len(os.fsencode(ctl.socket)) <= 107, "control.socket", "must be at most 107 bytes (a Unix socket path)")
    _check(1024 <= ctl.max_request_bytes <= 64 * 1024 * 1024, "control.max_request_bytes", "must be 1 KiB to 64 MiB")
    _check(1 <= ctl.max_connections <= 1024, "control.max_connections", "must be 1 to 1024")
    _within(ctl.timeout, "control.timeout", 0.1, 600, " s")
    if ctl.metrics_listen:
        host, _ = parse_host_port(ctl.metrics_listen, "control.metrics_listen")
        _check_ip(host, "control.metrics_listen")
        _check(ipaddress.ip_address(host).is_loopback, "control.metrics_listen",
               f"must be a loopback address (metrics name peers); got {host}")
    _within(c.state.checkpoint_seconds, "state.checkpoint_seconds", 0.01, 86400, " s")
    _check(c.log.format in LOG_FORMATS, "log.format", f"must be text or json, got {c.log.format!r}")
    _check(c.log.level in ("debug", "info", "warning", "error"), "log.level",
           f"must be debug, info, warning or error, got {c.log.level!r}")


def aggregator_config(f: FedavgSection) -> AggregatorConfig:
    from gossipfl.learning.aggregate import AggregatorConfig  # numpy: only for a config that is checked

    return AggregatorConfig(rule=f.rule, clip_norm=f.clip_norm or None, clip_factor=f.clip_factor or None,
                            trim_fraction=f.trim_fraction, server_lr=f.server_lr, server_momentum=f.server_momentum,
                            staleness=f.late_updates)
