"""Install gossipfld as a systemd service: the unit, its system user, and a default config.

``prefix`` is a staging root in the sense of ``DESTDIR``: files go to ``{prefix}/etc/...`` while every path
written *inside* them stays absolute on the target system (``/etc/gossipfl/gossipfl.toml``,
``/var/lib/gossipfl``). Tests and image builders install into a temporary root; an operator installs into
``/``, where (as root) ``systemd-sysusers`` and ``systemctl daemon-reload`` are run as well.

Both the unit and the sysusers entry go under ``/etc``, not ``/usr/lib``: an operator running
``gossipfl service install`` is the local administrator, and ``/usr/lib/{systemd/system,sysusers.d}`` belong
to the distribution's package manager (which may own, overwrite, or mount ``/usr`` read-only). ``/etc``
is also where systemd looks first, so our files win over any packaged copy.

The configuration is the operator's, not ours: once it exists and differs from the shipped default, it
is never overwritten; the shipped default is written beside it as ``gossipfl.toml.new`` to merge by hand.
Uninstalling removes what only the service needs (unit, enablement links, sysusers entry) and never the
configuration, the state directory, or the user (files on disk may still belong to it).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gossipfl.atomic import write_bytes_atomic
from gossipfl.errors import ServiceError

log = logging.getLogger("gossipfl.service")

UNIT_NAME = "gossipfl.service"
PLACEHOLDER = "@GOSSIPFLD@"
UNIT_PATH = Path("etc/systemd/system") / UNIT_NAME
SYSUSERS_PATH = Path("etc/sysusers.d/gossipfl.conf")
CONFIG_PATH = Path("etc/gossipfl/gossipfl.toml")
NEW_SUFFIX = ".new"
# Paths the unit's sandbox hides from the daemon: an executable or interpreter there cannot start.
_HIDDEN = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
           "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}
# Characters that need no quoting on a unit's ExecStart= line; anything else is quoted and escaped.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._+-,:=@~")
_COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Step:
    """One thing install/uninstall did, phrased for the operator's terminal.

    ``action`` is one of: wrote, unchanged, kept, removed, absent, ran, skipped.
    """

    action: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ServiceReport:
    """What was written, kept or removed, in order, plus warnings about a service that would not start."""

    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, action: str, target: str | Path, detail: str = "") -> None:
        step = Step(action, str(target), detail)
        log.info("%s", step)
        self.steps.append(step)

    def paths(self, *actions: str) -> list[Path]:
        """Files the given actions touched, e.g. ``paths("wrote")``; commands are not included."""
        return [Path(s.target) for s in self.steps if s.action in actions and s.target.startswith("/")]

    def lines(self) -> list[str]:
        return [str(s) for s in self.steps]


# ---------------------------------------------------------------- shipped files


def _shipped(package: str, name: str) -> bytes:
    """A data file shipped inside the package (see pyproject.toml), in editable and wheel installs alike."""
    try:
        return resources.files(package).joinpath(name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
        raise ServiceError(f"the installed gossipfl lacks {package}/{name} ({exc}); reinstall gossipfl") from None


def shipped_unit_template() -> str:
    return _shipped("gossipfl.systemd", "gossipfl.service").decode("utf-8")


def shipped_sysusers() -> bytes:
    return _shipped("gossipfl.systemd", "gossipfl.sysusers")


def shipped_config() -> bytes:
    return _shipped("gossipfl.configs", "gossipfl.toml")


def default_gossipfld() -> Path:
    """The gossipfld that belongs to this Python: the scripts directory of the running environment.

    Preferred over ``$PATH`` because the unit should run the same installation as the ``gossipfl``
    command that installed it, which matters when several venvs exist.
    """
    candidates = [Path(sysconfig.get_path("scripts")) / "gossipfld", Path(sys.executable).parent / "gossipfld"]
    found = shutil.which("gossipfld")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.absolute()
    raise ServiceError(f"cannot find the gossipfld executable next to {sys.executable} or on PATH; "
                       "pass --gossipfld /path/to/gossipfld")


def exec_path(path: Path) -> str:
    """``path`` as the first word of ExecStart=, quoted and escaped only when it needs to be.

    systemd splits the line on whitespace and expands ``%`` specifiers even in the executable's path, so
    such a path is quoted and its ``%`` doubled. ``$`` needs no escape there: variables are expanded in
    arguments only. Quotes, backslashes and control characters are refused outright, because systemd
    refuses to run an executable whose name holds them ("contains special characters").
    """
    text = str(path)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\"'\\" for ch in text):
        raise ServiceError(f"{text!r}: systemd cannot run an executable whose path holds quotes, backslashes or "
                           "control characters; install gossipfl under a plainer path")
    if set(text) <= _PLAIN:
        return text
    return '"' + text.replace("%", "%%") + '"'


def render_unit(gossipfld: Path) -> bytes:
    """The shipped unit with the placeholder replaced by the absolute path of ``gossipfld``."""
    template = shipped_unit_template()
    if template.count(PLACEHOLDER) != 1:
        raise ServiceError(f"the shipped {UNIT_NAME} must hold {PLACEHOLDER} exactly once; reinstall gossipfl")
    return template.replace(PLACEHOLDER, exec_path(gossipfld)).encode("utf-8")


def _check_gossipfld(gossipfld: Path) -> Path:
    path = gossipfld if gossipfld.is_absolute() else gossipfld.absolute()
    if not path.is_file():
        raise ServiceError(f"{path}: no such gossipfld executable; pass --gossipfld with the right path")
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path}: not executable; chmod +x it or pass --gossipfld with another path")
    return path


def _interpreter(script: Path) -> Path | None:
    """The ``#!`` interpreter of a console script, which the sandbox must be able to see as well."""
    try:
        with script.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].strip().split()
    if not words or words[0].endswith(b"/env"):
        return None
    return Path(os.fsdecode(words[0]))


def sandbox_warnings(gossipfld: Path) -> list[str]:
    """Why the unit's sandbox would hide gossipfld or its Python from the daemon (status 203/EXEC at start).

    Symlinks are resolved because the sandbox hides the real location: a venv under /opt whose python links
    into /root/.pyenv still fails.
    """
    warnings = []
    seen: set[Path] = set()
    interpreter = _interpreter(gossipfld)
    for what, path in (("gossipfld", gossipfld), ("its Python", interpreter)):
        if path is None:
            continue
        for real in (path, path.resolve()):
            for hidden, directive in _HIDDEN.items():
                if real in seen or not real.is_relative_to(hidden):
                    continue
                seen.add(real)
                warnings.append(f"{what} is at {real}, under {hidden}, which the unit's {directive} hides: the "
                                f"service would fail with status 203/EXEC; install gossipfl with a Python outside "
                                f"{', '.join(sorted(_HIDDEN))} (e.g. python3 -m venv /opt/gossipfl)")
    return warnings


# ---------------------------------------------------------------- file operations


def _target(prefix: Path, relative: Path) -> Path:
    return prefix / relative


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ServiceError(f"{path}: is a directory; move it away and install again") from None
    except NotADirectoryError:
        raise ServiceError(f"cannot install under {path.parent}: part of that path is a file, not a directory; "
                           "pass another --prefix") from None
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror or exc}; run as root, or pass another --prefix") \
            from None


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ServiceError(f"cannot create {exc.filename or path.parent}: {exc.strerror or exc}; run as root, "
                           "or pass a writable --prefix") from None
    try:
        write_bytes_atomic(path, data, mode=mode)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}; run as root, or pass a writable --prefix") \
            from None


def _install_file(report: ServiceReport, path: Path, data: bytes) -> None:
    if _read(path) == data:
        report.add("unchanged", path)
        return
    _write(path, data)
    report.add("wrote", path)


def _install_config(report: ServiceReport, path: Path, data: bytes) -> None:
    current = _read(path)
    if current is None:
        _write(path, data)
        report.add("wrote", path)
        return
    if current == data:
        report.add("unchanged", path)
        return
    new = path.with_name(path.name + NEW_SUFFIX)
    report.add("kept", path, "it differs from the shipped default; your edits stay")
    if _read(new) == data:
        report.add("unchanged", new)
        return
    _write(new, data)
    report.add("wrote", new, "the shipped default, to compare with your config")


def _remove(report: ServiceReport, path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        report.add("absent", path)
        return
    except IsADirectoryError:
        raise ServiceError(f"{path}: is a directory, not ours to remove; remove it by hand") from None
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}; run as root") from None
    report.add("removed", path)


# ---------------------------------------------------------------- commands


def _systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 exactly when this directory exists."""
    return Path("/run/systemd/system").is_dir()


def _is_root(prefix: Path) -> bool:
    return prefix.resolve() == Path("/")


def _should_run(prefix: Path, run_commands: bool | None) -> bool:
    if run_commands is not None:
        return run_commands
    return _is_root(prefix) and os.geteuid() == 0


def _run(report: ServiceReport, argv: list[str], *, check: bool = True) -> None:
    exe = shutil.which(argv[0])
    command = " ".join(argv)
    if exe is None:
        report.add("skipped", command, f"{argv[0]} is not installed")
        return
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{command} failed: {exc}") from None
    if proc.returncode != 0 and check:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ServiceError(f"{command} failed: {last}")
    report.add("ran", command, "" if proc.returncode == 0 else f"exit code {proc.returncode}, ignored")


def _daemon_reload(report: ServiceReport) -> None:
    if _systemd_running():
        _run(report, ["systemctl", "daemon-reload"])
    else:
        report.add("skipped", "systemctl daemon-reload", "systemd is not running")


# ---------------------------------------------------------------- public API


def install(prefix: Path = Path("/"), gossipfld: Path | None = None, *,
            run_commands: bool | None = None) -> ServiceReport:
    """Write the unit, the sysusers entry and (unless an edited one exists) the config under ``prefix``.

    Idempotent: files already as shipped are reported ``unchanged`` and not rewritten. ``run_commands``
    None means "when installing into / as root": create the user with systemd-sysusers and reload systemd.
    True with another prefix creates the user inside that root (``systemd-sysusers --root``) and never
    touches the host's systemd. The service is not enabled or started: it cannot run before certificates
    and a model exist.
    """
    prefix = Path(prefix).absolute()
    binary = _check_gossipfld(Path(gossipfld)) if gossipfld is not None else default_gossipfld()
    unit = render_unit(binary)
    report = ServiceReport(warnings=sandbox_warnings(binary))
    for warning in report.warnings:
        log.info("warning: %s", warning)  # the caller decides how to show report.warnings; the CLI prints them
    _install_file(report, _target(prefix, UNIT_PATH), unit)
    _install_file(report, _target(prefix, SYSUSERS_PATH), shipped_sysusers())
    _install_config(report, _target(prefix, CONFIG_PATH), shipped_config())
    if _should_run(prefix, run_commands):
        sysusers = _target(prefix, SYSUSERS_PATH)
        if _is_root(prefix):
            _run(report, ["systemd-sysusers", str(sysusers)])
            _daemon_reload(report)
        else:  # an image being built: create the user in its /etc/passwd, not the host's
            _run(report, ["systemd-sysusers", f"--root={prefix}", str(sysusers)])
    return report


def uninstall(prefix: Path = Path("/"), *, run_commands: bool | None = None) -> ServiceReport:
    """Disable and remove the unit and the sysusers entry; keep the config, the state and the user.

    As root on a running system the service is stopped and disabled first (``systemctl disable --now``),
    so no daemon keeps running from a unit that no longer exists. Under a staging prefix the
    ``*.wants/`` links that ``systemctl enable`` made are removed by hand, which is all disable does.
    """
    prefix = Path(prefix).absolute()
    report = ServiceReport()
    live = _should_run(prefix, run_commands) and _is_root(prefix)
    if live and _systemd_running():
        _run(report, ["systemctl", "disable", "--now", UNIT_NAME], check=False)
    unit = _target(prefix, UNIT_PATH)
    if unit.parent.is_dir():
        links = [*unit.parent.glob(f"*.wants/{UNIT_NAME}"), *unit.parent.glob(f"*.requires/{UNIT_NAME}")]
        for link in sorted(links):
            if link.is_symlink():
                _remove(report, link)
    _remove(report, unit)
    _remove(report, _target(prefix, SYSUSERS_PATH))
    config = _target(prefix, CONFIG_PATH)
    if config.exists():
        report.add("kept", config, "configuration and /var/lib/gossipfl are never removed")
    if live:
        _daemon_reload(report)
    return report
