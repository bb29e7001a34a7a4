"""``gossipfl demo``: a real cluster of daemons on loopback, its summary and plot, and that it leaves nothing behind."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossipfl.cli.demo import MARKER, DemoError, fresh_directory, sparkline
from gossipfl.cli.demo_processes import kill_leftovers, pids_mentioning

from ..conftest import wait_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(r"^\s+(node\d+)\s+(node|client|gateway)\s+([01]\.\d{4})\s")


def demo(out: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gossipfl.cli", "demo", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_daemons(out: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sockets = list((out / "cluster").glob("node*/control.sock"))
        if len(sockets) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} daemons did not open their control sockets within {timeout:.0f} s")


@pytest.mark.slow
def test_demo_runs_a_cluster_plots_it_and_stops_every_daemon(tmp_path):
    out = tmp_path / "out"
    proc = demo(out, "--nodes", "3", "--seconds", "15")
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        proc.kill()
        left = kill_leftovers(tmp_path)
    assert proc.returncode == 0, stderr
    assert not left, f"gossipfld processes left behind: {left}"
    png = out / "accuracy.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert str(png) in stdout and "gossipfld.log" in stdout

    summary = stdout[stdout.index("summary:"):]
    finals = {m[1]: float(m[3]) for line in summary.splitlines() if (m := ROW.match(line))}
    assert set(finals) == {"node0", "node1", "node2"}, summary
    untrained = float(re.search(r"untrained model: ([01]\.\d+)", summary)[1])
    central = float(re.search(r"\(reference, this run\): ([01]\.\d+)", summary)[1])
    assert untrained < 0.3 and central > 0.9, summary
    assert all(acc > untrained + 0.3 for acc in finals.values()), summary
    # Beside each node, the same model trained on its shard alone: what the fleet is worth to it.
    alone = float(re.search(r"trained alone on its own shard \(same model, this run\): mean ([01]\.\d+)", summary)[1])
    assert untrained < alone < central, summary
    assert "learning together gained" in summary and summary.count(" pt ") >= 3, summary
    assert (out / "summary.txt").read_text().splitlines()[0] == summary.splitlines()[0]
    # Not a terminal: compact progress lines, not a redrawn table.
    progress = [line for line in stdout.splitlines() if "held-out acc" in line]
    assert 2 <= len(progress) <= 8, stdout
    assert "\x1b[" not in stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_run_stops_every_daemon_promptly(tmp_path, sig):
    out = tmp_path / "out"
    proc = demo(out, "--nodes", "3", "--seconds", "120")
    try:
        wait_for_daemons(out, 3, timeout=60)
        assert len(pids_mentioning(out / "cluster")) == 3  # the daemons, each in its own session
        time.sleep(2)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        left = kill_leftovers(tmp_path)
    assert proc.returncode == 128 + sig, stderr
    assert took < 10, took
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not left, f"gossipfld processes left behind: {left}"
    assert not (out / "accuracy.png").exists()


@pytest.mark.slow
def test_fedavg_mode_runs_a_gateway_and_its_clients(tmp_path):
    out = tmp_path / "out"
    proc = demo(out, "--nodes", "2", "--mode", "fedavg", "--seconds", "12")
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        proc.kill()
        left = kill_leftovers(tmp_path)
    assert proc.returncode == 0, stderr
    assert not left, left
    roles = {m[1]: m[2] for line in stdout.splitlines() if (m := ROW.match(line))}
    assert roles == {"node0": "gateway", "node1": "client", "node2": "client"}, stdout
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_the_demo_replaces_only_its_own_directory(tmp_path):
    mine = tmp_path / "mine"
    fresh_directory(mine)
    (mine / "old").write_text("from the previous run")
    fresh_directory(mine)
    assert (mine / MARKER).exists() and not (mine / "old").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep").write_text("not the demo's")
    with pytest.raises(DemoError, match="not a gossipfl demo directory"):
        fresh_directory(foreign)
    assert (foreign / "keep").exists()


def test_leftovers_are_found_by_their_directory(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "x")])
    try:
        # Until the child has exec'd, its /proc cmdline is still the parent's: wait for it to name the directory.
        assert wait_for(lambda: pids_mentioning(tmp_path), 10, "the child's command line") == [sleeper.pid]
        assert kill_leftovers(tmp_path) == [sleeper.pid]
        assert sleeper.wait(10) == -signal.SIGKILL
        assert pids_mentioning(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_command_line_options():
    from gossipfl.cli.app import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.nodes, args.mode, args.seconds, args.out, args.offline) == (4, "gossip", 60.0, "demo-out", False)
    args = build_parser().parse_args(["demo", "--nodes", "6", "--mode", "fedavg", "--seconds", "30", "--out", "x"])
    assert isinstance(args, argparse.Namespace) and (args.nodes, args.mode, args.seconds) == (6, "fedavg", 30.0)
    for bad in (["--nodes", "1"], ["--mode", "central"], ["--seconds", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *bad])
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([0.95, 0.96, 0.97]) == "▁▅█"  # its own range: late history is not a solid bar
