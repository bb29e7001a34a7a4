"""Making certificates: the cluster CA, node certificates, and ``gossipfl certs show``.

Apart from ``gossipfl.identity`` because this is the only part that needs ``cryptography`` (keys, signing,
name rendering), and importing that costs about 11 MB of resident memory: the daemon loads and checks its
identity with ``gossipfl.identity`` and ``gossipfl.cli.tls`` alone and never imports this module. Reading
certificate files and the checks on them (one certificate per file, CA or not, validity) are
``gossipfl.identity``'s, so the CLI and the daemon refuse the same files with the same words.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossipfl.atomic import write_bytes_atomic
from gossipfl.cli.tls import utc_now
from gossipfl.errors import IdentityError
from gossipfl.identity.der import ParsedCertificate
from gossipfl.identity.ids import format_node_id, node_id_from_cert_der, validate_node_name
from gossipfl.identity.node import (
    CA_CERT,
    CA_DAYS,
    CA_KEY,
    CERT_MODE,
    CLOCK_SKEW,
    DIR_MODE,
    KEY_MODE,
    NODE_CERT,
    NODE_DAYS,
    NODE_KEY,
    check_ca_certificate,
    check_validity,
    format_utc,
    load_certificate,
    read_file,
    read_private_key,
)

__all__ = ["describe_certificate", "init_ca", "issue_node_cert"]


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
    t = utc_now(now)
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
    ca_pem = read_file(ca_cert_path, "CA certificate")
    ca_parsed = load_certificate(ca_cert_path, ca_pem)
    ca_key = _load_key(ca_key_path)
    if _public_der(ca_key.public_key()) != ca_parsed.spki:
        raise IdentityError(f"{ca_key_path}: this key does not belong to the CA certificate {ca_cert_path}")
    check_ca_certificate(ca_cert_path, ca_parsed)
    t = utc_now(now)
    check_validity(ca_cert_path, ca_parsed, t)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{ca_key_path}: the CA key must be an ECDSA key")
    ca_cert = _x509(ca_cert_path, ca_parsed)

    key_path, cert_path, copy_path = out / NODE_KEY, out / NODE_CERT, out / CA_CERT
    _refuse_existing(key_path, cert_path)
    copy_ca = True
    if os.path.lexists(copy_path):
        if not copy_path.is_file() or read_file(copy_path, "CA certificate") != ca_pem:
            raise IdentityError(f"{copy_path}: already exists (and is not this CA's certificate); "
                                "refusing to overwrite")
        copy_ca = False

    not_before = t - CLOCK_SKEW
    not_after = min(t + dt.timedelta(days=days), ca_parsed.not_after)
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
    return node_id_from_cert_der(cert.public_bytes(serialization.Encoding.DER))


def describe_certificate(path: str | os.PathLike[str], *, now: dt.datetime | None = None) -> dict[str, Any]:
    """What ``gossipfl certs show`` prints: node id, subject, issuer, validity, CA or not, DNS names."""
    p = Path(path)
    parsed = load_certificate(p)
    cert = _x509(p, parsed)
    t = utc_now(now)
    status = "not yet valid" if t < parsed.not_before else "expired" if t > parsed.not_after else "valid"
    try:  # cryptography decodes names and extensions lazily, so their errors come here
        subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
        dns = _dns_names(cert)
    except ValueError as exc:
        raise IdentityError(f"{p}: a malformed certificate: {exc}") from None
    return {"file": str(p), "node_id": format_node_id(parsed.node_id), "subject": subject, "issuer": issuer,
            "serial": format(cert.serial_number, "x"), "not_before": format_utc(parsed.not_before),
            "not_after": format_utc(parsed.not_after), "status": status, "is_ca": parsed.is_ca,
            "dns_names": dns}


# ---------------------------------------------------------------- helpers


def _x509(path: Path, parsed: ParsedCertificate) -> x509.Certificate:
    """The ``cryptography`` object of a certificate that ``gossipfl.identity`` has read and checked."""
    try:
        return x509.load_der_x509_certificate(parsed.der)
    except ValueError as exc:
        raise IdentityError(f"{path}: a malformed certificate: {exc}") from None


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


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


def _load_key(path: Path) -> PrivateKeyTypes:
    data = read_private_key(path)  # exists, PEM, unencrypted, a type that can sign: said in words there
    try:
        return serialization.load_pem_private_key(data, password=None)
    except UnsupportedAlgorithm:
        raise IdentityError(f"{path}: unsupported private key type") from None
    except (TypeError, ValueError):
        raise IdentityError(f"{path}: not a PEM private key") from None


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
