"""Simulated hosts for end-to-end tests: Linux network namespaces joined by one bridge.

A :class:`Lab` is N host namespaces, each with a veth ``eth0`` (and ``lo`` up) whose other end sits in a bridge
``br0`` that lives in a namespace of its own, so the machine's own network is never touched: nothing is created
in the root namespace, and all addresses (10.77.0.0/24 by default) exist only inside the lab.

    from gossipfl.testing.netns import netns_lab, require_netns

    def test_something():
        require_netns()                      # pytest.skip with the reason where root or `ip netns` is missing
        with netns_lab(3) as lab:            # hosts 10.77.0.1, .2, .3 on one bridge
            proc = lab.hosts[0].popen([sys.executable, "-m", "gossipfld.discovery", "--interface",
                                       lab.hosts[0].address])
            lab.cut(lab.hosts[2])            # unplug host 2 (its bridge port goes down)
            lab.partition([0, 1], [2])       # or split the bridge: groups can talk only inside themselves
            lab.heal()                       # everything back on br0, all ports up

Namespace names carry the pid and a counter (``gfl<pid>n<k>h<i>``), so parallel runs never clash;
:func:`cleanup_stale` removes the namespaces of lab owners that are no longer running. On exit every process still
inside a lab namespace is killed (they were all started by the test) and the namespaces are deleted, also when
the test failed.

Multicast (mDNS) crosses the bridge as it is: veths are multicast-capable and zeroconf picks the outgoing
interface with IP_MULTICAST_IF, so no multicast route is needed; IGMP snooping is switched off on the bridge so
that link-local groups are flooded whatever the bridge has learnt.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

PREFIX = "gfl"
_counter = itertools.count()
_NAME = re.compile(rf"{PREFIX}(\d+)n\d+(?:br|h\d+)")

_REACH_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError:
    sys.exit(0)  # an RST came back: the host is there
except OSError:
    sys.exit(1)  # timeout or unreachable
sys.exit(0)
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}n{next(_counter)}br"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
        done = _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1", check=False)
        if done.returncode != 0:
            return f"cannot create veth pairs: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require_netns() -> None:
    """Skip the calling test, with the reason, where network namespaces are not available."""
    import pytest

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _kill_all_in(ns: str) -> None:
    """Kill the processes inside one of our namespaces (the test started them all), then wait for them to go."""
    done = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in done.stdout.split()] if done.returncode == 0 else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if pids:
            time.sleep(0.02)


def _delete(ns: str) -> None:
    _kill_all_in(ns)
    _ip("netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete lab namespaces left behind by test runs whose process is gone (e.g. killed). Returns their names."""
    done = _ip("netns", "list", check=False)
    removed = []
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete(name)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One simulated host: a namespace with ``lo`` and ``eth0`` (``address``/prefix) plugged into the bridge."""

    index: int
    ns: str
    address: str
    prefixlen: int
    port: str  # the veth end in the bridge namespace

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.cmd(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)

    def can_reach(self, address: str, timeout: float = 1.0, port: int = 9) -> bool:
        """Whether a TCP SYN from this host to ``address`` is answered (an RST counts): a ping without ICMP tools.

        Only for addresses inside the lab."""
        done = self.run([sys.executable, "-c", _REACH_SCRIPT, address, str(port), str(timeout)],
                        check=False, timeout=timeout + 30)
        return done.returncode == 0


@dataclass
class Lab:
    """N hosts on one bridge; see the module docstring."""

    name: str
    bridge_ns: str
    hosts: list[Host] = field(default_factory=list)
    _bridges: set[str] = field(default_factory=lambda: {"br0"})

    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts] + [self.bridge_ns]

    def _host(self, host: Host | int) -> Host:
        return self.hosts[host] if isinstance(host, int) else host

    def _ensure_bridge(self, bridge: str) -> None:
        if bridge not in self._bridges:
            _ip("-n", self.bridge_ns, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.bridge_ns, "link", "set", bridge, "up")
            self._bridges.add(bridge)

    def cut(self, *hosts: Host | int) -> None:
        """Unplug hosts: their bridge ports go down, so they reach nobody and nobody reaches them."""
        for h in hosts:
            _ip("-n", self.bridge_ns, "link", "set", self._host(h).port, "down")

    def partition(self, *groups: Iterable[Host | int]) -> None:
        """Split the network: each group gets a bridge of its own; hosts in no group are cut."""
        placed: set[int] = set()
        for i, group in enumerate(groups):
            bridge = f"br{i}"
            self._ensure_bridge(bridge)
            for h in map(self._host, group):
                _ip("-n", self.bridge_ns, "link", "set", h.port, "master", bridge)
                _ip("-n", self.bridge_ns, "link", "set", h.port, "up")
                placed.add(h.index)
        self.cut(*(h for h in self.hosts if h.index not in placed))

    def heal(self, *hosts: Host | int) -> None:
        """Plug hosts (all by default) back into ``br0`` with their ports up.

        Neighbour (ARP) caches are flushed too: an entry left INCOMPLETE by the cut would otherwise wait for
        the kernel's next ARP retry (1 s) before the host is reachable again."""
        for h in map(self._host, hosts or self.hosts):
            _ip("-n", self.bridge_ns, "link", "set", h.port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", h.port, "up")
        for h in self.hosts:
            _ip("-n", h.ns, "neigh", "flush", "dev", "eth0", check=False)

    def close(self) -> None:
        for ns in self.namespaces():
            _delete(ns)


@contextlib.contextmanager
def netns_lab(n: int, subnet: str = "10.77.0.0/24") -> Iterator[Lab]:
    """Create ``n`` hosts on one bridge, addresses ``subnet``.1 .. .n; delete everything on exit."""
    net = ipaddress.ip_network(subnet)
    if n < 1 or n > net.num_addresses - 2:
        raise ValueError(f"{n} hosts do not fit in {subnet}")
    cleanup_stale()
    name = f"{PREFIX}{os.getpid()}n{next(_counter)}"
    lab = Lab(name=name, bridge_ns=f"{name}br")
    try:
        _ip("netns", "add", lab.bridge_ns)
        _ip("-n", lab.bridge_ns, "link", "set", "lo", "up")
        _ip("-n", lab.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", lab.bridge_ns, "link", "set", "br0", "up")
        for i, address in zip(range(n), net.hosts(), strict=False):
            host = Host(index=i, ns=f"{name}h{i}", address=str(address), prefixlen=net.prefixlen, port=f"p{i}")
            _ip("netns", "add", host.ns)
            lab.hosts.append(host)
            _ip("-n", host.ns, "link", "set", "lo", "up")
            # Both ends are created right in their namespaces: nothing appears in the root namespace.
            _ip("-n", lab.bridge_ns, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
                "netns", host.ns)
            _ip("-n", lab.bridge_ns, "link", "set", host.port, "master", "br0")
            _ip("-n", lab.bridge_ns, "link", "set", host.port, "up")
            _ip("-n", host.ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "multicast", "on")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
        yield lab
    finally:
        lab.close()
