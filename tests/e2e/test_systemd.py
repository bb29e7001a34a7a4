"""The systemd service: installed into temporary roots and checked with systemd's own offline tools.

Nothing here needs systemd as PID 1 or touches the host's /etc: every install goes to a tmp prefix.
``systemd-analyze verify`` and ``security --offline`` read unit files directly; ``systemd-sysusers
--root`` writes the user into the prefix's own /etc/passwd.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gossipfl.cli import service
from gossipfl.config import load_config
from gossipfl.errors import ServiceError
from tests.conftest import one_line_error, run_cli

GOSSIPFLD = Path(sys.executable).parent / "gossipfld"
MAX_EXPOSURE = 3.0
SCORE = re.compile(r"Overall exposure level for gossipfl\.service: (\d+\.\d+) (\S+)")


def _tool(name: str) -> str:
    """A systemd tool; its absence fails the run as root (CI installs it) and skips it otherwise."""
    path = shutil.which(name)
    if path is None:
        if os.geteuid() == 0:
            pytest.fail(f"{name} is missing; .ci/run installs it (apt-get install systemd)")
        pytest.skip(f"{name} is missing and only root can install it (apt-get install systemd)")
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    # --man=no: no Documentation= pages to look up; verify's other checks (keys, values, ExecStart=
    # executable, dependencies) all work without systemd running.
    return _run(_tool("systemd-analyze"), "verify", "--man=no", str(unit))


def _installed(prefix: Path) -> tuple[Path, Path, Path]:
    return prefix / service.UNIT_PATH, prefix / service.SYSUSERS_PATH, prefix / service.CONFIG_PATH


def _unit_values(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(f"{key}=")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("root")
    service.install(prefix, GOSSIPFLD)
    return prefix


def test_install_writes_unit_sysusers_and_config(tmp_path: Path) -> None:
    assert GOSSIPFLD.is_file(), "the venv's gossipfld is missing; run make install"
    report = service.install(tmp_path)  # default: the gossipfld beside this Python
    unit, sysusers, config = _installed(tmp_path)
    assert sysusers == tmp_path / "etc/sysusers.d/gossipfl.conf"
    assert report.paths("wrote") == [unit, sysusers, config]
    assert _unit_values(unit, "ExecStart") == [f"{GOSSIPFLD} --config /etc/gossipfl/gossipfl.toml"]
    assert service.PLACEHOLDER not in unit.read_text()
    assert sysusers.read_bytes() == service.shipped_sysusers()
    assert config.read_bytes() == service.shipped_config()
    for path in (unit, sysusers, config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.rglob("*.tmp"))


def test_unit_matches_the_design(installed: Path) -> None:
    unit = installed / service.UNIT_PATH
    values = {key: _unit_values(unit, key) for key in (
        "Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartPreventExitStatus", "User", "Group",
        "StateDirectory", "StateDirectoryMode", "RuntimeDirectory", "RuntimeDirectoryMode", "ConfigurationDirectory",
        "RestrictAddressFamilies", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter", "PrivateNetwork", "MemoryDenyWriteExecute")}
    assert values == {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["2"], "User": ["gossipfl"], "Group": ["gossipfl"],
        "StateDirectory": ["gossipfl"], "StateDirectoryMode": ["0700"], "RuntimeDirectory": ["gossipfl"],
        "RuntimeDirectoryMode": ["0750"], "ConfigurationDirectory": ["gossipfl"],
        "RestrictAddressFamilies": ["AF_UNIX AF_NETLINK AF_INET AF_INET6"], "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"], "PrivateTmp": ["yes"], "PrivateDevices": ["yes"], "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""], "SystemCallFilter": ["@system-service"],
        "PrivateNetwork": [], "MemoryDenyWriteExecute": [],  # they would break multicast and libffi
    }


def test_systemd_analyze_verify_passes(installed: Path) -> None:
    proc = _verify(installed / service.UNIT_PATH)
    # verify exits 0 even for unknown keys and bad values, which it only reports on stderr.
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_verify_catches_what_we_rely_on_it_for(tmp_path: Path) -> None:
    """The two checks above mean something: a typo and a missing executable are both reported."""
    unit = tmp_path / "gossipfl.service"
    text = (service.render_unit(GOSSIPFLD)).decode()
    unit.write_text(text.replace("ProtectHome=yes", "ProtectHomme=yes"))
    assert "ProtectHomme" in _verify(unit).stderr
    unit.write_text(text.replace(str(GOSSIPFLD), str(tmp_path / "no-such-gossipfld")))
    proc = _verify(unit)
    assert proc.returncode != 0 and "no-such-gossipfld" in proc.stderr


def test_security_exposure_is_ok(installed: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = str(installed / service.UNIT_PATH)
    # --threshold is in tenths of the printed 0.0-10.0 score: exit 1 if the exposure is above 3.0.
    proc = _run(analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", unit)
    match = SCORE.search(proc.stdout)
    assert match, proc.stdout + proc.stderr
    score, label = float(match.group(1)), match.group(2)
    assert proc.returncode == 0, f"exposure {score} {label}"
    assert score <= MAX_EXPOSURE
    assert label == "OK"
    # and the threshold really is enforced: one tenth under our score fails
    stricter = _run(analyze, "security", "--offline=true", f"--threshold={round(score * 10) - 1}", "--no-pager", unit)
    assert stricter.returncode != 0


def test_sysusers_creates_the_user_in_the_prefix(tmp_path: Path) -> None:
    _tool("systemd-sysusers")
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers --root writes files owned by root; needs root")
    report = service.install(tmp_path, GOSSIPFLD, run_commands=True)
    assert any(s.action == "ran" and s.target.startswith("systemd-sysusers --root=") for s in report.steps)
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    (user,) = [line.split(":") for line in passwd if line.startswith("gossipfl:")]
    assert user[5] == "/var/lib/gossipfl"
    assert user[6].endswith("nologin")
    assert any(line.startswith(f"gossipfl:x:{user[3]}:") for line in (tmp_path / "etc/group").read_text().splitlines())


def test_second_install_is_idempotent(tmp_path: Path) -> None:
    service.install(tmp_path, GOSSIPFLD)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _installed(tmp_path)}
    report = service.install(tmp_path, GOSSIPFLD)
    assert {s.action for s in report.steps} == {"unchanged"}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _installed(tmp_path)} == before
    assert not (tmp_path / "etc/gossipfl/gossipfl.toml.new").exists()


def test_reinstall_keeps_an_edited_config_and_writes_new(tmp_path: Path) -> None:
    service.install(tmp_path, GOSSIPFLD)
    config = tmp_path / service.CONFIG_PATH
    edited = config.read_text().replace('name = "gossipfl-node"', 'name = "pi-kitchen"')
    config.write_text(edited)
    report = service.install(tmp_path, GOSSIPFLD)
    new = config.with_name("gossipfl.toml.new")
    assert config.read_text() == edited
    assert new.read_bytes() == service.shipped_config()
    assert [str(s) for s in report.steps if s.action in ("kept", "wrote")] == [
        f"kept {config} (it differs from the shipped default; your edits stay)",
        f"wrote {new} (the shipped default, to compare with your config)",
    ]
    again = service.install(tmp_path, GOSSIPFLD)
    assert [s.action for s in again.steps] == ["unchanged", "unchanged", "kept", "unchanged"]


def test_uninstall_removes_the_unit_and_keeps_config_and_state(tmp_path: Path) -> None:
    service.install(tmp_path, GOSSIPFLD)
    unit, sysusers, config = _installed(tmp_path)
    wants = unit.parent / "multi-user.target.wants" / service.UNIT_NAME  # as `systemctl enable` leaves it
    wants.parent.mkdir()
    wants.symlink_to(unit)
    checkpoint = tmp_path / "var/lib/gossipfl/state/checkpoint.onnx"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"model")
    report = service.uninstall(tmp_path)
    assert report.paths("removed") == [wants, unit, sysusers]
    assert not unit.exists() and not sysusers.exists() and not wants.is_symlink()
    assert config.read_bytes() == service.shipped_config()
    assert checkpoint.read_bytes() == b"model"
    assert {s.action for s in service.uninstall(tmp_path).steps} == {"absent", "kept"}


def test_unusual_gossipfld_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    odd = tmp_path / "my venv %i $HOME" / "bin"
    odd.mkdir(parents=True)
    exe = odd / "gossipfld"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    prefix = tmp_path / "root"
    service.install(prefix, exe)
    unit = prefix / service.UNIT_PATH
    (exec_start,) = _unit_values(unit, "ExecStart")
    assert exec_start == f'"{str(exe).replace("%", "%%")}" --config /etc/gossipfl/gossipfl.toml'
    proc = _verify(unit)  # verify unquotes and unescapes the path as systemd would, and finds it executable
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("char", ['"', "'", "\\", "\n"])
def test_paths_systemd_cannot_run_are_refused(tmp_path: Path, char: str) -> None:
    odd = tmp_path / f"a{char}b"
    odd.mkdir()
    exe = odd / "gossipfld"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with pytest.raises(ServiceError, match="systemd cannot run"):
        service.install(tmp_path / "root", exe)
    assert not (tmp_path / "root").exists()


def test_gossipfld_must_be_an_executable(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="no such gossipfld"):
        service.install(tmp_path, tmp_path / "missing")
    plain = tmp_path / "gossipfld"
    plain.write_text("not a program")
    plain.chmod(0o644)
    with pytest.raises(ServiceError, match="not executable"):
        service.install(tmp_path, plain)
    assert not (tmp_path / "etc").exists()


def test_sandbox_warnings(tmp_path: Path) -> None:
    script = tmp_path / "gossipfld"
    script.write_text("#!/home/alice/venv/bin/python\n")
    script.chmod(0o755)
    warnings = service.sandbox_warnings(script)
    assert any("ProtectHome=yes" in w and "/home/alice/venv/bin/python" in w for w in warnings)
    if tmp_path.resolve().is_relative_to("/tmp"):
        assert any("PrivateTmp=yes" in w for w in warnings)


def test_shipped_config_fits_the_unit(installed: Path) -> None:
    """The default config loads, and points where the unit's sandbox lets the daemon read and write."""
    config = load_config(installed / service.CONFIG_PATH)
    assert (config.node.role, config.node.mode) == ("node", "gossip")
    assert config.node.state_dir.is_relative_to("/var/lib/gossipfl")  # StateDirectory=gossipfl
    assert config.data.directory.is_relative_to("/var/lib/gossipfl")
    assert config.control.socket.parent == Path("/run/gossipfl")  # RuntimeDirectory=gossipfl
    for path in (config.tls.cert, config.tls.key, config.tls.ca, config.model.path):
        assert path.is_relative_to("/etc/gossipfl")  # ConfigurationDirectory=gossipfl


# ---------------------------------------------------------------- the CLI


def test_cli_install_and_uninstall(tmp_path: Path) -> None:
    unit, sysusers, config = _installed(tmp_path)
    proc = run_cli("service", "install", "--prefix", str(tmp_path), "--gossipfld", str(GOSSIPFLD))
    assert proc.stdout.splitlines() == [f"wrote {unit}", f"wrote {sysusers}", f"wrote {config}"]
    assert "Traceback" not in proc.stderr
    proc = run_cli("service", "install", "--prefix", str(tmp_path))
    assert proc.stdout.splitlines() == [f"unchanged {unit}", f"unchanged {sysusers}", f"unchanged {config}"]
    proc = run_cli("service", "uninstall", "--prefix", str(tmp_path))
    assert proc.stdout.splitlines() == [
        f"removed {unit}", f"removed {sysusers}",
        f"kept {config} (configuration and /var/lib/gossipfl are never removed)"]
    assert config.exists()


def test_cli_unwritable_prefix_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(run_cli("service", "install", "--prefix", str(blocker / "root"), check=False))
    assert line.startswith("gossipfl: error: cannot install under ") and "--prefix" in line


def test_cli_read_only_prefix_is_one_line(tmp_path: Path) -> None:
    prefix = tmp_path / "ro"
    prefix.mkdir()
    prefix.chmod(0o555)
    argv = [sys.executable, "-m", "gossipfl.cli", "service", "install", "--prefix", str(prefix)]
    if os.geteuid() == 0:
        # root ignores permission bits; without CAP_DAC_OVERRIDE it obeys them like anyone else
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root this needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        line = one_line_error(proc)
        assert line == f"gossipfl: error: cannot create {prefix / 'etc'}: Permission denied; run as root, " \
                       "or pass a writable --prefix"
    finally:
        prefix.chmod(0o755)
