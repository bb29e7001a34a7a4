"""mDNS discovery under trio: real zeroconf on 127.0.0.1, real processes, and network namespaces.

The multi-process tests run ``python -m gossipfld.discovery`` (one JSON line per event on stdout, JSON commands on
stdin). Other test runs on this machine may use mDNS on 127.0.0.1 at the same time, so every check is about the
node ids a test made itself, never "exactly these peers". Timings are printed (``pytest -s``), not asserted,
except the 5 s discovery bound the design promises.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from zeroconf import ServiceInfo, Zeroconf

from gossipfl.protocol.advert import (
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    Advertisement,
    MalformedAdvertisement,
    PeerGone,
    PeerSeen,
    instance_name,
    parse_txt,
    peer_from_records,
)
from gossipfl.testing.netns import netns_lab, require_netns
from gossipfld.discovery import Discovery, open_discovery, service_info

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent.parent


def adv(node_id: bytes | None = None, **kw) -> Advertisement:
    args = {
        "node_id": node_id or secrets.token_bytes(32),
        "protocol": 1,
        "fingerprint": secrets.token_bytes(32),
        "port": 7878,
        "role": "node",
        "addresses": (LOOPBACK,),
    }
    args.update(kw)
    return Advertisement(**args)


def txt_bytes(pairs: dict[bytes, bytes | None]) -> bytes:
    out = b""
    for k, v in pairs.items():
        entry = k if v is None else k + b"=" + v
        out += bytes((len(entry),)) + entry
    return out


# --------------------------------------------------------------------------- schema and validation (no network)


def test_advertisement_round_trips_through_the_checks():
    a = adv(role="gateway", protocol=65535, port=1)
    info = service_info(a)
    assert info.name == instance_name(a.node_id) == f"gfl-{a.node_id.hex()[:16]}.{SERVICE_TYPE}"
    peer = peer_from_records(info.name, info.text, info.port, info.parsed_addresses())
    assert peer == PeerSeen(a.node_id, (LOOPBACK,), 1, a.fingerprint, "gateway", 65535)


def test_cluster_tag_is_advertised_and_checked():
    tag = bytes(range(8))
    a = adv(cluster=tag)
    info = service_info(a)
    assert info.properties[b"cl"] == tag.hex().encode()
    assert peer_from_records(info.name, info.text, info.port, info.parsed_addresses()).cluster == tag
    untagged = adv()
    assert b"cl" not in untagged.txt(), "no tag, no key: older nodes and tag-less adverts stay readable"
    info = service_info(untagged)
    assert peer_from_records(info.name, info.text, info.port, info.parsed_addresses()).cluster == b""
    for bad in (b"0011", b"00112233445566778899", b"ZZ11223344556677", b""):
        text = txt_bytes({**{k: v for k, v in untagged.txt().items()}, b"cl": bad})
        with pytest.raises(MalformedAdvertisement, match="TXT cl"):
            peer_from_records(untagged.instance_name, text, 7878, [LOOPBACK])


@pytest.mark.parametrize(
    "kw",
    [
        {"cluster": b"x" * 7},
        {"cluster": "0011223344556677"},
        {"node_id": b"x" * 31},
        {"fingerprint": b"x" * 33},
        {"protocol": -1},
        {"protocol": 65536},
        {"protocol": True},
        {"port": 0},
        {"port": 65536},
        {"role": "admin"},
        {"addresses": ()},
        {"addresses": ("0.0.0.0",)},
        {"addresses": ("224.0.0.251",)},
        {"addresses": ("not-an-ip",)},
        {"addresses": "127.0.0.1"},
    ],
)
def test_advertisement_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        adv(**kw)


def test_discovery_refuses_wildcard_or_missing_interfaces():
    with pytest.raises(ValueError):
        Discovery(adv(), ["0.0.0.0"])
    with pytest.raises(ValueError):
        Discovery(None)
    with pytest.raises(ValueError):
        Discovery(adv(), [])


def test_parse_txt_follows_rfc6763():
    text = txt_bytes({b"ID": b"a", b"id": b"b", b"flag": None, b"=x": b"y", b"\xffkey": b"z"}) + b"\x00"
    assert parse_txt(text) == {"id": b"a", "flag": None}
    with pytest.raises(MalformedAdvertisement, match="truncated"):
        parse_txt(b"\x10short")
    with pytest.raises(MalformedAdvertisement, match="bytes"):
        parse_txt(txt_bytes({b"k%d" % i: b"v" * 200 for i in range(7)}))
    with pytest.raises(MalformedAdvertisement, match="entries"):
        parse_txt(b"\x01a" * 65)


def _good_txt(node_id: bytes) -> dict[bytes, bytes | None]:
    return {b"id": node_id.hex().encode(), b"v": b"3", b"fp": b"ab" * 32, b"role": b"node"}


NODE = bytes(range(32))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({b"id": b"zz" * 32}, "id"),  # not hex
        ({b"id": NODE.hex()[:62].encode()}, "id"),  # too short
        ({b"id": NODE.hex().upper().encode()}, "id"),  # not lowercase
        ({b"id": None}, "id"),  # key without value
        ({b"id": b"00" * 125}, "id"),  # as long as a TXT string can be
        ({b"fp": b""}, "fp"),
        ({b"v": b"9" * 250}, "v"),  # huge int: never parsed
        ({b"v": b"70000"}, "v"),
        ({b"v": b"-1"}, "v"),
        ({b"v": b" 1"}, "v"),
        ({b"v": b"\xd9\xa1"}, "v"),  # a non-ASCII digit that int() would accept
        ({b"role": b"admin"}, "role"),
        ({b"role": b"\xff\xfe"}, "role"),
        ({b"role": b"Node"}, "role"),
    ],
)
def test_malformed_txt_is_refused_with_a_reason(change, reason):
    pairs = _good_txt(NODE)
    pairs.update(change)
    with pytest.raises(MalformedAdvertisement, match=reason):
        peer_from_records(instance_name(NODE), txt_bytes(pairs), 7878, [LOOPBACK])


def test_missing_keys_ports_addresses_and_foreign_names_are_refused():
    good = txt_bytes(_good_txt(NODE))
    name = instance_name(NODE)
    for key in (b"id", b"v", b"fp", b"role"):
        pairs = _good_txt(NODE)
        del pairs[key]
        with pytest.raises(MalformedAdvertisement, match="missing"):
            peer_from_records(name, txt_bytes(pairs), 7878, [LOOPBACK])
    for port in (None, 0, 65536, -5):
        with pytest.raises(MalformedAdvertisement, match="port"):
            peer_from_records(name, good, port, [LOOPBACK])
    for addresses in ([], ["0.0.0.0"], ["224.0.0.251"], ["junk"]):
        with pytest.raises(MalformedAdvertisement, match="address"):
            peer_from_records(name, good, 7878, addresses)
    with pytest.raises(MalformedAdvertisement, match="name"):
        peer_from_records(instance_name(bytes(32)), good, 7878, [LOOPBACK])
    # Unknown keys are ignored (forward compatibility); names are case-insensitive; addresses are capped.
    extra = txt_bytes({**_good_txt(NODE), b"future": b"x"})
    many = [f"10.0.0.{i}" for i in range(1, 40)] + ["0.0.0.0"]
    peer = peer_from_records(name.upper(), extra, 7878, many)
    assert peer.protocol == 3 and peer.fingerprint == b"\xab" * 32 and len(peer.addresses) == 16


# --------------------------------------------------------------------------- real processes


class Node:
    """One discovery process, its JSON events stamped with trio's clock on arrival."""

    def __init__(self, label: str, node_id: bytes, argv: Sequence[str], stderr: Path) -> None:
        self.label = label
        self.node_id = node_id
        self.argv = list(argv)
        self.stderr_path = stderr
        self.lines: list[tuple[float, dict]] = []
        self._changed = trio.Event()
        self.proc: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        with open(self.stderr_path, "wb") as err:
            self.proc = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO
            )
        nursery.start_soon(self._pump)

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = {"event": "junk", "line": line.decode(errors="replace")}
                self.lines.append((trio.current_time(), obj))
                self._changed.set()
                self._changed = trio.Event()

    def describe(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        events = "\n".join(f"  {t:.3f} {json.dumps(o)[:200]}" for t, o in self.lines)
        return f"--- {self.label} ({self.node_id.hex()[:16]}) events:\n{events}\n--- stderr:\n{err}"

    def find(self, pred: Callable[[dict], bool]) -> tuple[float, dict] | None:
        return next(((t, o) for t, o in self.lines if pred(o)), None)

    async def wait_for(self, pred: Callable[[dict], bool], timeout: float, what: str) -> tuple[float, dict]:
        with trio.move_on_after(max(timeout, 0.0)):
            while True:
                found = self.find(pred)
                if found is not None:
                    return found
                await self._changed.wait()
        found = self.find(pred)
        if found is None:
            raise AssertionError(f"{self.label}: no {what} within {timeout:.2f} s\n{self.describe()}")
        return found

    async def command(self, obj: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(obj).encode() + b"\n")


def ready(obj: dict) -> bool:
    return obj.get("event") == "ready"


def seen(node_id: bytes, **values) -> Callable[[dict], bool]:
    def pred(obj: dict) -> bool:
        return (obj.get("event") == "seen" and obj.get("node_id") == node_id.hex()
                and all(obj.get(k) == v for k, v in values.items()))
    return pred


def gone(node_id: bytes) -> Callable[[dict], bool]:
    return lambda obj: obj.get("event") == "gone" and obj.get("node_id") == node_id.hex()


def node_argv(node_id: bytes, address: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gossipfld.discovery", "--interface", address, "--node-id", node_id.hex(),
            "--fingerprint", node_id[::-1].hex(), "--port", str(port), "--stdin-commands", "--resolve-timeout", "2"]


@asynccontextmanager
async def cluster(tmp_path: Path, argvs: Sequence[tuple[bytes, list[str]]]) -> AsyncIterator[list[Node]]:
    """Start the processes; on exit close their stdin (a clean stop), then kill whatever is left."""
    nodes = [Node(f"node{i}", nid, argv, tmp_path / f"node{i}.stderr") for i, (nid, argv) in enumerate(argvs)]
    async with trio.open_nursery() as nursery:
        try:
            for node in nodes:
                await node.start(nursery)
            yield nodes
        finally:
            with trio.CancelScope(shield=True):
                for node in nodes:
                    if node.proc is not None and node.proc.returncode is None:
                        with trio.move_on_after(1):
                            await node.proc.stdin.aclose()
                with trio.move_on_after(8):
                    for node in nodes:
                        if node.proc is not None:
                            await node.proc.wait()
                for node in nodes:
                    if node.proc is not None and node.proc.returncode is None:
                        node.proc.kill()
                        await node.proc.wait()


async def start_and_discover(nodes: list[Node]) -> dict[str, float]:
    """Wait for every node to register, then for each to see all others before a 5 s deadline."""
    readies = [await n.wait_for(ready, 20, "ready line") for n in nodes]
    t_all_ready = max(t for t, _ in readies)
    last_seen = t_all_ready
    for n in nodes:
        for other in nodes:
            if other is not n:
                t, _ = await n.wait_for(seen(other.node_id), t_all_ready + 5.0 - trio.current_time(),
                                        f"PeerSeen of {other.label} before 5 s after all registered")
                last_seen = max(last_seen, t)
    return {
        "registration_s": max(float(o["registration_seconds"]) for _, o in readies),
        "all_seen_after_last_ready_s": last_seen - t_all_ready,
    }


def assert_never_reports_itself(nodes: list[Node]) -> None:
    for n in nodes:
        assert n.find(lambda o, n=n: o.get("node_id") == n.node_id.hex() and o.get("event") != "ready") is None, (
            n.describe()
        )


def loopback_nodes(count: int) -> list[tuple[bytes, list[str]]]:
    ids = [secrets.token_bytes(32) for _ in range(count)]
    return [(nid, node_argv(nid, LOOPBACK, 7000 + i)) for i, nid in enumerate(ids)]


def test_three_processes_find_each_other_within_5s(tmp_path):
    async def main():
        async with cluster(tmp_path, loopback_nodes(3)) as nodes:
            timings = await start_and_discover(nodes)
            await trio.sleep(0.5)  # give a self-report the chance to show up
            assert_never_reports_itself(nodes)
            for n in nodes:
                for other in nodes:
                    if other is not n:
                        _, ev = n.find(seen(other.node_id))
                        assert ev["addresses"] == [LOOPBACK]
                        assert ev["port"] == 7000 + nodes.index(other)
                        assert ev["fingerprint"] == other.node_id[::-1].hex()
                        assert (ev["role"], ev["protocol"]) == ("node", 1)
            print(f"\nloopback discovery: {timings}")

    trio.run(main)


def test_clean_shutdown_is_reported_as_peer_gone(tmp_path):
    async def main():
        async with cluster(tmp_path, loopback_nodes(3)) as nodes:
            await start_and_discover(nodes)
            leaver = nodes[0]
            t_stop = trio.current_time()
            await leaver.command({"cmd": "stop"})
            latencies = []
            for n in nodes[1:]:
                t, _ = await n.wait_for(gone(leaver.node_id), 3.0, f"PeerGone of {leaver.label}")
                latencies.append(t - t_stop)
            await leaver.wait_for(lambda o: o.get("event") == "stopped", 5.0, "stopped line")
            with trio.fail_after(5):
                assert await leaver.proc.wait() == 0, leaver.describe()
            # The others stay up and keep seeing each other: no PeerGone among them.
            assert nodes[1].find(gone(nodes[2].node_id)) is None
            assert nodes[2].find(gone(nodes[1].node_id)) is None
            assert_never_reports_itself(nodes)
            print(f"\ngoodbye seen after stop command: {[round(x, 3) for x in latencies]} s")

    trio.run(main)


def test_txt_update_is_seen_as_a_new_peer_seen(tmp_path):
    async def main():
        async with cluster(tmp_path, loopback_nodes(3)) as nodes:
            await start_and_discover(nodes)
            changer = nodes[2]
            new_fp = secrets.token_bytes(32).hex()
            t0 = trio.current_time()
            await changer.command({"cmd": "update", "fingerprint": new_fp, "role": "gateway", "protocol": 7,
                                   "port": 7999})
            latencies = []
            for n in nodes[:2]:
                t, _ = await n.wait_for(
                    seen(changer.node_id, fingerprint=new_fp, role="gateway", protocol=7, port=7999), 5.0,
                    "PeerSeen with the updated values",
                )
                latencies.append(t - t0)
                assert n.find(gone(changer.node_id)) is None
            await changer.wait_for(lambda o: o.get("event") == "updated", 5.0, "updated line")
            assert_never_reports_itself(nodes)
            print(f"\nTXT update seen after command: {[round(x, 3) for x in latencies]} s")

    trio.run(main)


# --------------------------------------------------------------------------- hostile advertisements


def test_malformed_advertisements_are_ignored_and_discovery_keeps_working(caplog):
    tag = secrets.token_hex(4)
    good_id = secrets.token_bytes(32)

    def raw(label: str, node_id: bytes, change: dict[bytes, bytes | None], port: int = 7878,
            addresses: Sequence[str] = (LOOPBACK,), name: str | None = None) -> ServiceInfo:
        pairs = {b"id": node_id.hex().encode(), b"v": b"1", b"fp": b"cd" * 32, b"role": b"node"}
        pairs.update(change)
        host = f"{label}-{tag}"
        return ServiceInfo(SERVICE_TYPE, name or f"{host}.{SERVICE_TYPE}", port=port,
                           properties=txt_bytes({k: v for k, v in pairs.items()}), server=f"{host}.local.",
                           parsed_addresses=list(addresses))

    bad_ids = [secrets.token_bytes(32) for _ in range(12)]
    bad = [
        raw("nonhex", bad_ids[0], {b"id": b"zz" * 32}),
        raw("noport", bad_ids[1], {}, port=0, name=instance_name(bad_ids[1])),
        raw("hugev", bad_ids[2], {b"v": b"9" * 240}, name=instance_name(bad_ids[2])),
        raw("bigv", bad_ids[3], {b"v": b"4294967296"}, name=instance_name(bad_ids[3])),
        raw("role", bad_ids[4], {b"role": b"admin"}, name=instance_name(bad_ids[4])),
        raw("nofp", bad_ids[5], {b"fp": None}, name=instance_name(bad_ids[5])),
        raw("shortid", bad_ids[6], {b"id": bad_ids[6].hex()[:40].encode()}),
        raw("wrongname", bad_ids[7], {}),  # valid TXT, but the name does not carry the id
        raw("bigtxt", bad_ids[8], {b"x%d" % i: b"y" * 240 for i in range(MAX_TXT_BYTES // 240 + 1)},
            name=instance_name(bad_ids[8])),
        raw("binrole", bad_ids[9], {b"role": b"\x00\xff"}, name=instance_name(bad_ids[9])),
        raw("empty", bad_ids[10], {b"id": b"", b"v": b"", b"fp": b"", b"role": b""}),
    ]
    warned_names = {info.name.lower() for info in bad}
    good = adv(good_id, role="gateway", protocol=9, port=7123)

    async def main():
        limiter = trio.CapacityLimiter(len(bad) + 1)
        zc = await trio.to_thread.run_sync(functools.partial(Zeroconf, interfaces=[LOOPBACK]))
        try:
            async with open_discovery(adv(), [LOOPBACK], resolve_timeout=1.0) as disc:
                async with trio.open_nursery() as nursery:
                    for info in bad:
                        nursery.start_soon(functools.partial(
                            trio.to_thread.run_sync, functools.partial(zc.register_service, info,
                                                                       cooperating_responders=True),
                            limiter=limiter))
                await trio.to_thread.run_sync(zc.register_service, service_info(good))
                received: list = []
                with trio.fail_after(8):
                    async for event in disc.events:
                        received.append(event)
                        if isinstance(event, PeerSeen) and event.node_id == good_id:
                            break
                assert received[-1] == PeerSeen(good_id, (LOOPBACK,), 7123, good.fingerprint, "gateway", 9)
                # Every malformed one is logged (once, with its name) and none is reported.
                with trio.fail_after(6):
                    while not warned_names <= logged_names():
                        await trio.sleep(0.05)
                assert not [e for e in received if e.node_id in bad_ids]
                assert disc.peers[good_id] == received[-1]
                assert not set(disc.peers) & set(bad_ids)
                # Still working: the good one leaves cleanly and that is reported.
                await trio.to_thread.run_sync(zc.unregister_service, service_info(good))
                with trio.fail_after(5):
                    async for event in disc.events:
                        assert not (isinstance(event, PeerSeen) and event.node_id in bad_ids)
                        if event == PeerGone(good_id):
                            break
            # Leaving the context closed the event channel: draining what is left ends instead of blocking.
            with trio.fail_after(1):
                _ = [e async for e in disc.events]
        finally:
            await trio.to_thread.run_sync(zc.close)

    def logged_names() -> set[str]:
        out = set()
        for rec in caplog.records:
            if rec.name == "gossipfld.discovery" and rec.levelno == logging.WARNING and "malformed" in rec.msg:
                out.add(str(rec.args[0]).lower())
        return out

    threads_before = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="gossipfld.discovery"):
        trio.run(main)
    # No thread outlives the run but trio's idle worker cache: zeroconf's loop and browser threads are joined.
    left = [t for t in set(threading.enumerate()) - threads_before if not t.name.startswith("Trio thread")]
    assert not left, left


def test_errors_in_the_body_come_out_unwrapped_and_browse_only_needs_no_registration():
    async def main():
        with trio.fail_after(5):
            with pytest.raises(KeyError, match="from the body"):
                async with open_discovery(None, [LOOPBACK]) as disc:
                    assert disc.own_name is None and disc.registration_seconds is None
                    raise KeyError("from the body")
            with pytest.raises(RuntimeError, match="does not advertise"):
                async with open_discovery(None, [LOOPBACK]) as disc:
                    await disc.update(adv())

    trio.run(main)


def test_update_refuses_a_new_node_id():
    d = Discovery(adv(), [LOOPBACK])

    async def main():
        with pytest.raises(ValueError, match="node_id"):
            await d.update(adv())
        with pytest.raises(RuntimeError, match="not running"):
            await d.update(adv(d.advertisement.node_id))

    trio.run(main)


# --------------------------------------------------------------------------- network namespaces


@pytest.mark.netns
def test_netns_lab_cut_partition_and_heal():
    require_netns()
    with netns_lab(3) as lab:
        h0, h1, h2 = lab.hosts
        assert h0.can_reach(h1.address) and h0.can_reach(h2.address)
        lab.cut(h2)
        assert h0.can_reach(h1.address) and not h0.can_reach(h2.address, timeout=0.5)
        lab.heal()
        assert h0.can_reach(h2.address)
        lab.partition([0, 1], [2])
        assert h0.can_reach(h1.address) and not h2.can_reach(h0.address, timeout=0.5)
        lab.heal()
        assert h2.can_reach(h0.address) and h2.can_reach(h1.address)
        namespaces = lab.namespaces()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [ns for ns in namespaces if ns in listed.split()]


@pytest.mark.netns
def test_three_namespaces_find_each_other_by_mdns(tmp_path):
    require_netns()
    with netns_lab(3) as lab:
        ids = [secrets.token_bytes(32) for _ in lab.hosts]
        argvs = [(nid, h.cmd(node_argv(nid, h.address, 7878))) for nid, h in zip(ids, lab.hosts, strict=True)]

        async def main():
            async with cluster(tmp_path, argvs) as nodes:
                timings = await start_and_discover(nodes)
                assert_never_reports_itself(nodes)
                for n in nodes:
                    for other, oh in zip(nodes, lab.hosts, strict=True):
                        if other is not n:
                            assert n.find(seen(other.node_id))[1]["addresses"] == [oh.address]
                # A clean stop crosses the bridge too.
                await nodes[0].command({"cmd": "stop"})
                for n in nodes[1:]:
                    await n.wait_for(gone(nodes[0].node_id), 3.0, "PeerGone across namespaces")
                print(f"\nnetns discovery: {timings}")

        trio.run(main)


def test_no_lab_namespaces_leak():
    """Nothing this process created is left behind (runs last in this file)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and `ip` to list namespaces")
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    assert f"gfl{os.getpid()}n" not in done.stdout
