"""The control socket and every CLI command that uses it, against real running daemons.

Two daemons gossip over static peers (no mDNS needed here); node0 also serves Prometheus metrics on a
loopback port and puts its control socket in a directory other users can reach, so the group rules
can be checked with real processes running under other uids (the tests that need that need root).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gossipfl import cli
from gossipfl.learning.datasets import load_digits, train_test_split, write_csv
from gossipfl.learning.model import Model
from gossipfl.testing.cluster import Cluster, ClusterPlan, NodeSpec, free_port_base, prepare, write_toml

from ..conftest import one_line_error, wait_for

pytestmark = pytest.mark.slow

SOCKET_GROUP = 4242
READER_UID = 4243
OUTSIDER_UID = 4244
MAX_CONNECTIONS = 4
TIMEOUT = 3.0  # long enough that a loaded 2-core CI machine fills every slot before the first expires
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a client under another uid needs root")


class Daemons:
    def __init__(self, cluster: Cluster, specs: list[NodeSpec], socket_path: Path, metrics_port: int,
                 x_test: np.ndarray) -> None:
        self.cluster, self.specs, self.socket, self.metrics_port, self.x_test = (
            cluster, specs, socket_path, metrics_port, x_test)

    def cli(self, *args: str, check: bool = True, user: int | None = None, group: int | None = None,
            sock: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*args, "--socket", str(sock or self.socket)]
        if user is not None:
            proc = _cli_as(user, group if group is not None else user, argv)
        else:
            proc = subprocess.run([sys.executable, "-m", "gossipfl.cli", *argv], capture_output=True, text=True,
                                  timeout=60)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait(self, predicate, timeout: float = 30.0, what: str = "condition"):
        return wait_for(predicate, timeout, what)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    x, y = load_digits()
    x_train, y_train, x_test, _ = train_test_split(x, y, test_fraction=0.25, seed=1)
    root = tmp_path_factory.mktemp("control")
    base = free_port_base()
    specs = prepare(root, ClusterPlan(nodes=2, base_port=base, mdns=False, static_peers=True,
                                      training={"duty_cycle": 0.3}), x_train, y_train)
    # node0's socket lives in a directory every uid can traverse, group-owned by SOCKET_GROUP.
    socket_dir = Path(tempfile.mkdtemp(prefix="gfl-ctl-"))
    socket_dir.chmod(0o755)
    socket_path = socket_dir / "control.sock"
    metrics_port = base + 10
    tables = tomllib.loads(specs[0].config.read_text())
    tables["control"] = {"socket": str(socket_path), "group": str(SOCKET_GROUP), "timeout": TIMEOUT,
                         "max_connections": MAX_CONNECTIONS, "metrics_listen": f"127.0.0.1:{metrics_port}"}
    write_toml(specs[0].config, tables)
    with Cluster(specs) as cluster:
        d = Daemons(cluster, specs, socket_path, metrics_port, x_test)
        d.wait(lambda: d.cli("status", check=False).returncode == 0, what="node0's control socket")
        d.wait(lambda: Daemons(cluster, specs, specs[1].socket, 0, x_test).cli("status", check=False)
               .returncode == 0, what="node1's control socket")
        yield d
    shutil.rmtree(socket_dir, ignore_errors=True)


def _cli_as(uid: int, gid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a forked process that dropped to ``uid``/``gid`` (no supplementary groups).

    Forked rather than exec'd: the interpreter may live where other users cannot read it (a pyenv
    under /root), but the kernel sees the same credentials on the socket either way.
    """
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            os.close(r_out)
            os.close(r_err)
            sys.stdout = open(w_out, "w")  # noqa: SIM115 - closed by os._exit's flush below
            sys.stderr = open(w_err, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = cli.main(argv)
        except BaseException as exc:
            print(f"child failed: {exc!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w_out)
    os.close(w_err)
    with open(r_out) as out, open(r_err) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), stdout, stderr)


def _raw(path: Path, payload: bytes, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)  # the daemon may answer and close before a large request is all sent
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


# ---------------------------------------------------------------- every command, both forms


def test_status_in_both_forms(daemons):
    spec = daemons.specs[0]
    status = daemons.json("status")
    assert status["node_id"] == spec.node_id.hex()
    assert status["name"] == "node0" and status["role"] == "node" and status["mode"] == "gossip"
    assert status["model"]["features"] == 64 and status["model"]["task"] == "classification"
    assert status["uptime"] > 0 and status["train_samples"] > 0
    text = daemons.cli("status").stdout
    assert spec.node_id.hex() in text
    for label in ("role", "model", "age", "training", "validation", "peers", "problems", "uptime"):
        assert any(line.startswith(label) for line in text.splitlines()), (label, text)


def test_peers_in_both_forms(daemons):
    other = daemons.specs[1].node_id.hex()
    # node1 may dial us before we dial its static address: until then it is known only as "inbound-only"
    peers = daemons.wait(lambda: [p for p in daemons.json("peers") if p["node_id"] == other and p["exchanges"] > 0
                                  and p["state"] == "live"], what="an exchange with node1 at its static address")
    assert 0 < peers[0]["bytes_out"] < peers[0]["wire_out"]  # the wire carries TLS too
    assert peers[0]["name"] == "node1"  # the name its certificate was issued for
    assert peers[0]["address"] == f"127.0.0.1:{daemons.specs[1].port}"
    text = daemons.cli("peers").stdout
    assert text.splitlines()[0].split()[:4] == ["NODE", "NAME", "ADDRESS", "STATE"]
    assert any(line.startswith(other[:12]) and " node1 " in line and " live " in line
               for line in text.splitlines()), text


def test_a_paused_peer_shows_as_paused_not_evicted(daemons):
    node1 = Daemons(daemons.cluster, daemons.specs, daemons.specs[1].socket, 0, daemons.x_test)
    other = daemons.specs[1].node_id.hex()
    node1.cli("pause")
    try:
        daemons.wait(lambda: daemons.json("status")["counters"].get("failed.peer-paused", 0) > 0,
                     what="node0's push to be refused as paused")
        peer = next(p for p in daemons.json("peers") if p["node_id"] == other)
        assert peer["state"] == "paused" and peer["failures"] == 0, peer
        assert daemons.json("status")["counters"].get("evictions", 0) == 0
    finally:
        node1.cli("resume")
    # node1 dials node0 again once it resumes: then it is live, with no operator step
    daemons.wait(lambda: next(p for p in daemons.json("peers") if p["node_id"] == other)["state"] == "live",
                 what="node1 to be live again after its resume")


def test_metrics_in_both_forms_and_over_http(daemons):
    daemons.wait(lambda: daemons.json("status")["counters"].get("exchanges_out", 0) > 0, what="an exchange")
    text = daemons.cli("metrics").stdout
    assert "# TYPE gossipfl_exchanges_total counter" in text
    assert 'gossipfl_exchanges_total{direction="out"}' in text
    age = [line for line in text.splitlines() if line.startswith("gossipfl_model_age ")]
    assert age and float(age[0].split()[1]) > 0
    assert "gossipfl_loop_lag_max_seconds" in text and "gossipfl_control_requests_total" in text
    assert 'gossipfl_wire_bytes_total{direction="in"}' in text
    parsed = json.loads(daemons.cli("metrics", "--json").stdout)
    assert any(s["labels"] == {"direction": "out"} and s["value"] > 0 for s in parsed["gossipfl_exchanges_total"])
    assert parsed["gossipfl_model_age"][0]["value"] > 0
    url = f"http://127.0.0.1:{daemons.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "gossipfl_model_age" in reply.read().decode()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{daemons.metrics_port}/other", timeout=10)
    assert info.value.code == 404


def test_pause_stops_training_and_resume_restarts_it(daemons):
    assert daemons.cli("pause").stdout.strip() == "paused: training and gossip"
    daemons.wait(lambda: not daemons.json("status")["training"], what="training to stop")
    steps = daemons.json("status")["counters"]["train_steps"]
    time.sleep(1.5)
    status = daemons.json("status")
    assert status["paused"] is True and status["counters"]["train_steps"] == steps
    assert "paused" in daemons.cli("status").stdout
    assert daemons.cli("resume").stdout.strip() == "resumed: training and gossip"
    daemons.wait(lambda: daemons.json("status")["counters"]["train_steps"] > steps, what="training to resume")
    assert daemons.json("pause") == {"paused": True}
    assert daemons.json("resume") == {"paused": False}


def test_export_and_predict_through_the_daemon_match_offline(daemons, tmp_path):
    daemons.cli("pause")  # freeze the model so the export and the predictions see the same parameters
    try:
        daemons.wait(lambda: not daemons.json("status")["training"], what="training to stop")
        out = tmp_path / "exported.onnx"
        summary = json.loads(daemons.cli("model", "export", "--out", str(out), "--json").stdout)
        model = Model.load(out)
        assert summary["fingerprint"] == model.fingerprint_hex == daemons.json("status")["fingerprint"]
        assert "gossipfl.state" not in model.metadata  # a standalone model, not a checkpoint
        human = daemons.cli("model", "export", "--out", str(tmp_path / "again.onnx")).stdout
        assert human.startswith(f"wrote {tmp_path / 'again.onnx'}")
        rows = tmp_path / "rows.csv"
        write_csv(rows, daemons.x_test[:300], np.zeros(300, dtype=np.int64))
        online = [int(v) for v in daemons.cli("predict", "--input", str(rows)).stdout.split()]
        offline = [int(v) for v in daemons.cli("predict", "--model", str(out), "--input", str(rows)).stdout.split()]
        assert len(online) == 300 and online == offline
        as_json = json.loads(daemons.cli("predict", "--input", str(rows), "--json").stdout)
        assert [r["label"] for r in as_json] == online and len(as_json[0]["scores"]) == 10
    finally:
        daemons.cli("resume")


def test_block_and_unblock_a_peer(daemons):
    node1 = daemons.specs[1].node_id.hex()
    assert "blocked" in daemons.cli("peer", "block", node1).stdout
    assert daemons.json("status")["blocked"] == [node1]
    daemons.wait(lambda: daemons.json("status")["counters"].get("refused.blocked", 0) > 0,
                 what="node1's pushes to be refused")
    assert any(p["node_id"] == node1 and p["state"] == "blocked" for p in daemons.json("peers"))
    problems = [ln for ln in daemons.cli("status").stdout.splitlines() if ln.startswith("problems")]
    assert problems and "refused" in problems[0] and "blocked" in problems[0], problems
    assert daemons.cli("peer", "unblock", node1).stdout.startswith(f"unblocked {node1}")
    assert json.loads(daemons.cli("peer", "block", node1, "--json").stdout) == {"blocked": [node1]}
    assert json.loads(daemons.cli("peer", "unblock", node1, "--json").stdout) == {"blocked": []}
    line = one_line_error(daemons.cli("peer", "unblock", node1, check=False))
    assert "is not blocked" in line
    line = one_line_error(daemons.cli("peer", "block", "not-an-id", check=False))
    assert "give a peer's name, its node id, or at least 4 of its first hex digits" in line
    assert daemons.cli("peer", "block", "node1").stdout.startswith(f"blocked {node1}")  # by its name
    assert daemons.cli("peer", "unblock", "NODE1").stdout.startswith(f"unblocked {node1}")
    assert daemons.cli("peer", "block", node1[:8]).stdout.startswith(f"blocked {node1}")  # a unique prefix
    assert daemons.json("status")["blocked"] == [node1]
    assert daemons.cli("peer", "unblock", node1[:8]).stdout.startswith(f"unblocked {node1}")
    nobody = next(p for p in (f"{i:04x}" for i in range(65536))
                  if not any(s.node_id.hex().startswith(p) for s in daemons.specs))
    line = one_line_error(daemons.cli("peer", "block", nobody, check=False))
    assert "matches 0 peers" in line


# ---------------------------------------------------------------- refusals and limits


def test_a_stopped_daemon_is_one_line_and_exit_code_3(daemons, tmp_path):
    proc = daemons.cli("status", check=False, sock=tmp_path / "nothing.sock")
    assert proc.returncode == 3
    assert "not running" in one_line_error(proc)


@needs_root
def test_a_caller_outside_the_group_is_refused(daemons):
    proc = daemons.cli("status", check=False, user=OUTSIDER_UID, group=OUTSIDER_UID)
    assert proc.returncode == 4
    assert "permission denied" in one_line_error(proc)


@needs_root
def test_a_group_member_may_read_but_not_pause(daemons):
    status = json.loads(daemons.cli("status", "--json", user=READER_UID, group=SOCKET_GROUP).stdout)
    assert status["node_id"] == daemons.specs[0].node_id.hex()
    proc = daemons.cli("pause", check=False, user=READER_UID, group=SOCKET_GROUP)
    assert proc.returncode == 4
    assert "only root and the daemon's own user" in one_line_error(proc)
    assert daemons.json("status")["paused"] is False


def test_malformed_requests_get_clear_errors(daemons):
    too_big = _raw(daemons.socket, b'{"v":1,"command":"status","args":{"pad":"' + b"x" * (2 << 20) + b'"}}\n')
    assert too_big["ok"] is False and too_big["error"]["code"] == "too_large"
    for payload, code in ((b"{not json\n", "bad_request"), (b"[1,2]\n", "bad_request"),
                          (b'{"v":1,"command":"reboot"}\n', "unknown_command"),
                          (b'{"v":99,"command":"status"}\n', "version"),
                          (b'{"v":1,"command":"predict","args":{"rows":[[1,2]]}}\n', "bad_request")):
        reply = _raw(daemons.socket, payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, (payload, reply)
        assert reply["error"]["message"]
    assert daemons.json("status")["counters"]["control.bad_request"] >= 3


def test_hostile_requests_get_bad_request_and_never_end_the_daemon(daemons):
    """Each of these ended the daemon (exit 1, a crash loop under systemd) before the parser was bounded."""
    pid = daemons.cluster.procs[daemons.specs[0].name].pid
    row = ",".join(["1"] * daemons.json("status")["model"]["features"])
    hostile = [
        b"[" * 200_000 + b"\n",  # nesting: json recursed until the interpreter gave up
        b'{"v":1,"command":"status","args":{"n":' + b"9" * 5000 + b"}}\n",  # a 5,000-digit integer
        b'{"v":1,"command":"predict","args":{"rows":[[' + b"1" * 400 + b"," + row.encode()[2:] + b"]]}}\n",
        b'{"v":1,"command":"predict","args":{"rows":[[1e39,' + row.encode()[2:] + b"]]}}\n",  # float32 inf
        b'{"v":1,"command":"status","args":{"n":NaN}}\n',
        b'{"v":1,"command":"peer.block","args":{"id":' + b"[" * 50 + b"]" * 50 + b"}}\n",
    ]
    for payload in hostile:
        reply = _raw(daemons.socket, payload)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (payload[:60], reply)
    assert daemons.cluster.procs[daemons.specs[0].name].poll() is None
    status = daemons.json("status")
    assert daemons.cluster.procs[daemons.specs[0].name].pid == pid
    assert status["counters"]["control.bad_request"] >= len(hostile)


@needs_root
def test_a_group_member_holding_every_slot_cannot_lock_the_operator_out(daemons):
    """A reader may fill the reader slots with idle connections; root's slot stays free (it got busy before)."""
    def busy() -> int:
        return _raw(daemons.socket, b'{"v":1,"command":"status"}\n')["result"]["counters"].get("control.busy", 0)

    before = busy()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a group member that opens every connection it can and says nothing
        code = 99
        try:
            os.setgroups([])
            os.setgid(SOCKET_GROUP)
            os.setuid(READER_UID)
            held = []
            for _ in range(MAX_CONNECTIONS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(daemons.socket))
                held.append(sock)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"x"
        # One reader uid holds at most half the reader slots: the rest of its connections are turned away.
        wait_for(lambda: busy() >= before + MAX_CONNECTIONS - 1, TIMEOUT, "the reader's extra connections refused")
        reply = _raw(daemons.socket, b'{"v":1,"command":"status"}\n')
        assert reply["ok"] is True, reply
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_silent_clients_time_out_and_the_daemon_keeps_serving(daemons):
    silent = []
    try:
        for _ in range(MAX_CONNECTIONS - 1):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemons.socket))
            silent.append(sock)
        # one slot left: others are still served (asked in-process: a CLI start-up could outlast TIMEOUT)
        assert _raw(daemons.socket, b'{"v":1,"command":"status"}\n')["ok"] is True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemons.socket))
        silent.append(sock)
        time.sleep(0.2)
        over = _raw(daemons.socket, b"")  # the connection over the limit is turned away at once
        assert over["error"]["code"] == "busy"
        for sock in silent:
            sock.settimeout(TIMEOUT * 5)
            reply = json.loads(sock.recv(65536))
            assert reply["error"]["code"] == "timeout"
    finally:
        for sock in silent:
            sock.close()
    assert daemons.json("status")["node_id"] == daemons.specs[0].node_id.hex()


def test_pause_and_blocks_survive_a_restart(daemons):
    node1 = daemons.specs[1].node_id.hex()
    daemons.cli("pause")
    daemons.cli("peer", "block", node1)
    spec = daemons.specs[0]
    assert daemons.cluster.stop(spec) == 0
    daemons.cluster.start(spec)
    daemons.wait(lambda: daemons.cli("status", check=False).returncode == 0, what="node0 to come back")
    status = daemons.json("status")
    assert status["paused"] is True and status["blocked"] == [node1]
    daemons.cli("resume")
    daemons.cli("peer", "unblock", node1)
