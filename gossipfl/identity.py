"""Node identity as the daemon needs it: node ids, loading and checking its own files, the mutual-TLS contexts.

The model (docs/identity.md has the reasons):

- One cluster CA (ECDSA P-256, self-signed, ``ca.key`` + ``ca.crt``) signs every node certificate.
  Trust is membership: a peer is in the cluster when its certificate chains to the cluster CA.
- A node's id is the SHA-256 of its certificate's SubjectPublicKeyInfo (DER): 32 bytes, shown as 64
  lowercase hex digits. It names the key, not the certificate, so a renewed certificate for the same key
  keeps the id. Ids advertised by discovery are hints; after the handshake the peer's certificate must give
  the id that was dialled (``check_peer``), and an optional allowlist narrows the cluster further.
- Peers talk TLS 1.3 only, mutual (both sides present and verify a certificate), trusting the cluster CA
  only (never the system roots), with no hostname check: peers are named by node id, not by DNS.

Standard library only. Importing ``cryptography`` costs a daemon about 11 MB of resident memory on a
device with little of it, and the daemon never makes a certificate, so this module reads the few fields it
checks with a small strict DER reader of its own and leaves signatures, key checks and chain verification
to OpenSSL through ``ssl``. Making certificates (``gossipfl certs``) lives in ``gossipfl.certs``.

Sans-I/O apart from reading the certificate files: no sockets here. ``server_context`` and
``client_context`` build ``ssl.SSLContext`` objects that the daemon hands to ``trio.SSLStream``. The clock
is read only where a caller passes no ``now``.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import logging
import os
import re
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gossipfl.der import (
    OID_CLIENT_AUTH,
    OID_SERVER_AUTH,
    SEQUENCE,
    DerError,
    ParsedCertificate,
    algorithm_oid,
    children,
    expect,
    parse_certificate,
    read_certificate,
    read_children,
    read_whole,
)
from gossipfl.errors import IdentityError

log = logging.getLogger("gossipfl.identity")

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
NODE_ID_BYTES = 32
CLUSTER_TAG_BYTES = 8  # NodeIdentity.cluster_tag: a prefix of the CA certificate's SHA-256
CA_DAYS = 7300
NODE_DAYS = 3650
# Certificates start this long before "now", so a peer whose clock is a little behind still accepts them.
CLOCK_SKEW = dt.timedelta(hours=1)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_ID_RE = re.compile(r"[0-9a-fA-F]{64}")

__all__ = [
    "CA_CERT", "CA_KEY", "CLUSTER_TAG_BYTES", "NODE_CERT", "NODE_ID_BYTES", "NODE_KEY", "IdentityError", "NodeIdentity",
    "PeerIdentityError", "check_ca_certificate", "check_peer", "check_validity", "client_context",
    "format_node_id", "format_utc", "load_certificate", "node_id_from_cert_der", "node_id_from_cert_file",
    "parse_allowlist", "parse_node_id", "peer_node_id", "read_file", "read_private_key", "server_context",
    "utc_now", "validate_node_name",
]


class PeerIdentityError(IdentityError):
    """The peer of a TLS connection is not the node that was dialled, or is not allowed."""

    def __init__(self, message: str, *, peer_id: bytes | None = None, expected_id: bytes | None = None) -> None:
        self.peer_id = peer_id
        self.expected_id = expected_id
        super().__init__(message)


# ---------------------------------------------------------------- node ids


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


def node_id_from_cert_file(path: str | os.PathLike[str]) -> bytes:
    """The node id of a certificate file (PEM or DER)."""
    return load_certificate(Path(path)).node_id


def validate_node_name(name: str) -> str:
    """A node name: 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IdentityError(f"bad node name {name!r}: use 1-63 characters A-Z a-z 0-9 . _ -, "
                            "starting with a letter or digit")
    return name


# ---------------------------------------------------------------- files

_PEM_CERT_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*-----END CERTIFICATE-----")
_PEM_KEY_RE = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY)-----(.*?)-----END \1-----", re.DOTALL)
# PKCS#8 key algorithms: TLS 1.3 signs with these...
_SIGNING_KEYS = {"1.2.840.10045.2.1": "EC", "1.2.840.113549.1.1.1": "RSA", "1.2.840.113549.1.1.10": "RSA-PSS",
                 "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448"}
# ...and cannot with these (DSA signs, but not in TLS 1.3).
_NON_SIGNING_KEYS = {"1.3.101.110": "X25519", "1.3.101.111": "X448", "1.2.840.10040.4.1": "DSA",
                     "1.2.840.113549.1.3.1": "DH", "1.2.840.10046.2.1": "DH"}
_TRADITIONAL_KEYS = {"EC PRIVATE KEY", "RSA PRIVATE KEY"}


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or an ``IdentityError`` that names the file and says what it should have held."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise IdentityError(f"{path}: is a directory, expected the {what}") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def load_certificate(path: Path, data: bytes | None = None) -> ParsedCertificate:
    """The one certificate of a PEM or DER file (``data``: its bytes, if already read)."""
    if data is None:
        data = read_file(path, "certificate")
    if _is_pem(data):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate: not ASCII") from None
        count = text.count(_PEM_CERT_BEGIN)
        if count > 1:
            raise IdentityError(f"{path}: holds {count} certificates, expected exactly one")
        block = _PEM_CERT_RE.search(text)
        if block is None:
            raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate")
        try:
            der = ssl.PEM_cert_to_DER_cert(block[0])
        except ValueError:  # binascii.Error: bad base64 padding
            raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate: bad base64") from None
    else:
        der = data
    try:
        return read_certificate(der)
    except DerError as exc:
        raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate: {exc}") from None


def read_private_key(path: Path) -> bytes:
    """The bytes of a PEM private key file, checked to be usable by a node: unencrypted and able to sign.

    The key itself is parsed by OpenSSL (or by ``cryptography`` in ``gossipfl.certs``); this check exists so
    that an encrypted key, a garbled file or a key type that cannot sign is reported in words rather than as
    an OpenSSL error code, and so that OpenSSL never stops to prompt for a passphrase.
    """
    data = read_file(path, "private key")
    block = _PEM_KEY_RE.search(data.decode("ascii", errors="replace"))
    if block is None:
        raise IdentityError(f"{path}: not a PEM private key")
    label, body = block[1], block[2]
    if label == "ENCRYPTED PRIVATE KEY" or re.search(r"Proc-Type:\s*4,\s*ENCRYPTED", body):
        raise _encrypted_key(path)
    try:
        der = binascii.a2b_base64("".join(body.split()), strict_mode=True)
        key = read_whole(der)
        if label == "PRIVATE KEY":  # PKCS#8: version, AlgorithmIdentifier, privateKey, [attributes], [publicKey]
            parts = children(der, key, SEQUENCE, "PrivateKeyInfo", range(3, 6))
            algorithm = algorithm_oid(der, parts[1], "privateKeyAlgorithm")
        else:
            read_children(der, expect(key, SEQUENCE, label))
            algorithm = ""
    except (ValueError, DerError):  # binascii.Error, or a ValueError for non-ASCII text
        raise IdentityError(f"{path}: not a PEM private key") from None
    kind = _NON_SIGNING_KEYS.get(algorithm) or ("DSA" if label == "DSA PRIVATE KEY" else None)
    if kind is not None:
        raise IdentityError(f"{path}: {kind} keys cannot sign TLS 1.3 handshakes; use an ECDSA key")
    if algorithm not in _SIGNING_KEYS and label not in _TRADITIONAL_KEYS:
        raise IdentityError(f"{path}: unsupported private key type")
    return data


def _encrypted_key(path: Path) -> IdentityError:
    return IdentityError(f"{path}: the private key is encrypted; gossipfl needs an unencrypted key")


def check_ca_certificate(path: Path, cert: ParsedCertificate) -> None:
    """Refuse a trust anchor that is not a CA: OpenSSL would reject every chain to it with a vaguer error."""
    if not cert.is_ca:
        raise IdentityError(f"{path}: not a CA certificate (basicConstraints CA:true missing)")


def _check_node_cert(path: Path, cert: ParsedCertificate) -> None:
    if cert.is_ca:
        raise IdentityError(f"{path}: is a CA certificate, not a node certificate")
    if cert.extended_key_usage is None:
        return
    missing = [n for oid, n in ((OID_SERVER_AUTH, "serverAuth"), (OID_CLIENT_AUTH, "clientAuth"))
               if oid not in cert.extended_key_usage]
    if missing:
        raise IdentityError(f"{path}: extendedKeyUsage lacks {' and '.join(missing)}; a node is both TLS server "
                            "and client")


def check_validity(path: Path, cert: ParsedCertificate, now: dt.datetime) -> None:
    """Refuse a certificate outside its dates, showing them: a wrong clock is the usual cause on a device."""
    if now < cert.not_before:
        raise IdentityError(f"{path}: certificate not valid before {format_utc(cert.not_before)} "
                            f"(now {format_utc(now)}; check the clock)")
    if now > cert.not_after:
        raise IdentityError(f"{path}: certificate expired on {format_utc(cert.not_after)} (now {format_utc(now)})")


def _warn_if_key_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: private key is accessible to group or others (mode %03o); chmod 600 it",
                    path, stat.S_IMODE(mode))


# ---------------------------------------------------------------- loading an identity


@dataclass(frozen=True)
class NodeIdentity:
    """A node's certificate, key and cluster CA, checked to fit together. Make one with ``load``."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    node_id: bytes
    name: str
    not_valid_after: dt.datetime
    # The CA certificate that load() checked: the contexts trust it and nothing else, even if ca.crt changes.
    ca_der: bytes = field(repr=False, compare=False)

    @property
    def node_id_hex(self) -> str:
        return format_node_id(self.node_id)

    @property
    def cluster_tag(self) -> bytes:
        """8 bytes naming the cluster (its CA) in mDNS adverts, so that nodes pass over other clusters'
        adverts instead of dialling them. A hint, like an advertised id: TLS decides membership."""
        return hashlib.sha256(self.ca_der).digest()[:CLUSTER_TAG_BYTES]

    @classmethod
    def load(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str], *,
             now: dt.datetime | None = None) -> NodeIdentity:
        """Load and check: files exist and parse, the key fits the certificate, the CA signed it, it is valid now.

        Every failure is an ``IdentityError`` naming the file at fault, so a daemon refuses to start with a
        sentence an operator can act on rather than failing its first handshake with a peer.
        """
        cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
        t = utc_now(now)
        ca_cert = load_certificate(ca_path)
        check_ca_certificate(ca_path, ca_cert)
        check_validity(ca_path, ca_cert, t)
        node_data = read_file(cert_path, "certificate")
        node_cert = load_certificate(cert_path, node_data)
        if not _is_pem(node_data):
            raise IdentityError(f"{cert_path}: a DER certificate; TLS needs the node certificate in PEM "
                                f"(openssl x509 -inform DER -in {cert_path} -out {cert_path}.pem)")
        read_private_key(key_path)
        identity = cls(cert_path=cert_path, key_path=key_path, ca_path=ca_path, node_id=node_cert.node_id,
                       name=node_cert.subject_cn or "", not_valid_after=node_cert.not_after, ca_der=ca_cert.der)
        contexts = server_context(identity), client_context(identity)  # OpenSSL: does the key fit?
        _check_node_cert(cert_path, node_cert)
        _handshake_with_itself(identity, *contexts, issuer_cn=node_cert.issuer_cn)
        check_validity(cert_path, node_cert, t)
        _warn_if_key_readable(key_path)
        return identity

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], *, now: dt.datetime | None = None) -> NodeIdentity:
        """Load ``node.crt``, ``node.key`` and ``ca.crt`` from one directory, as ``issue_node_cert`` writes them."""
        d = Path(directory)
        return cls.load(d / NODE_CERT, d / NODE_KEY, d / CA_CERT, now=now)


# OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which the ssl module has no name for.
_VERIFY_NO_CHECK_TIME = 0x200000
# X509_V_ERR_* codes that mean "no signature of the cluster CA on this certificate": unable to get issuer
# certificate (2, 20), cannot decrypt or decode the signature or the issuer key (4, 6), bad signature (7),
# self-signed (18, 19), unable to verify the first certificate (21).
_NOT_SIGNED_BY_CA = frozenset({2, 4, 6, 7, 18, 19, 20, 21})
_SELF_HANDSHAKE_ROUNDS = 8  # a TLS 1.3 handshake takes 4; more means something is stuck


def _handshake_with_itself(identity: NodeIdentity, server: ssl.SSLContext, client: ssl.SSLContext, *,
                           issuer_cn: str | None) -> None:
    """Check that the cluster CA signed the certificate, with the OpenSSL verification peers will apply.

    The stdlib cannot verify a signature on its own, but OpenSSL verifies the chain in every handshake:
    so the identity shakes hands with itself, in memory, and each side verifies the other's certificate
    (the node's own) against the CA, exactly as every peer will, key usage and strictness included. Time is
    left out (``now`` was checked from the parsed dates, and a caller may pass a ``now`` other than the clock).
    """
    for ctx in (server, client):
        ctx.verify_flags |= _VERIFY_NO_CHECK_TIME
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    sides = [client.wrap_bio(client_in, client_out, server_side=False),
             server.wrap_bio(server_in, server_out, server_side=True)]
    done: set[int] = set()
    try:
        for _ in range(_SELF_HANDSHAKE_ROUNDS):
            for i, side in enumerate(sides):
                if i not in done:
                    try:
                        side.do_handshake()
                        done.add(i)
                    except ssl.SSLWantReadError:
                        pass
            moved = client_out.pending + server_out.pending
            server_in.write(client_out.read())
            client_in.write(server_out.read())
            if len(done) == len(sides) and not moved:
                return
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NOT_SIGNED_BY_CA:
            raise IdentityError(f"{identity.cert_path}: not signed by the cluster CA in {identity.ca_path} "
                                f"({exc.verify_message}; issuer {issuer_cn!r})") from None
        raise IdentityError(f"{identity.cert_path}: refused by the TLS verification against the cluster CA in "
                            f"{identity.ca_path}: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: a TLS 1.3 handshake with them fails: "
                            f"{exc}") from None
    raise IdentityError(f"{identity.cert_path}: a TLS handshake of this identity with itself did not finish")


# ---------------------------------------------------------------- TLS


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Context for the listening side: TLS 1.3 only, client certificate required, cluster CA only."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.num_tickets = 0  # no session resumption: every connection proves its certificate afresh
    return ctx


def client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Context for the dialling side: TLS 1.3 only, presents our certificate, cluster CA only, no hostname check."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity)


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


class _PassphraseWanted(Exception):
    """Raised from OpenSSL's passphrase callback: a daemon starts unattended, so nobody may be prompted."""


def _refuse_passphrase() -> bytes:
    raise _PassphraseWanted


def _context(protocol: ssl._SSLMethod, identity: NodeIdentity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # before verify_mode: peers are named by node id, checked by check_peer
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cadata=identity.ca_der)  # the CA that load() checked, and nothing else
    except ssl.SSLError as exc:
        raise IdentityError(f"{identity.ca_path}: TLS cannot use this CA certificate: {exc}") from None
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path, password=_refuse_passphrase)
    except _PassphraseWanted:
        raise _encrypted_key(identity.key_path) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise IdentityError(f"{identity.key_path}: this key does not belong to the certificate "
                                f"{identity.cert_path}") from None
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: TLS cannot use them: {exc}") from None
    except OSError as exc:
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: TLS cannot use them: {exc}") from None
    return ctx


# ---------------------------------------------------------------- helpers


def utc_now(now: dt.datetime | None) -> dt.datetime:
    """``now`` in UTC, or the clock when it is None; a naive ``now`` is a bug in the caller."""
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def format_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt_any(node_id: bytes) -> str:
    return node_id.hex() if isinstance(node_id, bytes | bytearray) else repr(node_id)
