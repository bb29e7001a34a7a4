"""Config, merge rule, peer table and checkpoint: the sans-I/O parts of a node."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gossipfl.config import check_named_files, config_from_dict, load_config
from gossipfl.errors import ConfigError, ModelError
from gossipfl.learning.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.learning.merge import age_weighted_merge, update_norm_is_outlier
from gossipfl.learning.zoo import ArchSpec, build
from gossipfl.protocol.peers import PeerTable


def test_config_defaults_and_relative_paths(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "a"\n[tls]\ncert = "c/n.crt"\n[gossip]\nperiod = 1\n')
    config = load_config(path)
    assert config.gossip.period == 1.0 and isinstance(config.gossip.period, float)
    assert config.tls.cert == tmp_path / "c" / "n.crt"
    assert config.tls.key == tmp_path / "certs" / "node.key", "defaults resolve against the file too"
    assert config.mdns_interfaces == ["127.0.0.1"]


@pytest.mark.parametrize("table, message", [
    ({"gossip": {"perod": 1}}, "gossip.perod: unknown key"),
    ({"gossips": {}}, "gossips: unknown section"),
    ({"gossip": {"period": -1}}, "gossip.period: must be 0.05 to 3600 s, got -1"),
    ({"gossip": {"period": 1e-9}}, "gossip.period: must be 0.05 to 3600 s, got 1e-09"),
    ({"training": {"lr": 1e30}}, "training.lr: must be 1e-09 to 10, got 1e"),
    ({"state": {"checkpoint_seconds": 1e-6}}, "state.checkpoint_seconds: must be 0.01 to 86400 s"),
    ({"limits": {"read_timeout": 1e9}}, "limits.read_timeout: must be 0.1 to 3600 s"),
    ({"limits": {"outlier_factor": 1.0}}, "limits.outlier_factor: must be above 1"),
    ({"gossip": {"period": "fast"}}, "gossip.period: must be a finite number"),
    ({"gossip": {"scheme": "zip"}}, "gossip.scheme: must be one of"),
    ({"listen": {"port": 70000}}, "listen.port: must be 0 to 65535"),
    ({"listen": {"address": "localhost"}}, "listen.address: 'localhost' is not an IP address"),
    ({"discovery": {"static_peers": ["10.0.0.1"]}}, r"discovery.static_peers\[0\]: must be host:port"),
    ({"discovery": {"mdns": "yes"}}, "discovery.mdns: must be true or false"),
    ({"training": {"batch_size": 2.5}}, "training.batch_size: must be a whole number"),
    ({"training": {"duty_cycle": 0}}, r"training.duty_cycle: must be in \(0, 1\]"),
    ({"tls": {"allowlist": ["abc"]}}, r"tls.allowlist\[0\]: must be a 64-character hex node id"),
    ({"node": {"role": "server"}}, "node.role: must be one of node, gateway"),
    ({"node": {"mode": "federated"}}, "node.mode: must be one of gossip, fedavg, auto"),
    ({"fedavg": {"rule": "krum"}}, "fedavg.rule: must be one of mean, fedavgm, trimmed_mean, median"),
    ({"fedavg": {"quorum": 0}}, r"fedavg.quorum: must be in \(0, 1\]"),
    ({"fedavg": {"late_updates": "keep"}}, "fedavg.late_updates: must be drop or discount"),
    ({"control": {"metrics_listen": "0.0.0.0:9464"}}, "control.metrics_listen: must be a loopback address"),
    ({"control": {"socket": "/" + "x" * 120}}, "control.socket: must be at most 107 bytes"),
    ({"node": "x"}, r"node: must be a table"),
    ({"training": {"seed": -1}}, "training.seed: must be 0 to 4294967295, got -1"),
    ({"quiet": {"max_period": 1.0}}, r"quiet.max_period: must be at least gossip.period \(2 s\)"),
    ({"quiet": {"min_duty_cycle": 0.9}}, r"quiet.min_duty_cycle: must be in \(0, training.duty_cycle = 0.5\]"),
    ({"quiet": {"window": 1}}, "quiet.window: must be 2 to 10000 periods, got 1"),
])
def test_config_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_missing_files_name_their_key_and_how_to_make_them(tmp_path):
    for name in ("certs/node.crt", "certs/node.key", "certs/ca.crt", "model.onnx"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "data").mkdir()
    config = config_from_dict({}, base_dir=tmp_path)
    check_named_files(config)  # all there: no complaint (their contents are the loaders' to check)
    for key, name, hint in (("tls.ca", "certs/ca.crt", "gossipfl certs init-ca"),
                            ("tls.key", "certs/node.key", "gossipfl certs issue"),
                            ("model.path", "model.onnx", "gossipfl model init")):
        (tmp_path / name).rename(tmp_path / "aside")
        with pytest.raises(ConfigError, match=rf"^{key}: {tmp_path / name} does not exist; .*{hint}"):
            check_named_files(config)
        (tmp_path / "aside").rename(tmp_path / name)
    (tmp_path / "data").rmdir()
    (tmp_path / "data").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^data.directory: .* is not a directory"):
        check_named_files(config)


def test_age_weighted_merge():
    local = np.array([0.0, 2.0], np.float32)
    merged = age_weighted_merge(local, 100.0, np.array([4.0, 2.0], np.float32), 300.0)
    assert np.allclose(local, [3.0, 2.0]) and merged.age == 300.0 and merged.weight_remote == 0.75
    fresh = np.zeros(2, np.float32)
    assert age_weighted_merge(fresh, 0.0, np.ones(2, np.float32), 0.0).weight_remote == 0.5
    assert np.allclose(fresh, 0.5)


def test_outlier_rule():
    history = [1.0, 1.2, 0.9, 1.1, 1.0]
    assert not update_norm_is_outlier(5.0, history, factor=10)
    assert update_norm_is_outlier(50.0, history, factor=10)
    assert not update_norm_is_outlier(1e9, history[:3], factor=10), "no refusals before enough history"


def test_peer_backoff_eviction_and_return():
    table = PeerTable(period=1.0, failures_to_evict=3, max_backoff=8.0)
    rng = random.Random(0)
    a = table.seen(b"a" * 32, "127.0.0.1", 1, "mdns", now=0.0)
    table.seen(b"b" * 32, "127.0.0.1", 2, "static", now=0.0)
    assert {p.key for p in table.live()} == {b"a" * 32, b"b" * 32}
    assert not table.failed(a.key, now=0.0)
    assert a.next_try == 2.0
    assert not table.failed(a.key, now=2.0)
    assert table.failed(a.key, now=6.0), "third failure in a row evicts"
    assert a.evicted and a.next_try == 6.0 + 8.0
    assert [p.key for p in table.live()] == [b"b" * 32]
    picks = {table.choose(7.0, rng).key for _ in range(50)}
    assert picks == {b"b" * 32}, "an evicted peer is not chosen before its retry time"
    assert all(table.choose(20.0, rng).key == a.key for _ in range(20)), \
        "an evicted peer whose retry is due is tried before live ones, which are always due"
    table.succeeded(a.key, now=21.0)
    assert not a.evicted and a.failures == 0
    table.failed(a.key, 22.0)
    table.seen(a.key, "127.0.0.1", 1, "mdns", now=23.0)
    assert a.failures == 0 and a.next_try == 23.0
    table.seen(a.key, "10.1.1.1", 5555, "inbound", now=24.0)
    assert a.address == "127.0.0.1:1", "an inbound connection does not replace the listening address"


def test_a_checkpoint_with_one_flipped_weight_byte_is_refused(tmp_path):
    model = build(ArchSpec("mlp", 8, 3, hidden=(4,), seed=1))
    path = tmp_path / "checkpoint.onnx"
    save_checkpoint(path, model, {"age": 10.0})
    data = bytearray(path.read_bytes())
    weights = model.views[model.specs[0].name].tobytes()
    at = bytes(data).index(weights) + len(weights) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match the checkpoint's digest"):
        load_checkpoint(path, model.fingerprint)


@pytest.mark.parametrize(("state", "problem"), [
    ({"age": "abc"}, "state 'age' must be a number"),
    ({"age": 1e300}, "state 'age' must be a number of samples from 0 to 1e\\+18"),
    ({"age": 1.0, "paused": "yes"}, "'paused' must be true or false"),
    ({"age": 1.0, "counters": {"merges": "many"}}, "'counters' must map names to finite numbers"),
    ({"age": 1.0, "blocked": [7]}, "'blocked' must be a list of node ids"),
    ({"age": 1.0, "gateway_round": -1}, "'gateway_round' must be a whole number"),
])
def test_a_checkpoint_state_of_the_wrong_shape_is_a_typed_error(tmp_path, state, problem):
    model = build(ArchSpec("mlp", 8, 3, hidden=(4,), seed=1))
    save_checkpoint(tmp_path / "checkpoint.onnx", model, state)
    with pytest.raises(ModelError, match=problem):
        load_checkpoint(tmp_path / "checkpoint.onnx", model.fingerprint)


def test_a_checkpoint_behind_a_link_or_not_a_file_is_refused(tmp_path):
    model = build(ArchSpec("mlp", 8, 3, hidden=(4,), seed=1))
    save_checkpoint(tmp_path / "real.onnx", model, {"age": 1.0})
    (tmp_path / "checkpoint.onnx").symlink_to(tmp_path / "real.onnx")
    with pytest.raises(ModelError, match="symbolic link"):
        load_checkpoint(tmp_path / "checkpoint.onnx", model.fingerprint)
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match="symbolic link"):
        load_checkpoint(tmp_path / "zero.onnx", model.fingerprint)
    with pytest.raises(ModelError, match="not a regular file"):
        load_checkpoint("/dev/zero", model.fingerprint)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.onnx", model.fingerprint)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = build(ArchSpec("mlp", 8, 3, hidden=(4,), seed=1))
    path = tmp_path / "checkpoint.onnx"
    save_checkpoint(path, model, {"age": 1234.0, "seq": 7})
    restored, state = load_checkpoint(path, model.fingerprint)
    assert np.array_equal(restored.params, model.params)
    assert state["age"] == 1234.0 and state["seq"] == 7
    assert (path.stat().st_mode & 0o777) == 0o600
    other = build(ArchSpec("mlp", 8, 3, hidden=(5,)))
    with pytest.raises(ModelError, match="different model"):
        load_checkpoint(path, other.fingerprint)
    model.save(tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match="not a gossipfl checkpoint"):
        load_checkpoint(tmp_path / "plain.onnx")


def test_choose_skips_peers_already_in_an_exchange():
    table = PeerTable(period=1.0)
    rng = random.Random(1)
    for name in (b"a", b"b", b"c"):
        table.seen(name * 32, "127.0.0.1", 1, "mdns", now=0.0)
    picks = {table.choose(1.0, rng, exclude={b"a" * 32, b"b" * 32}).key for _ in range(30)}
    assert picks == {b"c" * 32}
    assert table.choose(1.0, rng, exclude={b"a" * 32, b"b" * 32, b"c" * 32}) is None


def test_a_static_address_is_known_by_its_proven_id_once_dialled():
    table = PeerTable(period=1.0)
    static = table.add_static("10.0.0.7", 7878, now=0.0)
    assert static.proven_id is None and static.source == "static"
    assert static.verified  # the operator named it: it competes with proven peers, not with adverts
    assert table.choose(0.0, random.Random(0)) is static  # dialled like any other peer
    assert table.live() == [static]
    node = table.resolved(static, b"n" * 32, "node", now=1.0)
    assert node.proven_id == b"n" * 32 and (node.host, node.port, node.source) == ("10.0.0.7", 7878, "static")
    assert table.get(static.key) is None and [p.key for p in table] == [b"n" * 32]


def test_adverts_nobody_proved_are_capped_and_kept_out_of_a_second_exchange():
    table = PeerTable(period=1.0, failures_to_evict=1, max_unverified=3)
    proven = table.seen(b"p" * 32, "127.0.0.1", 1, "mdns", now=0.0)
    table.succeeded(proven.key, now=0.0)
    fakes = [table.seen(bytes([i]) * 32, "127.0.0.1", 100 + i, "mdns", now=0.0) for i in range(5)]
    assert [f is not None for f in fakes] == [True, True, True, False, False]  # the fourth advert finds no room
    assert table.seen(b"i" * 32, "127.0.0.1", 2, "inbound", now=0.0) is not None  # TLS proved this one
    rng = random.Random(0)
    for _ in range(50):
        chosen = table.choose(0.0, rng, verified_only=True)
        assert chosen is not None and chosen.verified
    assert table.failed(fakes[0].key, now=1.0)  # evicted: the first to go when a new advert needs room
    late = table.seen(b"n" * 32, "127.0.0.1", 3, "mdns", now=2.0)
    assert late is not None and table.get(fakes[0].key) is None
