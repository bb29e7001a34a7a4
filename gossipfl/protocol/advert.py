"""DNS-SD adverts of gossipfl nodes: what a node advertises, and the checks of what others advertise.

No I/O: the zeroconf and trio side is ``gossipfld.discovery``, which turns these into mDNS records and back.

Service type ``_gossipfl._tcp.local.``; instance ``gfl-<first 16 hex of the node id>._gossipfl._tcp.local.``;
host ``gfl-<same 16 hex>.local.``. The SRV record carries the port, A/AAAA records the addresses, and TXT::

    id=<node id, 64 lowercase hex>  v=<protocol version, decimal 0..65535>
    fp=<model fingerprint, 64 lowercase hex>  role=node|gateway
    cl=<cluster tag: first 16 hex of the SHA-256 of the cluster CA certificate; optional>

The cluster tag lets a node pass over the adverts of other clusters on the same LAN without dialling them
(each such dial would only fail at TLS): like the id, it is a hint, and TLS decides.

Everything read from the network is treated as hostile: see :func:`parse_txt` and :func:`peer_from_records`,
which raise :class:`MalformedAdvertisement` with the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gossipfl.config import ROLES
from gossipfl.identity.ids import CLUSTER_TAG_BYTES

SERVICE_TYPE = "_gossipfl._tcp.local."
INSTANCE_PREFIX = "gfl-"
ID_BYTES = 32
FINGERPRINT_BYTES = 32
MAX_PROTOCOL = 65535
MAX_TXT_BYTES = 1300  # RFC 6763 6.2: a TXT record should fit one packet; ours is about 170 bytes
MAX_TXT_ENTRIES = 64
MAX_ADDRESSES = 16  # addresses kept per peer; more are dropped

_HEX64 = re.compile(rb"[0-9a-f]{64}")
_DECIMAL = re.compile(rb"[0-9]{1,5}")
_CLUSTER_HEX = re.compile(rb"[0-9a-f]{%d}" % (2 * CLUSTER_TAG_BYTES))


class MalformedAdvertisement(ValueError):
    """An advertisement from the network does not follow the TXT schema; it is ignored."""


# --------------------------------------------------------------------------- what we advertise


def check_address(address: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{what}: not an IP address: {address!r}") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{what}: must be a unicast address of this host, got {address}")
    return str(ip)


def _is_int_in(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


@dataclass(frozen=True)
class Advertisement:
    """What this node tells the network about itself."""

    node_id: bytes  # 32 bytes: SHA-256 of the certificate's public key
    protocol: int  # wire protocol version, 0..65535
    fingerprint: bytes  # 32 bytes: structural fingerprint of the model
    port: int  # TCP port of the peer listener
    role: str = "node"  # "node" or "gateway"
    addresses: tuple[str, ...] = ()  # IP addresses to put in A/AAAA records; at least one
    cluster: bytes = b""  # NodeIdentity.cluster_tag; empty = not advertised

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, bytes) or len(self.cluster) not in (0, CLUSTER_TAG_BYTES):
            raise ValueError(f"cluster: must be {CLUSTER_TAG_BYTES} bytes or empty")
        if not isinstance(self.node_id, bytes) or len(self.node_id) != ID_BYTES:
            raise ValueError(f"node_id: must be {ID_BYTES} bytes")
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint: must be {FINGERPRINT_BYTES} bytes")
        if not _is_int_in(self.protocol, 0, MAX_PROTOCOL):
            raise ValueError(f"protocol: must be an int in 0..{MAX_PROTOCOL}, got {self.protocol!r}")
        if not _is_int_in(self.port, 1, 65535):
            raise ValueError(f"port: must be an int in 1..65535, got {self.port!r}")
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if isinstance(self.addresses, str):
            raise ValueError("addresses: must be a sequence of addresses, not one string")
        addresses = tuple(check_address(a, "addresses") for a in self.addresses)
        if not addresses:
            raise ValueError("addresses: at least one address to advertise is needed")
        if len(addresses) > MAX_ADDRESSES:
            raise ValueError(f"addresses: at most {MAX_ADDRESSES}")
        object.__setattr__(self, "addresses", addresses)

    @property
    def instance_name(self) -> str:
        return instance_name(self.node_id)

    def txt(self) -> dict[bytes, bytes]:
        """The TXT record's key/value pairs."""
        return {
            b"id": self.node_id.hex().encode(),
            b"v": str(self.protocol).encode(),
            b"fp": self.fingerprint.hex().encode(),
            b"role": self.role.encode(),
            **({b"cl": self.cluster.hex().encode()} if self.cluster else {}),
        }


def instance_name(node_id: bytes) -> str:
    """The DNS-SD instance name of a node: ``gfl-<first 16 hex of the id>._gossipfl._tcp.local.``."""
    return f"{INSTANCE_PREFIX}{node_id.hex()[:16]}.{SERVICE_TYPE}"


# --------------------------------------------------------------------------- what we report


@dataclass(frozen=True)
class PeerSeen:
    """A peer advertises itself (new, or with changed records). Its id is a hint until TLS confirms it."""

    node_id: bytes
    addresses: tuple[str, ...]
    port: int
    fingerprint: bytes
    role: str
    protocol: int
    cluster: bytes = b""  # empty: the peer advertises no cluster tag


@dataclass(frozen=True)
class PeerGone:
    """mDNS says the peer withdrew its service (goodbye packet, or its records expired)."""

    node_id: bytes


PeerEvent = PeerSeen | PeerGone


def parse_txt(text: bytes) -> dict[str, bytes | None]:
    """Split raw TXT record data into ``{lowercased key: value}`` (RFC 6763 section 6).

    A key without ``=`` maps to None. The first occurrence of a key wins; empty strings, strings starting with
    ``=`` and keys that are not printable ASCII are skipped. Raises :class:`MalformedAdvertisement` when the
    record is too long, has too many entries, or a length byte runs past the end.
    """
    if len(text) > MAX_TXT_BYTES:
        raise MalformedAdvertisement(f"TXT record of {len(text)} bytes (at most {MAX_TXT_BYTES})")
    out: dict[str, bytes | None] = {}
    pos = entries = 0
    while pos < len(text):
        length = text[pos]
        entry = text[pos + 1 : pos + 1 + length]
        if len(entry) != length:
            raise MalformedAdvertisement("TXT record truncated")
        pos += 1 + length
        entries += 1
        if entries > MAX_TXT_ENTRIES:
            raise MalformedAdvertisement(f"more than {MAX_TXT_ENTRIES} TXT entries")
        key, sep, value = entry.partition(b"=")
        if not key or not all(0x20 <= c <= 0x7E for c in key):
            continue
        name = key.decode("ascii").lower()
        if name not in out:
            out[name] = value if sep else None
    return out


def _hex_field(txt: dict[str, bytes | None], key: str) -> bytes:
    value = txt.get(key)
    if value is None:
        raise MalformedAdvertisement(f"TXT {key}: missing")
    if not _HEX64.fullmatch(value):
        raise MalformedAdvertisement(f"TXT {key}: not 64 lowercase hex digits ({len(value)} bytes)")
    return bytes.fromhex(value.decode("ascii"))


def peer_from_records(
    name: str, text: bytes, port: int | None, addresses: Iterable[str]
) -> PeerSeen:
    """Check one resolved service (instance name, raw TXT, SRV port, addresses) and build its event.

    Raises :class:`MalformedAdvertisement` with the reason when anything is off: a required key missing, an id or
    fingerprint that is not 64 lowercase hex digits, a protocol that is not a decimal in 0..65535, a role not in
    ``ROLES``, a port outside 1..65535, no usable address, or an instance name that does not carry the id.
    """
    txt = parse_txt(text)
    node_id = _hex_field(txt, "id")
    fingerprint = _hex_field(txt, "fp")
    version = txt.get("v")
    if version is None:
        raise MalformedAdvertisement("TXT v: missing")
    if not _DECIMAL.fullmatch(version) or int(version) > MAX_PROTOCOL:
        raise MalformedAdvertisement(f"TXT v: not a decimal in 0..{MAX_PROTOCOL}")
    role_raw = txt.get("role")
    if role_raw is None:
        raise MalformedAdvertisement("TXT role: missing")
    role = role_raw.decode("ascii", "replace")
    if role not in ROLES:
        raise MalformedAdvertisement(f"TXT role: must be one of {', '.join(ROLES)}")
    if not _is_int_in(port, 1, 65535):
        raise MalformedAdvertisement(f"SRV port: must be in 1..65535, got {port!r}")
    if name.lower() != instance_name(node_id):
        raise MalformedAdvertisement("instance name does not match the id in TXT")
    usable: list[str] = []
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast or address in usable:
            continue
        usable.append(address)
        if len(usable) == MAX_ADDRESSES:
            break
    if not usable:
        raise MalformedAdvertisement("no usable address")
    cluster = txt.get("cl")
    if cluster is not None and not _CLUSTER_HEX.fullmatch(cluster):
        raise MalformedAdvertisement(f"TXT cl: not {2 * CLUSTER_TAG_BYTES} lowercase hex digits")
    return PeerSeen(node_id, tuple(usable), port, fingerprint, role, int(version),
                    bytes.fromhex(cluster.decode()) if cluster else b"")
