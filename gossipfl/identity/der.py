"""A strict DER reader (sans-I/O) and the fields of an X.509 certificate that gossipfl's identity checks need.

Why not ``cryptography``: importing it costs a daemon about 11 MB of resident memory, and the daemon needs
only a node id (the SHA-256 of the subjectPublicKeyInfo), validity dates, the subject CN, basicConstraints
and extendedKeyUsage. Signatures and chains are verified by OpenSSL through the stdlib ``ssl`` module
(``gossipfl.cli.tls``). Only what certificates and key files use is read: low tag numbers, definite
lengths of at most four octets, minimal length encoding. Everything else is refused rather than guessed at:
the bytes come from files an operator may have mangled and from peers before anything else is known about
them. Every failure is a ``DerError`` (an ``IdentityError``), never another exception.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field

from gossipfl.errors import IdentityError

OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"


class DerError(IdentityError):
    """Bytes that are not the strict DER expected; the caller says which file or peer they came from."""


_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x01, 0x02, 0x03, 0x04, 0x06
_UTF8_STRING, _PRINTABLE_STRING, _TELETEX_STRING, _IA5_STRING = 0x0C, 0x13, 0x14, 0x16
_UTC_TIME, _GENERALIZED_TIME, _UNIVERSAL_STRING, _BMP_STRING = 0x17, 0x18, 0x1C, 0x1E
SEQUENCE, _SET = 0x30, 0x31
_CONSTRUCTED = 0x20
_MAX_LENGTH_OCTETS = 4  # 4 GiB: far beyond any certificate, and it bounds int.from_bytes
_TAG_NAMES = {_BOOLEAN: "BOOLEAN", _INTEGER: "INTEGER", _BIT_STRING: "BIT STRING", _OCTET_STRING: "OCTET STRING",
              _OID: "OBJECT IDENTIFIER", _UTC_TIME: "UTCTime", _GENERALIZED_TIME: "GeneralizedTime",
              SEQUENCE: "SEQUENCE", _SET: "SET"}

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


def expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    if tlv.tag != tag:
        raise DerError(f"{what}: expected {_TAG_NAMES.get(tag, f'tag 0x{tag:02x}')}, found tag 0x{tlv.tag:02x} "
                       f"at offset {tlv.start}")
    return tlv


def children(data: bytes, tlv: Tlv, tag: int, what: str, counts: range) -> list[Tlv]:
    children = read_children(data, expect(tlv, tag, what))
    if len(children) not in counts:
        raise DerError(f"{what}: {len(children)} elements, expected {counts.start} to {counts.stop - 1}")
    return children


def _oid(data: bytes, tlv: Tlv, what: str) -> str:
    body = expect(tlv, _OID, what).value(data)
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
    body = expect(tlv, _BOOLEAN, what).value(data)
    if body not in (b"\x00", b"\xff"):
        raise DerError(f"{what}: a BOOLEAN is one octet, 00 or ff")
    return body == b"\xff"


def _integer(data: bytes, tlv: Tlv, what: str) -> int:
    body = expect(tlv, _INTEGER, what).value(data)
    if not body or (len(body) > 1 and (body[0], body[1] & 0x80) in ((0x00, 0), (0xFF, 0x80))):
        raise DerError(f"{what}: INTEGER empty or not minimally encoded")
    return int.from_bytes(body, "big", signed=True)


def _bit_string(data: bytes, tlv: Tlv, what: str) -> None:
    body = expect(tlv, _BIT_STRING, what).value(data)
    if not body or body[0] > 7 or (len(body) == 1 and body[0] != 0):
        raise DerError(f"{what}: a malformed BIT STRING")


def algorithm_oid(data: bytes, tlv: Tlv, what: str) -> str:
    return _oid(data, children(data, tlv, SEQUENCE, what, range(1, 3))[0], what)


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
    for rdn in children(data, name, SEQUENCE, what, range(0, 1 << 30)):
        for attribute in children(data, rdn, _SET, what, range(1, 1 << 30)):
            oid_tlv, value = children(data, attribute, SEQUENCE, what, range(2, 3))
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

    The signature is not checked here: OpenSSL does that during handshakes (see ``gossipfl.cli.tls.load_identity``).
    """
    data = bytes(der)
    try:
        return read_certificate(data)
    except DerError as exc:
        raise DerError(f"not a DER X.509 certificate: {exc}") from None


def read_certificate(data: bytes) -> ParsedCertificate:
    tbs, signature_algorithm, signature = children(data, read_whole(data), SEQUENCE, "certificate", range(3, 4))
    algorithm_oid(data, signature_algorithm, "signatureAlgorithm")
    _bit_string(data, signature, "signatureValue")
    fields = children(data, tbs, SEQUENCE, "tbsCertificate", range(6, 11))
    version = 0
    if fields[0].tag == 0xA0:  # [0] EXPLICIT Version, absent for v1
        (version_tlv,) = children(data, fields.pop(0), 0xA0, "version", range(1, 2))
        version = _integer(data, version_tlv, "version")
        if version not in (1, 2):
            raise DerError(f"version: {version + 1} is not X.509 v2 or v3")
    if len(fields) < 6:
        raise DerError(f"tbsCertificate: {len(fields)} fields after the version, expected at least 6")
    serial, algorithm, issuer, validity, subject, spki, *rest = fields
    _integer(data, serial, "serialNumber")
    algorithm_oid(data, algorithm, "signature")
    issuer_cn = _common_name(data, issuer, "issuer")
    not_before_tlv, not_after_tlv = children(data, validity, SEQUENCE, "validity", range(2, 3))
    not_before = _time(data, not_before_tlv, "notBefore")
    not_after = _time(data, not_after_tlv, "notAfter")
    subject_cn = _common_name(data, subject, "subject")
    key_algorithm, public_key = children(data, spki, SEQUENCE, "subjectPublicKeyInfo", range(2, 3))
    algorithm_oid(data, key_algorithm, "subjectPublicKeyInfo algorithm")
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
    (extensions,) = children(data, outer, 0xA3, "extensions", range(1, 2))
    is_ca, eku = False, None
    seen: set[str] = set()
    for extension in children(data, extensions, SEQUENCE, "extensions", range(1, 1 << 30)):
        parts = children(data, extension, SEQUENCE, "extension", range(2, 4))
        oid = _oid(data, parts[0], "extension id")
        if oid in seen:
            raise DerError(f"extension {oid} appears twice")
        seen.add(oid)
        if len(parts) == 3:
            _boolean(data, parts[1], f"extension {oid} critical")
        inner = expect(parts[-1], _OCTET_STRING, f"extension {oid} value").value(data)
        if oid == _OID_BASIC_CONSTRAINTS:
            is_ca = _basic_constraints(inner)
        elif oid == _OID_EXT_KEY_USAGE:
            usages = children(inner, read_whole(inner), SEQUENCE, "extendedKeyUsage", range(1, 1 << 30))
            eku = frozenset(_oid(inner, u, "extendedKeyUsage") for u in usages)
    return is_ca, eku


def _basic_constraints(inner: bytes) -> bool:
    parts = children(inner, read_whole(inner), SEQUENCE, "basicConstraints", range(0, 3))
    is_ca = False
    if parts and parts[0].tag == _BOOLEAN:
        is_ca = _boolean(inner, parts.pop(0), "basicConstraints cA")
    if parts and (len(parts) > 1 or _integer(inner, parts[0], "basicConstraints pathLenConstraint") < 0):
        raise DerError("basicConstraints: expected an optional cA BOOLEAN and an optional pathLenConstraint >= 0")
    return is_ca
