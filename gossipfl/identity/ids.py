"""Node ids: their printed form, allowlists, node names, and the check of a TLS peer's id.

A node's id is the SHA-256 of its certificate's SubjectPublicKeyInfo (DER): 32 bytes, shown as 64
lowercase hex digits. It names the key, not the certificate, so a renewed certificate for the same key
keeps the id. Ids advertised by discovery are hints; after the handshake the peer's certificate must give
the id that was dialled (``check_peer``), and an optional allowlist narrows the cluster further.

No I/O: ``check_peer`` and ``peer_node_id`` take anything with ``getpeercert`` (``ssl.SSLObject``,
``trio.SSLStream``); the TLS contexts themselves are made in ``gossipfl.cli.tls``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

from gossipfl.errors import IdentityError
from gossipfl.identity.der import parse_certificate

NODE_ID_BYTES = 32
CLUSTER_TAG_BYTES = 8  # files.NodeIdentity.cluster_tag: a prefix of the CA certificate's SHA-256

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_ID_RE = re.compile(r"[0-9a-fA-F]{64}")

__all__ = [
    "CLUSTER_TAG_BYTES", "NODE_ID_BYTES", "PeerCertificateSource", "PeerIdentityError", "check_peer",
    "format_node_id", "node_id_from_cert_der", "parse_allowlist", "parse_node_id", "peer_node_id",
    "validate_node_name",
]


class PeerIdentityError(IdentityError):
    """The peer of a TLS connection is not the node that was dialled, or is not allowed."""

    def __init__(self, message: str, *, peer_id: bytes | None = None, expected_id: bytes | None = None) -> None:
        self.peer_id = peer_id
        self.expected_id = expected_id
        super().__init__(message)


def format_node_id(node_id: bytes) -> str:
    """The printed form of a node id: 64 lowercase hex digits."""
    if not isinstance(node_id, bytes | bytearray) or len(node_id) != NODE_ID_BYTES:
        raise IdentityError(f"a node id is {NODE_ID_BYTES} bytes, got {node_id!r}")
    return bytes(node_id).hex()


def parse_node_id(text: str) -> bytes:
    """Parse a printed node id: exactly 64 hex digits, nothing else (no spaces, separators or 0x)."""
    if not isinstance(text, str) or not _NODE_ID_RE.fullmatch(text):
        shown = text if isinstance(text, str) and len(text) <= 80 else f"{str(text)[:80]}..."
        raise IdentityError(f"not a node id (64 hex digits): {shown!r}")
    return bytes.fromhex(text)


def parse_allowlist(ids: Iterable[str]) -> frozenset[bytes]:
    """Parse printed node ids into an allowlist for ``check_peer``."""
    return frozenset(parse_node_id(text) for text in ids)


def node_id_from_cert_der(der: bytes) -> bytes:
    """The node id of a DER certificate, as ``getpeercert(binary_form=True)`` returns it."""
    return parse_certificate(der).node_id


def validate_node_name(name: str) -> str:
    """A node name: 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IdentityError(f"bad node name {name!r}: use 1-63 characters A-Z a-z 0-9 . _ -, "
                            "starting with a letter or digit")
    return name


class PeerCertificateSource(Protocol):
    """Anything with ``getpeercert``: ``ssl.SSLObject``, ``ssl.SSLSocket``, or ``trio.SSLStream`` (forwarded)."""

    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def peer_node_id(ssl_object: PeerCertificateSource) -> bytes:
    """The node id of the peer of a completed TLS handshake."""
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:
        raise PeerIdentityError("TLS handshake not complete: no peer certificate yet") from None
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    try:
        return node_id_from_cert_der(der)
    except IdentityError as exc:
        raise PeerIdentityError(f"peer certificate: {exc}") from None


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def peer_name(ssl_object: PeerCertificateSource) -> str:
    """The name the CA issued the peer's certificate for (its subject's common name), for operators to read;
    "" when it has none or one that is not a plain name. Never an identity: the id is, and a name is shown
    only beside it (two certificates may carry the same name)."""
    try:
        subject = (ssl_object.getpeercert() or {}).get("subject", ())
    except ValueError:
        return ""
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    name = names[0] if len(names) == 1 and isinstance(names[0], str) else ""
    return name if 0 < len(name) <= 63 and set(name) <= NAME_CHARS else ""


def check_peer(ssl_object: PeerCertificateSource, expected_id: bytes | None = None,
               allowlist: frozenset[bytes] | None = None) -> bytes:
    """Return the peer's node id after checking it against the id dialled and the allowlist.

    ``expected_id`` None: any id (an inbound connection); ``allowlist`` None: no allowlist (an empty set
    allows nobody). Raises ``PeerIdentityError``; the caller closes the connection.
    """
    peer = peer_node_id(ssl_object)
    if expected_id is not None and peer != expected_id:
        raise PeerIdentityError(f"peer is node {format_node_id(peer)}, expected {_fmt_any(expected_id)}",
                                peer_id=peer, expected_id=expected_id)
    if allowlist is not None and peer not in allowlist:
        raise PeerIdentityError(f"peer node {format_node_id(peer)} is not in the allowlist",
                                peer_id=peer, expected_id=expected_id)
    return peer


def _fmt_any(node_id: bytes) -> str:
    return node_id.hex() if isinstance(node_id, bytes | bytearray) else repr(node_id)
