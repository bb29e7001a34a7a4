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

OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NODE_ID_RE = re.compile(r"[0-9a-fA-F]{64}")

__all__ = [
    "CA_CERT", "CA_KEY", "NODE_CERT", "NODE_ID_BYTES", "NODE_KEY", "OID_CLIENT_AUTH", "OID_SERVER_AUTH",
    "DerError", "IdentityError", "NodeIdentity", "ParsedCertificate", "PeerIdentityError", "Tlv",
    "check_ca_certificate", "check_peer", "check_validity", "client_context", "format_node_id", "format_utc",
    "load_certificate", "node_id_from_cert_der", "node_id_from_cert_file", "parse_allowlist",
    "parse_certificate", "parse_node_id", "peer_node_id", "read_children", "read_file", "read_private_key",
    "read_tlv", "read_whole", "server_context", "utc_now", "validate_node_name",
]


class PeerIdentityError(IdentityError):
    """The peer of a TLS connection is not the node that was dialled, or is not allowed."""

    def __init__(self, message: str, *, peer_id: bytes | None = None, expected_id: bytes | None = None) -> None:
        self.peer_id = peer_id
        self.expected_id = expected_id
        super().__init__(message)


class DerError(IdentityError):
    """Bytes that are not the strict DER expected; the caller says which file or peer they came from."""


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


# ---------------------------------------------------------------- DER reader (sans-I/O)
#
# Only what X.509 certificates and private-key files use: low tag numbers, definite lengths of at most
# four octets, minimal length encoding. Everything else is refused rather than guessed at: the bytes come
# from files an operator may have mangled and from peers before anything else is known about them.

_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x01, 0x02, 0x03, 0x04, 0x06
_UTF8_STRING, _PRINTABLE_STRING, _TELETEX_STRING, _IA5_STRING = 0x0C, 0x13, 0x14, 0x16
_UTC_TIME, _GENERALIZED_TIME, _UNIVERSAL_STRING, _BMP_STRING = 0x17, 0x18, 0x1C, 0x1E
_SEQUENCE, _SET = 0x30, 0x31
_CONSTRUCTED = 0x20
_MAX_LENGTH_OCTETS = 4  # 4 GiB: far beyond any certificate, and it bounds int.from_bytes
_TAG_NAMES = {_BOOLEAN: "BOOLEAN", _INTEGER: "INTEGER", _BIT_STRING: "BIT STRING", _OCTET_STRING: "OCTET STRING",
              _OID: "OBJECT IDENTIFIER", _UTC_TIME: "UTCTime", _GENERALIZED_TIME: "GeneralizedTime",
              _SEQUENCE: "SEQUENCE", _SET: "SET"}

_OID_COMMON_NAME = "2.5.4.3"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_EXT_KEY_USAGE = "2.5.29.37"
_STRING_CODECS = {_UTF8_STRING: "utf-8", _PRINTABLE_STRING: "ascii", _IA5_STRING: "ascii",
                  _TELETEX_STRING: "latin-1", _BMP_STRING: "utf-16-be", _UNIVERSAL_STRING: "utf-32-be"}
_UTC_TIME_RE = re.compile(rb"([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})Z")
_GENERALIZED_TIME_RE = re.compile(rb"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})Z")


@dataclass(frozen=True, slots=True)
class Tlv:
    """One DER element inside a buffer, by offsets, so nested elements are read without copying."""

    tag: int
    start: int  # the identifier octet
    content: int  # the first content octet
    end: int  # one past the last content octet

    def value(self, data: bytes) -> bytes:
        return data[self.content:self.end]

    def encoding(self, data: bytes) -> bytes:
        return data[self.start:self.end]


def read_tlv(data: bytes, offset: int = 0, end: int | None = None) -> Tlv:
    """Read the element at ``offset``; it must end by ``end`` (the enclosing element's end)."""
    limit = len(data) if end is None else end
    if offset >= limit:
        raise DerError(f"truncated: an element expected at offset {offset}, end of data found")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError(f"high tag number at offset {offset}: not used by X.509")
    pos = offset + 1
    if pos >= limit:
        raise DerError(f"truncated: the length of the element at offset {offset} is missing")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError(f"indefinite length at offset {offset}: not DER")
    else:
        count = first & 0x7F
        if count > _MAX_LENGTH_OCTETS:
            raise DerError(f"a length of {count} octets at offset {offset}: too long")
        if count > limit - pos:
            raise DerError(f"truncated: the length of the element at offset {offset} is cut off")
        length = int.from_bytes(data[pos:pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise DerError(f"length at offset {offset} not minimally encoded: not DER")
        pos += count
    if length > limit - pos:
        raise DerError(f"the element at offset {offset} claims {length} bytes, only {limit - pos} are left")
    return Tlv(tag, offset, pos, pos + length)


def read_children(data: bytes, parent: Tlv) -> list[Tlv]:
    """The elements inside a constructed element; they must fill it exactly."""
    if not parent.tag & _CONSTRUCTED:
        raise DerError(f"a primitive element (tag 0x{parent.tag:02x}) at offset {parent.start} where a "
                       "constructed one belongs")
    children = []
    pos = parent.content
    while pos < parent.end:
        child = read_tlv(data, pos, parent.end)
        children.append(child)
        pos = child.end
    return children


def read_whole(data: bytes) -> Tlv:
    """The one element that ``data`` holds, with nothing after it."""
    tlv = read_tlv(data, 0)
    if tlv.end != len(data):
        raise DerError(f"{len(data) - tlv.end} trailing bytes after the element")
    return tlv


def _expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    if tlv.tag != tag:
        raise DerError(f"{what}: expected {_TAG_NAMES.get(tag, f'tag 0x{tag:02x}')}, found tag 0x{tlv.tag:02x} "
                       f"at offset {tlv.start}")
    return tlv


def _children(data: bytes, tlv: Tlv, tag: int, what: str, counts: range) -> list[Tlv]:
    children = read_children(data, _expect(tlv, tag, what))
    if len(children) not in counts:
        raise DerError(f"{what}: {len(children)} elements, expected {counts.start} to {counts.stop - 1}")
    return children


def _oid(data: bytes, tlv: Tlv, what: str) -> str:
    body = _expect(tlv, _OID, what).value(data)
    if not body or body[-1] & 0x80:
        raise DerError(f"{what}: a truncated object identifier")
    arcs: list[int] = []
    value = 0
    fresh = True
    for octet in body:
        if fresh and octet == 0x80:
            raise DerError(f"{what}: object identifier not minimally encoded")
        value = (value << 7) | (octet & 0x7F)
        fresh = not octet & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _boolean(data: bytes, tlv: Tlv, what: str) -> bool:
    body = _expect(tlv, _BOOLEAN, what).value(data)
    if body not in (b"\x00", b"\xff"):
        raise DerError(f"{what}: a BOOLEAN is one octet, 00 or ff")
    return body == b"\xff"


def _integer(data: bytes, tlv: Tlv, what: str) -> int:
    body = _expect(tlv, _INTEGER, what).value(data)
    if not body or (len(body) > 1 and (body[0], body[1] & 0x80) in ((0x00, 0), (0xFF, 0x80))):
        raise DerError(f"{what}: INTEGER empty or not minimally encoded")
    return int.from_bytes(body, "big", signed=True)


def _bit_string(data: bytes, tlv: Tlv, what: str) -> None:
    body = _expect(tlv, _BIT_STRING, what).value(data)
    if not body or body[0] > 7 or (len(body) == 1 and body[0] != 0):
        raise DerError(f"{what}: a malformed BIT STRING")


def _algorithm(data: bytes, tlv: Tlv, what: str) -> str:
    return _oid(data, _children(data, tlv, _SEQUENCE, what, range(1, 3))[0], what)


def _time(data: bytes, tlv: Tlv, what: str) -> dt.datetime:
    pattern = {_UTC_TIME: _UTC_TIME_RE, _GENERALIZED_TIME: _GENERALIZED_TIME_RE}.get(tlv.tag)
    if pattern is None:
        raise DerError(f"{what}: expected UTCTime or GeneralizedTime, found tag 0x{tlv.tag:02x}")
    body = tlv.value(data)
    m = pattern.fullmatch(body)
    if m is None:
        raise DerError(f"{what}: not a DER time (YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ): {body[:20]!r}")
    year, *rest = (int(g) for g in m.groups())
    if tlv.tag == _UTC_TIME:
        year += 1900 if year >= 50 else 2000  # RFC 5280: UTCTime years are 1950-2049
    try:
        return dt.datetime(year, *rest, tzinfo=dt.UTC)
    except ValueError as exc:
        raise DerError(f"{what}: {body.decode('ascii')}: {exc}") from None


def _string(data: bytes, tlv: Tlv, what: str) -> str:
    codec = _STRING_CODECS.get(tlv.tag)
    if codec is None:
        raise DerError(f"{what}: not a directory string (tag 0x{tlv.tag:02x})")
    try:
        return tlv.value(data).decode(codec)
    except UnicodeDecodeError as exc:
        raise DerError(f"{what}: {exc.reason} in a {codec} string") from None


def _common_name(data: bytes, name: Tlv, what: str) -> str | None:
    """The first commonName of a Name, as ``cryptography`` would pick it; every RDN must be well formed."""
    cn: str | None = None
    for rdn in _children(data, name, _SEQUENCE, what, range(0, 1 << 30)):
        for attribute in _children(data, rdn, _SET, what, range(1, 1 << 30)):
            oid_tlv, value = _children(data, attribute, _SEQUENCE, what, range(2, 3))
            if _oid(data, oid_tlv, what) == _OID_COMMON_NAME and cn is None:
                cn = _string(data, value, f"{what} commonName")
    return cn


@dataclass(frozen=True)
class ParsedCertificate:
    """The fields of an X.509 certificate that identity checks need, read by ``parse_certificate``."""

    der: bytes = field(repr=False)
    spki: bytes = field(repr=False)  # the DER of subjectPublicKeyInfo, exactly as in the certificate
    subject_cn: str | None
    issuer_cn: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    extended_key_usage: frozenset[str] | None  # dotted OIDs; None when the extension is absent

    @property
    def node_id(self) -> bytes:
        return hashlib.sha256(self.spki).digest()


def parse_certificate(der: bytes) -> ParsedCertificate:
    """Read a DER X.509 certificate strictly; any deviation is an ``IdentityError``, never another exception.

    The signature is not checked here: OpenSSL does that during handshakes (see ``NodeIdentity.load``).
    """
    data = bytes(der)
    try:
        return _parse_certificate(data)
    except DerError as exc:
        raise DerError(f"not a DER X.509 certificate: {exc}") from None


def _parse_certificate(data: bytes) -> ParsedCertificate:
    tbs, signature_algorithm, signature = _children(data, read_whole(data), _SEQUENCE, "certificate", range(3, 4))
    _algorithm(data, signature_algorithm, "signatureAlgorithm")
    _bit_string(data, signature, "signatureValue")
    fields = _children(data, tbs, _SEQUENCE, "tbsCertificate", range(6, 11))
    version = 0
    if fields[0].tag == 0xA0:  # [0] EXPLICIT Version, absent for v1
        (version_tlv,) = _children(data, fields.pop(0), 0xA0, "version", range(1, 2))
        version = _integer(data, version_tlv, "version")
        if version not in (1, 2):
            raise DerError(f"version: {version + 1} is not X.509 v2 or v3")
    if len(fields) < 6:
        raise DerError(f"tbsCertificate: {len(fields)} fields after the version, expected at least 6")
    serial, algorithm, issuer, validity, subject, spki, *rest = fields
    _integer(data, serial, "serialNumber")
    _algorithm(data, algorithm, "signature")
    issuer_cn = _common_name(data, issuer, "issuer")
    not_before_tlv, not_after_tlv = _children(data, validity, _SEQUENCE, "validity", range(2, 3))
    not_before = _time(data, not_before_tlv, "notBefore")
    not_after = _time(data, not_after_tlv, "notAfter")
    subject_cn = _common_name(data, subject, "subject")
    key_algorithm, public_key = _children(data, spki, _SEQUENCE, "subjectPublicKeyInfo", range(2, 3))
    _algorithm(data, key_algorithm, "subjectPublicKeyInfo algorithm")
    _bit_string(data, public_key, "subjectPublicKey")

    is_ca, eku = False, None
    expected = [0x81, 0x82, 0xA3]  # issuerUniqueID, subjectUniqueID, extensions: optional, in this order
    for tlv in rest:
        if tlv.tag not in expected or version == 0:
            raise DerError(f"tbsCertificate: unexpected field (tag 0x{tlv.tag:02x}) at offset {tlv.start}")
        expected = expected[expected.index(tlv.tag) + 1:]
        if tlv.tag == 0xA3:
            if version != 2:
                raise DerError("extensions in a certificate that is not X.509 v3")
            is_ca, eku = _extensions(data, tlv)
    return ParsedCertificate(der=data, spki=spki.encoding(data), subject_cn=subject_cn, issuer_cn=issuer_cn,
                             not_before=not_before, not_after=not_after, is_ca=is_ca, extended_key_usage=eku)


def _extensions(data: bytes, outer: Tlv) -> tuple[bool, frozenset[str] | None]:
    (extensions,) = _children(data, outer, 0xA3, "extensions", range(1, 2))
    is_ca, eku = False, None
    seen: set[str] = set()
    for extension in _children(data, extensions, _SEQUENCE, "extensions", range(1, 1 << 30)):
        parts = _children(data, extension, _SEQUENCE, "extension", range(2, 4))
        oid = _oid(data, parts[0], "extension id")
        if oid in seen:
            raise DerError(f"extension {oid} appears twice")
        seen.add(oid)
        if len(parts) == 3:
            _boolean(data, parts[1], f"extension {oid} critical")
        inner = _expect(parts[-1], _OCTET_STRING, f"extension {oid} value").value(data)
        if oid == _OID_BASIC_CONSTRAINTS:
            is_ca = _basic_constraints(inner)
        elif oid == _OID_EXT_KEY_USAGE:
            usages = _children(inner, read_whole(inner), _SEQUENCE, "extendedKeyUsage", range(1, 1 << 30))
            eku = frozenset(_oid(inner, u, "extendedKeyUsage") for u in usages)
    return is_ca, eku


def _basic_constraints(inner: bytes) -> bool:
    parts = _children(inner, read_whole(inner), _SEQUENCE, "basicConstraints", range(0, 3))
    is_ca = False
    if parts and parts[0].tag == _BOOLEAN:
        is_ca = _boolean(inner, parts.pop(0), "basicConstraints cA")
    if parts and (len(parts) > 1 or _integer(inner, parts[0], "basicConstraints pathLenConstraint") < 0):
        raise DerError("basicConstraints: expected an optional cA BOOLEAN and an optional pathLenConstraint >= 0")
    return is_ca


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
        return _parse_certificate(der)
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
            parts = _children(der, key, _SEQUENCE, "PrivateKeyInfo", range(3, 6))
            algorithm = _algorithm(der, parts[1], "privateKeyAlgorithm")
        else:
            read_children(der, _expect(key, _SEQUENCE, label))
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
        return hashlib.sha256(self.ca_der).digest()[:8]

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
