"""mDNS / DNS-SD discovery of gossipfl peers, under trio.

python-zeroconf's ``AsyncZeroconf`` needs an asyncio loop, so it cannot run under trio. This module uses the
synchronous :class:`zeroconf.Zeroconf`, which runs its own asyncio loop in a thread of its own, and bridges it:

* every blocking zeroconf call (constructing ``Zeroconf``, ``register_service``, ``update_service``,
  ``ServiceInfo.request``, ``unregister_service``, ``close``) runs in ``trio.to_thread.run_sync``;
* the ``ServiceBrowser`` handler (called in zeroconf's browser thread) hands each change to trio with
  ``trio.from_thread.run_sync(send_channel.send_nowait, ...)``; a closed or full channel, or a finished trio run,
  is logged and swallowed there, so zeroconf's threads never see our exceptions;
* a trio task resolves every Added/Updated service to its SRV, TXT and address records (a worker thread, with a
  timeout), checks them as hostile input and emits typed events, :class:`PeerSeen` and :class:`PeerGone`.

Only zeroconf's own threads (its loop and the browser) and ``trio.to_thread`` workers ever run; every trio task
lives in a nursery inside :meth:`Discovery.run`, which the caller starts in a nursery of its own (or through
:func:`open_discovery`). When the caller's scope is cancelled, ``run`` shuts down in a shielded ``finally``: the
browser stops, the service is unregistered (goodbye packets, TTL 0) and zeroconf is closed.

Service type, instance and host names, the TXT schema and the checks of what the network says are
``gossipfl.protocol.advert``'s (no I/O there); this module turns them into mDNS records and back. A
malformed advertisement is logged and ignored. What mDNS reports is only a hint: the id is checked by TLS
after dialling, and liveness is tracked by the daemon's own dials (python-zeroconf raises PTR TTLs to 1125 s,
so a peer killed with SIGKILL is never reported gone in useful time; a clean shutdown is).

``python -m gossipfld.discovery --interface ADDR`` advertises a node and prints what mDNS says as JSON lines:
a diagnostic tool, and the helper the end-to-end tests run in each process or network namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from gossipfl.config import ROLES
from gossipfl.protocol.advert import (
    FINGERPRINT_BYTES,
    ID_BYTES,
    INSTANCE_PREFIX,
    SERVICE_TYPE,
    Advertisement,
    MalformedAdvertisement,
    PeerEvent,
    PeerGone,
    PeerSeen,
    check_address,
    peer_from_records,
)

log = logging.getLogger(__name__)

MAX_TRACKED = 1024  # services tracked at once; more are dropped with a warning (a flood)
MAX_RESOLVERS = 4  # worker threads resolving services at once


def service_info(advertisement: Advertisement) -> ServiceInfo:
    """The zeroconf record set of an advertisement: SRV, TXT and A/AAAA under the node's instance name."""
    label = INSTANCE_PREFIX + advertisement.node_id.hex()[:16]
    return ServiceInfo(
        SERVICE_TYPE,
        advertisement.instance_name,
        port=advertisement.port,
        properties=advertisement.txt(),
        server=f"{label}.local.",
        parsed_addresses=list(advertisement.addresses),
    )


# --------------------------------------------------------------------------- the trio side


@dataclass(frozen=True)
class _Change:
    name: str
    state: ServiceStateChange


@dataclass(eq=False)
class _Tracked:
    reported: PeerSeen | None = None  # what we last emitted for this service
    resolving: bool = False
    dirty: bool = False  # changed again while being resolved
    gone: bool = False  # removed while being resolved


@dataclass
class _WarnOnce:
    """Log a warning once per service name (bounded), then at debug level: a flood must not flood the log."""

    size: int = 256
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __call__(self, name: str, msg: str, *args: object) -> None:
        level = logging.DEBUG if name in self.seen else logging.WARNING
        self.seen[name] = None
        self.seen.move_to_end(name)
        while len(self.seen) > self.size:
            self.seen.popitem(last=False)
        log.log(level, msg, *args)


class Discovery:
    """Advertise this node and report peers, on the given interface addresses only.

    ``advertisement`` None browses without advertising. ``interfaces`` are the IP addresses zeroconf binds
    (never all interfaces by default); when None, the advertisement's addresses are used. Start ``run`` in a
    nursery (``await nursery.start(discovery.run)`` returns once the service is registered and the browser
    runs) and read :attr:`events`; or use :func:`open_discovery`. Consume events promptly: while the consumer
    lags, changes from zeroconf queue up to ``backlog`` and later ones are dropped (and logged).
    """

    def __init__(
        self,
        advertisement: Advertisement | None,
        interfaces: Sequence[str] | None = None,
        *,
        resolve_timeout: float = 3.0,
        backlog: int = 1024,
    ) -> None:
        if interfaces is None:
            if advertisement is None:
                raise ValueError("interfaces: needed when nothing is advertised")
            interfaces = advertisement.addresses
        if isinstance(interfaces, str):
            raise ValueError("interfaces: must be a sequence of addresses, not one string")
        self.interfaces = tuple(check_address(a, "interfaces") for a in interfaces)
        if not self.interfaces:
            raise ValueError("interfaces: at least one address is needed")
        self._advertisement = advertisement
        self._resolve_timeout = resolve_timeout
        self._changes_send, self._changes_recv = trio.open_memory_channel[_Change](backlog)
        self._events_send, self.events = trio.open_memory_channel[PeerEvent](256)
        self._tracked: dict[str, _Tracked] = {}
        self._warn = _WarnOnce()
        self._limiter = trio.CapacityLimiter(MAX_RESOLVERS)
        self._lock = trio.Lock()  # serialises update() with registration and shutdown
        self._token: trio.lowlevel.TrioToken | None = None
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._started = False
        self._closed = False
        self.own_name = advertisement.instance_name.lower() if advertisement else None
        self.registration_seconds: float | None = None

    @property
    def advertisement(self) -> Advertisement | None:
        return self._advertisement

    @property
    def peers(self) -> dict[bytes, PeerSeen]:
        """The peers currently advertised, by node id (the last :class:`PeerSeen` of each)."""
        return {t.reported.node_id: t.reported for t in self._tracked.values() if t.reported is not None}

    async def run(self, *, task_status: trio.TaskStatus[Discovery] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, browse and report until cancelled; then say goodbye and close. Runs once."""
        if self._started:
            raise RuntimeError("Discovery.run can only run once")
        self._started = True
        self._token = trio.lowlevel.current_trio_token()
        browser: ServiceBrowser | None = None
        zc: Zeroconf | None = None
        try:
            zc = await trio.to_thread.run_sync(functools.partial(Zeroconf, interfaces=list(self.interfaces)))
            self._zc = zc
            with _collapse_single():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._process_changes, nursery)
                    browser = await trio.to_thread.run_sync(
                        functools.partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[self._on_change])
                    )
                    if self._advertisement is not None:
                        async with self._lock:
                            info = service_info(self._advertisement)
                            t0 = time.monotonic()
                            await trio.to_thread.run_sync(
                                functools.partial(zc.register_service, info, allow_name_change=False)
                            )
                            self._info = info
                            self.registration_seconds = time.monotonic() - t0
                        log.info("registered %s in %.2f s", info.name, self.registration_seconds)
                    task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self._closed = True
                    await self._shutdown(zc, browser)
            self._changes_send.close()
            self._events_send.close()

    async def _shutdown(self, zc: Zeroconf | None, browser: ServiceBrowser | None) -> None:
        if browser is not None:
            try:
                await trio.to_thread.run_sync(browser.cancel)
            except Exception:
                log.exception("stopping the mDNS browser failed")
        if zc is None:
            return
        if self._info is not None:
            try:
                await trio.to_thread.run_sync(zc.unregister_service, self._info)
            except Exception:
                log.exception("unregistering %s failed", self._info.name)
            self._info = None
        try:
            await trio.to_thread.run_sync(zc.close)
        except Exception:
            log.exception("closing zeroconf failed")

    async def update(self, advertisement: Advertisement) -> None:
        """Change what we advertise (fingerprint, role, protocol, port, addresses); the node id cannot change."""
        if self._advertisement is None:
            raise RuntimeError("this Discovery does not advertise")
        if advertisement.node_id != self._advertisement.node_id:
            raise ValueError("node_id: cannot change while running; start a new Discovery")
        async with self._lock:
            if self._closed or self._zc is None or self._info is None:
                raise RuntimeError("Discovery is not running")
            info = service_info(advertisement)
            await trio.to_thread.run_sync(self._zc.update_service, info)
            self._info = info
            self._advertisement = advertisement

    # ---- zeroconf's browser thread

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """ServiceBrowser handler, in zeroconf's browser thread: hand the change to trio, never raise."""
        if service_type != SERVICE_TYPE or self._token is None:
            return
        try:
            trio.from_thread.run_sync(
                self._changes_send.send_nowait, _Change(name, state_change), trio_token=self._token
            )
        except trio.WouldBlock:
            log.error("mDNS change backlog full: dropped %s %r", state_change.name, name)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.RunFinishedError):
            pass  # shutting down
        except Exception:
            log.exception("handing an mDNS change to trio failed")

    # ---- trio tasks

    async def _process_changes(self, nursery: trio.Nursery) -> None:
        async for change in self._changes_recv:
            key = change.name.lower()
            if key == self.own_name:
                continue
            if change.state is ServiceStateChange.Removed:
                tracked = self._tracked.pop(key, None)
                if tracked is not None:
                    tracked.gone = True
                    if tracked.reported is not None:
                        await self._emit(PeerGone(tracked.reported.node_id))
                continue
            tracked = self._tracked.get(key)
            if tracked is None:
                if len(self._tracked) >= MAX_TRACKED:
                    self._warn("<flood>", "tracking %d mDNS services already: ignoring %r", MAX_TRACKED, change.name)
                    continue
                tracked = self._tracked[key] = _Tracked()
            if tracked.resolving:
                tracked.dirty = True
            else:
                tracked.resolving = True
                nursery.start_soon(self._resolve_loop, change.name, key, tracked)

    async def _resolve_loop(self, name: str, key: str, tracked: _Tracked) -> None:
        """Resolve a service until it stops changing under us, emitting what changed."""
        while True:
            tracked.dirty = False
            peer = await self._resolve(name)
            if tracked.gone:
                return
            if peer is not None and peer != tracked.reported:
                if tracked.reported is not None and tracked.reported.node_id != peer.node_id:
                    await self._emit(PeerGone(tracked.reported.node_id))
                tracked.reported = peer
                await self._emit(peer)
            elif peer is None and tracked.reported is not None and not tracked.dirty:
                # It resolved before and is malformed or unresolvable now: no longer a usable peer.
                gone, tracked.reported = tracked.reported, None
                await self._emit(PeerGone(gone.node_id))
            if tracked.gone:
                return
            if not tracked.dirty:
                tracked.resolving = False
                if tracked.reported is None and self._tracked.get(key) is tracked:
                    del self._tracked[key]  # unresolved or malformed: forget it until it changes again
                return

    async def _resolve(self, name: str) -> PeerSeen | None:
        zc = self._zc
        if zc is None:
            return None
        try:
            info = ServiceInfo(SERVICE_TYPE, name)
            ok = await trio.to_thread.run_sync(
                info.request, zc, int(self._resolve_timeout * 1000), limiter=self._limiter
            )
        except Exception as exc:
            self._warn(name, "resolving %r failed: %r", name, exc)
            return None
        if not ok:
            log.debug("no complete answer for %r within %.1f s", name, self._resolve_timeout)
            return None
        try:
            peer = peer_from_records(name, info.text or b"", info.port, info.parsed_scoped_addresses())
        except MalformedAdvertisement as exc:
            self._warn(name, "ignoring malformed mDNS advertisement %r: %s", name, exc)
            return None
        if self._advertisement is not None and peer.node_id == self._advertisement.node_id:
            self._warn(name, "ignoring %r: it advertises our own node id", name)
            return None
        return peer

    async def _emit(self, event: PeerEvent) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # nobody listens any more
            await self._events_send.send(event)


@asynccontextmanager
async def open_discovery(
    advertisement: Advertisement | None,
    interfaces: Sequence[str] | None = None,
    *,
    resolve_timeout: float = 3.0,
    backlog: int = 1024,
) -> AsyncIterator[Discovery]:
    """``async with open_discovery(adv, ["10.0.0.5"]) as d: async for ev in d.events: ...``

    Enters once registered and browsing; on exit (or cancellation) says goodbye and closes zeroconf.
    """
    discovery = Discovery(advertisement, interfaces, resolve_timeout=resolve_timeout, backlog=backlog)
    with _collapse_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            try:
                yield discovery
            finally:
                nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _collapse_single() -> Iterator[None]:
    """Re-raise a one-exception group from our internal nursery as that exception.

    Without this, an exception raised in the caller's ``async with`` body (or one failure of ours, such as a
    name conflict) would come out wrapped in an ExceptionGroup, because the body runs inside our nursery."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# --------------------------------------------------------------------------- diagnostic CLI


def event_to_json(event: PeerEvent) -> dict[str, object]:
    if isinstance(event, PeerGone):
        return {"event": "gone", "node_id": event.node_id.hex()}
    return {
        "event": "seen",
        "node_id": event.node_id.hex(),
        "addresses": list(event.addresses),
        "port": event.port,
        "fingerprint": event.fingerprint.hex(),
        "role": event.role,
        "protocol": event.protocol,
        "cluster": event.cluster.hex(),
    }


def _print_json(obj: dict[str, object]) -> None:
    obj.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _hex32(value: str) -> bytes:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError("must be 64 lowercase hex digits")
    return bytes.fromhex(value)


async def _read_commands(discovery: Discovery, cancel: trio.CancelScope) -> None:
    """JSON lines on stdin: ``{"cmd": "update", "fingerprint": hex, "role": ..., "protocol": n, "port": n}`` or
    ``{"cmd": "stop"}``. End of input stops too."""
    # FdStream makes the (shared) file description non-blocking; put it back on the way out, as a shell on the
    # same terminal would otherwise inherit that.
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stream:
        try:
            buf = b""
            while chunk := await stream.receive_some(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip() and not await _command(discovery, line):
                        cancel.cancel()
                        return
        finally:
            os.set_blocking(sys.stdin.fileno(), True)
    cancel.cancel()


async def _command(discovery: Discovery, line: bytes) -> bool:
    """Run one command line; False means stop."""
    try:
        cmd = json.loads(line)
        if not isinstance(cmd, dict):
            raise ValueError("a command is a JSON object")
        if cmd.get("cmd") == "stop":
            return False
        if cmd.get("cmd") == "update" and discovery.advertisement is not None:
            changes: dict[str, object] = {k: cmd[k] for k in ("role", "protocol", "port") if k in cmd}
            if "fingerprint" in cmd:
                changes["fingerprint"] = _hex32(cmd["fingerprint"])
            await discovery.update(replace(discovery.advertisement, **changes))  # type: ignore[arg-type]
            _print_json({"event": "updated"})
        else:
            _print_json({"event": "error", "error": f"unknown command {cmd!r}"})
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        _print_json({"event": "error", "error": str(exc)})
    return True


async def _cli(args: argparse.Namespace) -> None:
    adv = None
    if not args.browse_only:
        adv = Advertisement(
            node_id=args.node_id or secrets.token_bytes(ID_BYTES),
            protocol=args.protocol,
            fingerprint=args.fingerprint or bytes(FINGERPRINT_BYTES),
            port=args.port,
            role=args.role,
            addresses=tuple(args.advertise or args.interface),
        )
    discovery = Discovery(adv, args.interface, resolve_timeout=args.resolve_timeout)
    with trio.CancelScope() as cancel, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            await nursery.start(discovery.run)
            ready: dict[str, object] = {"event": "ready", "seconds": round(time.monotonic() - t0, 3)}
            if adv is not None:
                ready.update(node_id=adv.node_id.hex(), name=adv.instance_name,
                             registration_seconds=round(discovery.registration_seconds or 0.0, 3))
            _print_json(ready)

            async def watch_signals() -> None:
                async for _ in signals:
                    cancel.cancel()

            nursery.start_soon(watch_signals)
            if args.stdin_commands:
                nursery.start_soon(_read_commands, discovery, cancel)
            async for event in discovery.events:
                _print_json(event_to_json(event))
    _print_json({"event": "stopped"})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gossipfld.discovery",
        description="Advertise a gossipfl node over mDNS and print the peers seen, as JSON lines.",
    )
    p.add_argument("--interface", action="append", required=True, help="IP address to run mDNS on (repeatable)")
    p.add_argument("--advertise", action="append", help="address to advertise (default: the interfaces)")
    p.add_argument("--node-id", type=_hex32, help="64 hex digits (default: random)")
    p.add_argument("--fingerprint", type=_hex32, help="64 hex digits (default: zeros)")
    p.add_argument("--port", type=int, default=7878)
    p.add_argument("--role", choices=ROLES, default="node")
    p.add_argument("--protocol", type=int, default=1)
    p.add_argument("--resolve-timeout", type=float, default=3.0)
    p.add_argument("--browse-only", action="store_true", help="do not advertise, only report")
    p.add_argument("--stdin-commands", action="store_true", help="read JSON commands on stdin; EOF stops")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.verbose:
        logging.getLogger("zeroconf").setLevel(logging.INFO)
    try:
        trio.run(_cli, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

