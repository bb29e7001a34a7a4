"""Node identity: the cluster CA, node certificates, node ids and the mutual-TLS contexts.

The model (docs/identity.md has the reasons):

- One cluster CA (ECDSA P-256, self-signed, ``ca.key`` + ``ca.crt``) signs every node certificate.
  Trust is membership: a peer is in the cluster when its certificate chains to the cluster CA.
- A node's id is the SHA-256 of its certificate's SubjectPublicKeyInfo (DER): 32 bytes, shown as 64
  lowercase hex digits. It names the key, not the certificate, so a renewed certificate for the same key
  keeps the id. Ids advertised by discovery are hints; after the handshake the peer's certificate must give
  the id that was dialled (``check_peer``), and an optional allowlist narrows the cluster further.
- Peers talk TLS 1.3 only, mutual (both sides present and verify a certificate), trusting the cluster CA
  only (never the system roots), with no hostname check: peers are named by node id, not by DNS.

Sans-I/O apart from reading and writing the certificate files: no sockets here. ``server_context`` and
``client_context`` build ``ssl.SSLContext`` objects that the daemon hands to ``trio.SSLStream``. The clock
is read only where a caller passes no ``now``.
"""

from __future__ import annotations

import contextlib
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

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossipfl.atomic import write_bytes_atomic
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
CA_DAYS = 7300
NODE_DAYS = 3650
# Certificates start this long before "now", so a peer whose clock is a little behind still accepts them.
CLOCK_SKEW = dt.timedelta(hours=1)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_ID_RE = re.compile(r"[0-9a-fA-F]{64}")

__all__ = [
    "CA_CERT", "CA_KEY", "NODE_CERT", "NODE_ID_BYTES", "NODE_KEY",
    "IdentityError", "NodeIdentity", "PeerIdentityError",
    "check_peer", "client_context", "describe_certificate", "format_node_id", "init_ca", "issue_node_cert",
    "node_id_from_cert", "node_id_from_cert_der", "node_id_from_cert_file", "parse_allowlist", "parse_node_id",
    "peer_node_id", "server_context", "validate_node_name",
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


def node_id_from_cert(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo, DER-encoded."""
    try:
        spki = _public_der(cert.public_key())
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise IdentityError(f"certificate {cert.subject.rfc4514_string()!r}: unsupported public key: {exc}") from None
    return hashlib.sha256(spki).digest()


def node_id_from_cert_der(der: bytes) -> bytes:
    """The node id of a DER certificate, as ``getpeercert(binary_form=True)`` returns it."""
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, TypeError):
        raise IdentityError("not a DER X.509 certificate") from None
    return node_id_from_cert(cert)


def node_id_from_cert_file(path: str | os.PathLike[str]) -> bytes:
    """The node id of a certificate file (PEM or DER)."""
    return node_id_from_cert(_load_one_cert(Path(path)))


def validate_node_name(name: str) -> str:
    """A node name: 1-63 characters of A-Z a-z 0-9 . _ - starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IdentityError(f"bad node name {name!r}: use 1-63 characters A-Z a-z 0-9 . _ -, "
                            "starting with a letter or digit")
    return name


# ---------------------------------------------------------------- making certificates


def init_ca(directory: str | os.PathLike[str], name: str = "gossipfl cluster CA", *, days: int = CA_DAYS,
            now: dt.datetime | None = None) -> Path:
    """Create the cluster CA in ``directory``: ``ca.key`` (0600) and ``ca.crt``. Returns the path of ``ca.crt``.

    Refuses to overwrite either file. The directory is created (0700) if missing.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise IdentityError(f"bad CA name {name!r}: use 1-64 printable characters")
    _check_days(days)
    d = Path(directory)
    key_path, cert_path = d / CA_KEY, d / CA_CERT
    _refuse_existing(key_path, cert_path)
    _make_dir(d)
    t = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - CLOCK_SKEW)
        .not_valid_after(t + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_files([(key_path, _private_pem(key), KEY_MODE),
                  (cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)])
    return cert_path


def issue_node_cert(ca_dir: str | os.PathLike[str], name: str, out_dir: str | os.PathLike[str],
                    days: int = NODE_DAYS, *, now: dt.datetime | None = None) -> bytes:
    """Make a node key and a certificate signed by the CA in ``ca_dir``; return the node id.

    Writes ``node.key`` (0600), ``node.crt`` and a copy of ``ca.crt`` into ``out_dir`` (created 0700 if
    missing). Refuses to overwrite any of them; an existing ``ca.crt`` identical to the CA's is left as is.
    The certificate never outlives the CA.
    """
    validate_node_name(name)
    _check_days(days)
    ca_d, out = Path(ca_dir), Path(out_dir)
    ca_cert_path, ca_key_path = ca_d / CA_CERT, ca_d / CA_KEY
    ca_pem = _read(ca_cert_path, "CA certificate")
    ca_cert = _load_one_cert(ca_cert_path, ca_pem)
    ca_key = _load_key(ca_key_path)
    if not _key_matches(ca_key, ca_cert):
        raise IdentityError(f"{ca_key_path}: this key does not belong to the CA certificate {ca_cert_path}")
    _check_is_ca(ca_cert_path, ca_cert)
    t = _now(now)
    _check_validity(ca_cert_path, ca_cert, t)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{ca_key_path}: the CA key must be an ECDSA key")

    key_path, cert_path, copy_path = out / NODE_KEY, out / NODE_CERT, out / CA_CERT
    _refuse_existing(key_path, cert_path)
    copy_ca = True
    if os.path.lexists(copy_path):
        if not copy_path.is_file() or _read(copy_path, "CA certificate") != ca_pem:
            raise IdentityError(f"{copy_path}: already exists (and is not this CA's certificate); "
                                "refusing to overwrite")
        copy_ca = False

    not_before = t - CLOCK_SKEW
    not_after = min(t + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _make_dir(out)
    files = [(key_path, _private_pem(key), KEY_MODE), (cert_path, cert.public_bytes(serialization.Encoding.PEM),
                                                         CERT_MODE)]
    if copy_ca:
        files.append((copy_path, ca_pem, CERT_MODE))
    _write_files(files)
    return node_id_from_cert(cert)


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
    certificate: x509.Certificate = field(repr=False, compare=False)
    ca_certificate: x509.Certificate = field(repr=False, compare=False)

    @property
    def node_id_hex(self) -> str:
        return format_node_id(self.node_id)

    @classmethod
    def load(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str], *,
             now: dt.datetime | None = None) -> NodeIdentity:
        """Load and check: files exist and parse, the key fits the certificate, the CA signed it, it is valid now."""
        cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
        t = _now(now)
        ca_cert = _load_one_cert(ca_path)
        _check_is_ca(ca_path, ca_cert)
        _check_validity(ca_path, ca_cert, t)
        node_cert = _load_one_cert(cert_path)
        private_key = _load_key(key_path)
        if not _key_matches(private_key, node_cert):
            raise IdentityError(f"{key_path}: this key does not belong to the certificate {cert_path}")
        _check_node_cert(cert_path, node_cert)
        try:
            node_cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise IdentityError(f"{cert_path}: not signed by the cluster CA in {ca_path} "
                                f"(issuer {node_cert.issuer.rfc4514_string()!r})") from None
        _check_validity(cert_path, node_cert, t)
        _warn_if_key_readable(key_path)
        cn = node_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(cert_path=cert_path, key_path=key_path, ca_path=ca_path, node_id=node_id_from_cert(node_cert),
                   name=str(cn[0].value) if cn else "", not_valid_after=node_cert.not_valid_after_utc,
                   certificate=node_cert, ca_certificate=ca_cert)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], *, now: dt.datetime | None = None) -> NodeIdentity:
        """Load ``node.crt``, ``node.key`` and ``ca.crt`` from one directory, as ``issue_node_cert`` writes them."""
        d = Path(directory)
        return cls.load(d / NODE_CERT, d / NODE_KEY, d / CA_CERT, now=now)


def describe_certificate(path: str | os.PathLike[str], *, now: dt.datetime | None = None) -> dict[str, Any]:
    """What ``gossipfl certs show`` prints: node id, subject, issuer, validity, CA or not, DNS names."""
    p = Path(path)
    cert = _load_one_cert(p)
    t = _now(now)
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    status = "not yet valid" if t < nb else "expired" if t > na else "valid"
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    return {"file": str(p), "node_id": format_node_id(node_id_from_cert(cert)),
            "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "serial": format(cert.serial_number, "x"), "not_before": _iso(nb), "not_after": _iso(na),
            "status": status, "is_ca": is_ca, "dns_names": list(dns)}


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


def _context(protocol: ssl._SSLMethod, identity: NodeIdentity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # before verify_mode: peers are named by node id, checked by check_peer
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ca_pem = identity.ca_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    ctx.load_verify_locations(cadata=ca_pem)  # the CA that load() checked, and nothing else
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: TLS cannot use them: {exc}") from None
    return ctx


# ---------------------------------------------------------------- helpers


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt_any(node_id: bytes) -> str:
    return node_id.hex() if isinstance(node_id, bytes | bytearray) else repr(node_id)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise IdentityError(f"validity must be a positive number of days, got {days!r}")


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_matches(key: CertificateIssuerPrivateKeyTypes, cert: x509.Certificate) -> bool:
    try:
        return _public_der(key.public_key()) == _public_der(cert.public_key())
    except (UnsupportedAlgorithm, ValueError):
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise IdentityError(f"{path}: is a directory, expected the {what}") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def _load_one_cert(path: Path, data: bytes | None = None) -> x509.Certificate:
    if data is None:
        data = _read(path, "certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate") from None
    if len(certs) != 1:
        raise IdentityError(f"{path}: holds {len(certs)} certificates, expected exactly one")
    return certs[0]


def _load_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(f"{path}: the private key is encrypted; gossipfl needs an unencrypted key") from None
    except UnsupportedAlgorithm:
        raise IdentityError(f"{path}: unsupported private key type") from None
    except ValueError:
        raise IdentityError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                      | ed448.Ed448PrivateKey):
        raise IdentityError(f"{path}: a {type(key).__name__} cannot sign; use an ECDSA key")
    return key


def _check_is_ca(path: Path, cert: x509.Certificate) -> None:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise IdentityError(f"{path}: not a CA certificate (basicConstraints CA:true missing)")


def _check_node_cert(path: Path, cert: x509.Certificate) -> None:
    exts = cert.extensions
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise IdentityError(f"{path}: is a CA certificate, not a node certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    missing = [n for oid, n in ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")) if oid not in eku]
    if missing:
        raise IdentityError(f"{path}: extendedKeyUsage lacks {' and '.join(missing)}; a node is both TLS server "
                            "and client")


def _check_validity(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{path}: certificate not valid before {_iso(cert.not_valid_before_utc)} "
                            f"(now {_iso(now)}; check the clock)")
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{path}: certificate expired on {_iso(cert.not_valid_after_utc)} (now {_iso(now)})")


def _warn_if_key_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: private key is accessible to group or others (mode %03o); chmod 600 it",
                    path, stat.S_IMODE(mode))


def _refuse_existing(*paths: Path) -> None:
    for p in paths:
        if os.path.lexists(p):
            raise IdentityError(f"{p}: already exists; refusing to overwrite")


def _make_dir(d: Path) -> None:
    try:
        d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise IdentityError(f"{d}: exists and is not a directory") from None
    except OSError as exc:
        raise IdentityError(f"{d}: cannot create the directory: {exc.strerror or exc}") from None


def _write_files(files: list[tuple[Path, bytes, int]]) -> None:
    """Write each file atomically; if one fails, remove the ones already written so a retry can start clean."""
    done: list[Path] = []
    for path, data, mode in files:
        try:
            write_bytes_atomic(path, data, mode=mode)
        except OSError as exc:
            for p in done:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise IdentityError(f"{path}: cannot write: {exc.strerror or exc}") from None
        done.append(path)
