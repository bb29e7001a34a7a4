"""Node identity: certificates on disk, node ids, and loading an identity (OpenSSL's checks in memory)."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossipfl.cli.certs import describe_certificate, init_ca, issue_node_cert
from gossipfl.cli.tls import load_identity, load_identity_dir
from gossipfl.errors import GossipflError, IdentityError
from gossipfl.identity.der import DerError
from gossipfl.identity.ids import (
    PeerIdentityError,
    check_peer,
    format_node_id,
    node_id_from_cert_der,
    parse_allowlist,
    parse_node_id,
    peer_node_id,
    validate_node_name,
)
from gossipfl.identity.node import (
    CA_CERT,
    CA_KEY,
    NODE_CERT,
    NODE_KEY,
    node_id_from_cert_file,
)

from ..conftest import Pki, cert_of, cluster_keys, make_cert

# ---------------------------------------------------------------- helpers


def node_copy(pki: Pki, src: str, tmp_path: Path) -> Path:
    dst = tmp_path / src
    shutil.copytree(pki.root / src, dst)
    return dst


def test_peer_node_id_without_a_certificate():
    class NoHandshake:
        def getpeercert(self, binary_form=False):
            raise ValueError("handshake not done yet")

    class NoCert:
        def getpeercert(self, binary_form=False):
            return None

    with pytest.raises(PeerIdentityError, match="not complete"):
        peer_node_id(NoHandshake())
    with pytest.raises(PeerIdentityError, match="no certificate"):
        check_peer(NoCert(), None, None)


# ---------------------------------------------------------------- node ids


def test_node_id_is_sha256_of_spki(pki):
    cert = x509.load_pem_x509_certificate(pki.a.cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pki.a_id == hashlib.sha256(spki).digest()
    assert len(pki.a_id) == 32
    assert node_id_from_cert_file(pki.a.cert_path) == pki.a_id
    assert node_id_from_cert_der(cert.public_bytes(serialization.Encoding.DER)) == pki.a_id
    with pytest.raises(IdentityError, match="DER"):
        node_id_from_cert_der(b"\x30\x03garbage")


def test_node_id_matches_openssl(pki):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command not installed")
    pub = subprocess.run([openssl, "x509", "-in", str(pki.a.cert_path), "-noout", "-pubkey"], capture_output=True,
                         check=True).stdout
    der = subprocess.run([openssl, "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True,
                         check=True).stdout
    assert hashlib.sha256(der).digest() == pki.a_id


def test_renewed_certificate_for_the_same_key_keeps_the_id(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.a.key_path.read_bytes(), None)
    ca_key = serialization.load_pem_private_key((pki.ca / CA_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    renewed = make_cert(ca_key, cert_of(pki.a.ca_path).subject, key, "node-a", now - dt.timedelta(days=1),
                        now + dt.timedelta(days=30))
    path = tmp_path / "renewed.crt"
    path.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
    assert node_id_from_cert_file(path) == pki.a_id
    assert load_identity(path, pki.a.key_path, pki.a.ca_path).node_id == pki.a_id


def test_format_and_parse_node_id():
    raw = bytes(range(32))
    text = format_node_id(raw)
    assert text == raw.hex() and len(text) == 64 and text == text.lower()
    assert parse_node_id(text) == raw
    assert parse_node_id(text.upper()) == raw
    bad = [text[:-1], text + "0", " " + text, text + "\n", "0x" + text[2:], text[:-1] + "g", "", text[:32] + ":" +
           text[33:], "٣" * 64]
    for item in bad:
        with pytest.raises(IdentityError, match="not a node id"):
            parse_node_id(item)
    with pytest.raises(IdentityError):
        parse_node_id(raw)  # type: ignore[arg-type]
    for item in (b"", raw[:31], raw + b"\0", text):
        with pytest.raises(IdentityError):
            format_node_id(item)  # type: ignore[arg-type]
    assert parse_allowlist([text]) == frozenset({raw})
    with pytest.raises(IdentityError):
        parse_allowlist([text, "nope"])


def test_node_names():
    for good in ("a", "node-1", "Node_2.lab", "x" * 63, "0"):
        assert validate_node_name(good) == good
    for bad in ("", "x" * 64, "has space", "slash/no", "-lead", ".hidden", "ümlaut", "a\n", None):
        with pytest.raises(IdentityError, match="bad node name"):
            validate_node_name(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


def test_layout_and_modes(pki):
    assert stat.S_IMODE((pki.ca / CA_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((pki.ca / CA_CERT).stat().st_mode) == 0o644
    assert stat.S_IMODE((pki.root / "a" / NODE_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((pki.root / "a" / NODE_CERT).stat().st_mode) == 0o644
    assert stat.S_IMODE(pki.ca.stat().st_mode) == 0o700
    assert sorted(p.name for p in (pki.root / "a").iterdir()) == [CA_CERT, NODE_CERT, NODE_KEY]
    assert (pki.root / "a" / CA_CERT).read_bytes() == (pki.ca / CA_CERT).read_bytes()
    assert pki.a.name == "node-a"


def test_certificate_contents(pki):
    ca = cert_of(pki.a.ca_path)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=19 * 365)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"

    node = cert_of(pki.a.cert_path)
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert node.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]
    assert node.subject.rfc4514_string() == "CN=node-a"
    assert node.issuer == ca.subject
    assert isinstance(node.public_key(), ec.EllipticCurvePublicKey)


def test_node_certificate_never_outlives_the_ca(tmp_path):
    init_ca(tmp_path / "ca", days=30)
    issue_node_cert(tmp_path / "ca", "n", tmp_path / "n", days=365)
    ident = load_identity_dir(tmp_path / "n")
    assert ident.not_valid_after == cert_of(ident.ca_path).not_valid_after_utc


def test_init_ca_refuses_to_overwrite(tmp_path):
    init_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / CA_KEY).read_bytes()
    with pytest.raises(IdentityError, match=r"ca\.key: already exists"):
        init_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / CA_KEY).read_bytes() == before
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CA_CERT).write_text("left over")
    with pytest.raises(IdentityError, match=r"half/ca\.crt: already exists"):
        init_ca(tmp_path / "half")
    assert not (tmp_path / "half" / CA_KEY).exists()


def test_issue_refuses_to_overwrite(pki, tmp_path):
    issue_node_cert(pki.ca, "n1", tmp_path / "n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "n").iterdir()}
    with pytest.raises(IdentityError, match=r"node\.key: already exists"):
        issue_node_cert(pki.ca, "n1", tmp_path / "n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "n").iterdir()} == before
    # a ca.crt of another CA in the target directory is not overwritten either
    (tmp_path / "m").mkdir()
    shutil.copy(pki.other_ca / CA_CERT, tmp_path / "m" / CA_CERT)
    with pytest.raises(IdentityError, match=r"m/ca\.crt: already exists"):
        issue_node_cert(pki.ca, "n2", tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CA_CERT]


def test_issue_into_the_ca_directory_keeps_its_ca_crt(tmp_path):
    init_ca(tmp_path)
    ca_pem = (tmp_path / CA_CERT).read_bytes()
    node_id = issue_node_cert(tmp_path, "solo", tmp_path)
    assert (tmp_path / CA_CERT).read_bytes() == ca_pem
    assert load_identity_dir(tmp_path).node_id == node_id


def test_issue_with_a_missing_or_broken_ca(pki, tmp_path):
    with pytest.raises(IdentityError, match=r"nowhere/ca\.crt: CA certificate not found"):
        issue_node_cert(tmp_path / "nowhere", "n", tmp_path / "out")
    ca = node_copy(pki, "ca", tmp_path)
    shutil.copy(pki.other_ca / CA_KEY, ca / CA_KEY)
    with pytest.raises(IdentityError, match=rf"{ca / CA_KEY}: this key does not belong"):
        issue_node_cert(ca, "n", tmp_path / "out")
    with pytest.raises(IdentityError, match=rf"{pki.root / 'a' / CA_KEY}: private key not found"):
        issue_node_cert(pki.root / "a", "n", tmp_path / "out")  # a node directory holds no CA key
    assert not (tmp_path / "out").exists()


def test_corrupt_pem_names_the_file(pki, tmp_path):
    d = node_copy(pki, "a", tmp_path)
    (d / NODE_CERT).write_bytes(b"this is not a certificate\n")
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: not a PEM"):
        load_identity_dir(d)
    pem = (pki.root / "a" / NODE_CERT).read_bytes()
    (d / NODE_CERT).write_bytes(pem[:40] + b"!!!!" + pem[44:])  # broken base64 inside the armour
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: not a PEM"):
        load_identity_dir(d)
    shutil.copy(pki.root / "a" / NODE_CERT, d / NODE_CERT)
    (d / NODE_KEY).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: not a PEM private key"):
        load_identity_dir(d)
    shutil.copy(pki.root / "a" / NODE_KEY, d / NODE_KEY)
    (d / CA_CERT).write_bytes(b"")
    with pytest.raises(IdentityError, match=rf"{d / CA_CERT}: not a PEM"):
        load_identity_dir(d)
    (d / CA_CERT).unlink()
    with pytest.raises(IdentityError, match=rf"{d / CA_CERT}: certificate not found"):
        load_identity_dir(d)


def test_wrong_key_names_the_key_file(pki, tmp_path):
    d = node_copy(pki, "a", tmp_path)
    shutil.copy(pki.root / "b" / NODE_KEY, d / NODE_KEY)
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: this key does not belong to the certificate"):
        load_identity_dir(d)


def test_encrypted_key_is_refused(pki, tmp_path):
    d = node_copy(pki, "a", tmp_path)
    key = serialization.load_pem_private_key((d / NODE_KEY).read_bytes(), None)
    (d / NODE_KEY).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: the private key is encrypted"):
        load_identity_dir(d)


def test_certificate_of_another_ca_names_the_file(pki, tmp_path):
    d = node_copy(pki, "rogue", tmp_path)
    shutil.copy(pki.ca / CA_CERT, d / CA_CERT)
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: not signed by the cluster CA") as err:
        load_identity_dir(d)
    assert "unable to get local issuer certificate; issuer 'some other CA'" in str(err.value), "OpenSSL's reason"


def test_ca_and_node_roles_are_checked(pki, tmp_path):
    with pytest.raises(IdentityError, match=rf"{pki.root / 'a' / NODE_CERT}: not a CA certificate"):
        load_identity(pki.b.cert_path, pki.b.key_path, pki.root / "a" / NODE_CERT)
    with pytest.raises(IdentityError, match=rf"{pki.ca / CA_CERT}: is a CA certificate, not a node"):
        load_identity(pki.ca / CA_CERT, pki.ca / CA_KEY, pki.ca / CA_CERT)


@pytest.mark.parametrize(("start", "end", "message", "status"), [
    (-30, -1, "expired on", "expired"),
    (1, 30, "not valid before", "not yet valid"),
])
def test_certificate_outside_its_validity_names_the_file(pki, tmp_path, start, end, message, status):
    d = node_copy(pki, "a", tmp_path)
    ca_key = serialization.load_pem_private_key((pki.ca / CA_KEY).read_bytes(), None)
    key = serialization.load_pem_private_key((d / NODE_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = make_cert(ca_key, cert_of(pki.a.ca_path).subject, key, "node-a", now + dt.timedelta(days=start),
                     now + dt.timedelta(days=end))
    (d / NODE_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: certificate {message}"):
        load_identity_dir(d)
    assert describe_certificate(d / NODE_CERT)["status"] == status


def test_validity_uses_the_time_passed_in(pki):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    with pytest.raises(IdentityError, match="expired on"):
        load_identity_dir(pki.root / "a", now=later)
    with pytest.raises(IdentityError, match="not valid before"):
        load_identity_dir(pki.root / "a", now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))


def test_describe_certificate(pki):
    info = describe_certificate(pki.a.cert_path)
    assert info["node_id"] == format_node_id(pki.a_id)
    assert info["subject"] == "CN=node-a" and info["issuer"] == "CN=gossipfl cluster CA"
    assert info["status"] == "valid" and info["is_ca"] is False and info["dns_names"] == ["node-a"]
    assert info["not_before"].endswith("Z") and info["not_after"] > info["not_before"]
    assert describe_certificate(pki.ca / CA_CERT)["is_ca"] is True
    with pytest.raises(IdentityError, match=r"node\.key: not a PEM"):
        describe_certificate(pki.a.key_path)


def test_identity_error_is_a_gossipfl_error():
    assert issubclass(DerError, IdentityError)
    assert issubclass(IdentityError, GossipflError) and issubclass(PeerIdentityError, IdentityError)


# ---------------------------------------------------------------- the loader's own checks (OpenSSL underneath)


def write_cert(path: Path, cert: x509.Certificate, encoding=serialization.Encoding.PEM) -> Path:
    path.write_bytes(cert.public_bytes(encoding))
    return path


def test_the_time_passed_in_governs_the_signature_check_too(tmp_path):
    # OpenSSL alone would call this certificate expired; load() checks time from now= only, so back then it is fine.
    clock = dt.datetime.now(dt.UTC)
    init_ca(tmp_path / "ca", now=clock - dt.timedelta(days=60))
    node_id = issue_node_cert(tmp_path / "ca", "old", tmp_path / "old", days=5, now=clock - dt.timedelta(days=30))
    with pytest.raises(IdentityError, match="expired on"):
        load_identity_dir(tmp_path / "old")
    assert load_identity_dir(tmp_path / "old", now=clock - dt.timedelta(days=28)).node_id == node_id


def test_a_tampered_signature_is_not_signed_by_the_ca(pki, tmp_path):
    der = bytearray(cert_of(pki.a.cert_path).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature: still well-formed DER, no longer a valid signature
    path = write_cert(tmp_path / "tampered.crt", x509.load_der_x509_certificate(bytes(der)))
    with pytest.raises(IdentityError, match=rf"{path}: not signed by the cluster CA in {pki.a.ca_path} \(") as err:
        load_identity(path, pki.a.key_path, pki.a.ca_path)
    assert "signature" in str(err.value)


def test_what_every_peer_would_refuse_is_refused_at_load(pki, tmp_path):
    # No authorityKeyIdentifier: peers verify with VERIFY_X509_STRICT and would refuse every connection.
    ca_key, key = cluster_keys(pki)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
            .issuer_name(cert_of(pki.ca / CA_CERT).subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    path = write_cert(tmp_path / "no-aki.crt", cert)
    with pytest.raises(IdentityError, match=rf"{path}: refused by the TLS verification against the cluster CA in "
                                            r".*Authority Key Identifier"):
        load_identity(path, pki.a.key_path, pki.a.ca_path)


def test_extended_key_usage_must_allow_server_and_client(pki, tmp_path):
    ca_key, key = cluster_keys(pki)
    now = dt.datetime.now(dt.UTC)
    cert = make_cert(ca_key, cert_of(pki.ca / CA_CERT).subject, key, "node-a", now - dt.timedelta(days=1),
                     now + dt.timedelta(days=1), eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    path = write_cert(tmp_path / "server-only.crt", cert)
    with pytest.raises(IdentityError, match=rf"{path}: extendedKeyUsage lacks clientAuth"):
        load_identity(path, pki.a.key_path, pki.a.ca_path)


def test_der_files(pki, tmp_path):
    ca_der = write_cert(tmp_path / "ca.der", cert_of(pki.ca / CA_CERT), serialization.Encoding.DER)
    assert load_identity(pki.a.cert_path, pki.a.key_path, ca_der).node_id == pki.a_id
    node_der = write_cert(tmp_path / "node.der", cert_of(pki.a.cert_path), serialization.Encoding.DER)
    assert node_id_from_cert_file(node_der) == pki.a_id
    with pytest.raises(IdentityError, match=rf"{node_der}: a DER certificate; TLS needs the node certificate in PEM"):
        load_identity(node_der, pki.a.key_path, pki.a.ca_path)


def test_a_file_of_two_certificates_is_refused(pki, tmp_path):
    path = tmp_path / "two.crt"
    path.write_bytes(pki.a.cert_path.read_bytes() + pki.b.cert_path.read_bytes())
    with pytest.raises(IdentityError, match=rf"{path}: holds 2 certificates, expected exactly one"):
        load_identity(path, pki.a.key_path, pki.a.ca_path)


def test_a_key_that_cannot_sign_is_named(pki, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import x25519

    path = tmp_path / "x25519.key"
    path.write_bytes(x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(IdentityError, match=rf"{path}: X25519 keys cannot sign"):
        load_identity(pki.a.cert_path, path, pki.a.ca_path)


def test_garbled_key_files_are_not_pem_private_keys(pki, tmp_path):
    path = tmp_path / "bad.key"
    pem = pki.a.key_path.read_bytes()
    for data in (b"", pem.replace(b"-----END", b"-----FIN"), pem[:40] + b"\xff\xfe" + pem[42:], pem[:60] + pem[64:],
                 b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"):
        path.write_bytes(data)
        with pytest.raises(IdentityError, match=rf"{path}: not a PEM private key"):
            load_identity(pki.a.cert_path, path, pki.a.ca_path)


def test_a_traditional_encrypted_key_is_refused_without_a_prompt(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.a.key_path.read_bytes(), None)
    path = tmp_path / "enc.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(IdentityError, match=rf"{path}: the private key is encrypted"):
        load_identity(pki.a.cert_path, path, pki.a.ca_path)


