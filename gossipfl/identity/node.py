"""A node's identity: reading and checking its certificate, key and cluster CA files, and ``NodeIdentity``.

The model (docs/identity.md has the reasons):

- One cluster CA (ECDSA P-256, self-signed, ``ca.key`` + ``ca.crt``) signs every node certificate.
  Trust is membership: a peer is in the cluster when its certificate chains to the cluster CA.
- A node is named by its node id (``ids``): the SHA-256 of its certificate's public key.
- Peers talk TLS 1.3 only, mutual (both sides present and verify a certificate), trusting the cluster CA
  only (never the system roots), with no hostname check: peers are named by node id, not by DNS.

Standard library only. Importing ``cryptography`` costs a daemon about 11 MB of resident memory on a
device with little of it, and the daemon never makes a certificate, so this module reads the few fields it
checks with a small strict DER reader of its own (``der``) and leaves signatures, key checks and chain
verification to OpenSSL: ``gossipfl.cli.tls.load_identity`` runs what ``read_identity`` checks here, then
builds the TLS contexts and shakes hands with itself. Making certificates (``gossipfl certs``) lives in
``gossipfl.cli.certs``.

No I/O apart from reading the files, and no clock: every date check takes the ``now`` its caller read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gossipfl.errors import IdentityError
from gossipfl.identity.der import (
    OID_CLIENT_AUTH,
    OID_SERVER_AUTH,
    SEQUENCE,
    DerError,
    ParsedCertificate,
    algorithm_oid,
    children,
    expect,
    read_certificate,
    read_children,
    read_whole,
)
from gossipfl.identity.ids import CLUSTER_TAG_BYTES, format_node_id

log = logging.getLogger("gossipfl.identity")

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
CA_DAYS = 7300
NODE_DAYS = 3650
# Certificates start this long before "now", so a peer whose clock is a little behind still accepts them.
CLOCK_SKEW = dt.timedelta(hours=1)

__all__ = [
    "CA_CERT", "CA_KEY", "NODE_CERT", "NODE_KEY", "NodeIdentity", "as_utc", "check_ca_certificate",
    "check_node_cert", "check_validity", "encrypted_key", "format_utc", "load_certificate",
    "node_id_from_cert_file", "read_file", "read_identity", "read_private_key", "warn_if_key_readable",
]


# ---------------------------------------------------------------- files

_PEM_CERT_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_CERT_END = "-----END CERTIFICATE-----"
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
            # what ssl.PEM_cert_to_DER_cert does, without importing ssl
            der = base64.decodebytes(block[0][len(_PEM_CERT_BEGIN):-len(_PEM_CERT_END)].encode("ascii"))
        except ValueError:  # binascii.Error: bad base64 padding
            raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate: bad base64") from None
    else:
        der = data
    try:
        return read_certificate(der)
    except DerError as exc:
        raise IdentityError(f"{path}: not a PEM (or DER) X.509 certificate: {exc}") from None


def node_id_from_cert_file(path: str | os.PathLike[str]) -> bytes:
    """The node id of a certificate file (PEM or DER)."""
    return load_certificate(Path(path)).node_id


def read_private_key(path: Path) -> bytes:
    """The bytes of a PEM private key file, checked to be usable by a node: unencrypted and able to sign.

    The key itself is parsed by OpenSSL (or by ``cryptography`` in ``gossipfl.cli.certs``); this check exists so
    that an encrypted key, a garbled file or a key type that cannot sign is reported in words rather than as
    an OpenSSL error code, and so that OpenSSL never stops to prompt for a passphrase.
    """
    data = read_file(path, "private key")
    block = _PEM_KEY_RE.search(data.decode("ascii", errors="replace"))
    if block is None:
        raise IdentityError(f"{path}: not a PEM private key")
    label, body = block[1], block[2]
    if label == "ENCRYPTED PRIVATE KEY" or re.search(r"Proc-Type:\s*4,\s*ENCRYPTED", body):
        raise encrypted_key(path)
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


def encrypted_key(path: Path) -> IdentityError:
    return IdentityError(f"{path}: the private key is encrypted; gossipfl needs an unencrypted key")


def check_ca_certificate(path: Path, cert: ParsedCertificate) -> None:
    """Refuse a trust anchor that is not a CA: OpenSSL would reject every chain to it with a vaguer error."""
    if not cert.is_ca:
        raise IdentityError(f"{path}: not a CA certificate (basicConstraints CA:true missing)")


def check_node_cert(path: Path, cert: ParsedCertificate) -> None:
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


def warn_if_key_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: private key is accessible to group or others (mode %03o); chmod 600 it",
                    path, stat.S_IMODE(mode))


# ---------------------------------------------------------------- the identity


@dataclass(frozen=True)
class NodeIdentity:
    """A node's certificate, key and cluster CA, checked to fit together. Make one with
    ``gossipfl.cli.tls.load_identity`` (``read_identity`` alone skips the checks that need OpenSSL)."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    node_id: bytes
    name: str
    not_valid_after: dt.datetime
    # The CA certificate that read_identity() checked: the contexts trust it and nothing else, even if ca.crt changes.
    ca_der: bytes = field(repr=False, compare=False)

    @property
    def node_id_hex(self) -> str:
        return format_node_id(self.node_id)

    @property
    def cluster_tag(self) -> bytes:
        """8 bytes naming the cluster (its CA) in mDNS adverts, so that nodes pass over other clusters'
        adverts instead of dialling them. A hint, like an advertised id: TLS decides membership."""
        return hashlib.sha256(self.ca_der).digest()[:CLUSTER_TAG_BYTES]


def read_identity(cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str], *,
                  now: dt.datetime) -> tuple[NodeIdentity, ParsedCertificate]:
    """What can be checked of an identity without OpenSSL: the CA certificate is a CA and valid at ``now``,
    the node certificate parses and is PEM, the key file is an unencrypted key that can sign.

    Returns the identity and its parsed node certificate, for the checks that follow the TLS ones
    (``check_node_cert``, ``check_validity``; see ``gossipfl.cli.tls.load_identity``).
    """
    cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
    t = as_utc(now)
    ca_cert = load_certificate(ca_path)
    check_ca_certificate(ca_path, ca_cert)
    check_validity(ca_path, ca_cert, t)
    node_data = read_file(cert_path, "certificate")
    node_cert = load_certificate(cert_path, node_data)
    if not _is_pem(node_data):
        raise IdentityError(f"{cert_path}: a DER certificate; TLS needs the node certificate in PEM "
                            f"(openssl x509 -inform DER -in {cert_path} -out {cert_path}.pem)")
    read_private_key(key_path)
    identity = NodeIdentity(cert_path=cert_path, key_path=key_path, ca_path=ca_path, node_id=node_cert.node_id,
                            name=node_cert.subject_cn or "", not_valid_after=node_cert.not_after, ca_der=ca_cert.der)
    return identity, node_cert


# ---------------------------------------------------------------- helpers


def as_utc(now: dt.datetime) -> dt.datetime:
    """``now`` in UTC; a naive ``now`` is a bug in the caller (the clock is read by the caller, never here)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def format_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
