"""Node identity: certificates on disk, node ids, and real mutual TLS 1.3 over trio on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipfl.certs import describe_certificate, init_ca, issue_node_cert
from gossipfl.der import (
    OID_CLIENT_AUTH,
    OID_SERVER_AUTH,
    DerError,
    parse_certificate,
    read_tlv,
    read_whole,
)
from gossipfl.errors import GossipflError, IdentityError
from gossipfl.identity import (
    CA_CERT,
    CA_KEY,
    NODE_CERT,
    NODE_KEY,
    NodeIdentity,
    PeerIdentityError,
    check_peer,
    client_context,
    format_node_id,
    load_certificate,
    node_id_from_cert_der,
    node_id_from_cert_file,
    parse_allowlist,
    parse_node_id,
    peer_node_id,
    server_context,
    validate_node_name,
)

from .conftest import one_line_error, run_cli

TIMEOUT = 10


# ---------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Pki:
    root: Path
    ca: Path
    a: NodeIdentity
    b: NodeIdentity
    a_id: bytes
    b_id: bytes
    other_ca: Path
    rogue: NodeIdentity  # certificate from the other CA
    rogue_id: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    a_id = issue_node_cert(root / "ca", "node-a", root / "a")
    b_id = issue_node_cert(root / "ca", "node-b", root / "b")
    init_ca(root / "other-ca", "some other CA")
    rogue_id = issue_node_cert(root / "other-ca", "node-a", root / "rogue")
    return Pki(root=root, ca=root / "ca", a=NodeIdentity.from_dir(root / "a"), b=NodeIdentity.from_dir(root / "b"),
               a_id=a_id, b_id=b_id, other_ca=root / "other-ca", rogue=NodeIdentity.from_dir(root / "rogue"),
               rogue_id=rogue_id)


def node_copy(pki: Pki, src: str, tmp_path: Path) -> Path:
    dst = tmp_path / src
    shutil.copytree(pki.root / src, dst)
    return dst


def trusting(identity: NodeIdentity, ca: NodeIdentity) -> NodeIdentity:
    """An impostor: its own certificate and key, but it trusts (knows) the cluster CA's public certificate."""
    return dataclasses.replace(identity, ca_path=ca.ca_path, ca_der=ca.ca_der)


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def bare_client_context(ca: Path, *, cert: Path | None = None, key: Path | None = None,
                        max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


# ---------------------------------------------------------------- a real TLS exchange


SERVER_MSG = b"model delta from the server"
CLIENT_MSG = b"model delta from the client"


async def _side(stream: trio.SSLStream, message: bytes, out: dict, check) -> None:
    try:
        await stream.do_handshake()
        out["handshake"] = True
        out["peer_id"] = check(stream)
        await stream.send_all(message)
        received = b""
        while len(received) < len(message):
            chunk = await stream.receive_some()
            if not chunk:
                break
            received += chunk
        out["received"] = received
    except (trio.BrokenResourceError, PeerIdentityError) as exc:
        out["error"] = exc
    finally:
        await trio.aclose_forcefully(stream)


def exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *,
             server_check=peer_node_id, client_check=peer_node_id) -> tuple[dict, dict]:
    """One connection on 127.0.0.1: handshake, check the peer, send a message each way. Returns what each saw."""
    server: dict = {"handshake": False, "received": b""}
    client: dict = {"handshake": False, "received": b""}

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            listener = listeners[0]
            port = listener.socket.getsockname()[1]

            async def serve() -> None:
                tcp = await listener.accept()
                await _side(trio.SSLStream(tcp, server_ctx, server_side=True), SERVER_MSG, server, server_check)

            async def dial() -> None:
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                await _side(trio.SSLStream(tcp, client_ctx, server_hostname=None), CLIENT_MSG, client, client_check)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(dial)
            await listener.aclose()

    trio.run(main)
    return server, client


def assert_refused(side: dict) -> None:
    """The side got no application data, and its failure is a BrokenResourceError (an SSL error underneath)."""
    assert side["received"] == b""
    assert isinstance(side.get("error"), trio.BrokenResourceError), side
    assert isinstance(side["error"].__cause__, ssl.SSLError | OSError), side


# ---------------------------------------------------------------- TLS tests


def test_contexts_are_tls13_mutual_cluster_ca_only(pki):
    for ctx in (server_context(pki.a), client_context(pki.a)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        cas = ctx.get_ca_certs(binary_form=True)
        assert len(cas) == 1 and cas[0] == cert_of(pki.a.ca_path).public_bytes(serialization.Encoding.DER)


def test_two_nodes_of_one_ca_handshake_and_see_each_others_id(pki):
    server, client = exchange(server_context(pki.a), client_context(pki.b))
    assert server["received"] == CLIENT_MSG and client["received"] == SERVER_MSG
    assert server["peer_id"] == pki.b_id == pki.b.node_id
    assert client["peer_id"] == pki.a_id == pki.a.node_id
    assert pki.a_id != pki.b_id


def test_expected_id_and_allowlist_pass_for_the_right_peer(pki):
    server, client = exchange(server_context(pki.a), client_context(pki.b),
                              server_check=lambda s: check_peer(s, None, frozenset({pki.b_id, pki.rogue_id})),
                              client_check=lambda s: check_peer(s, pki.a_id, frozenset({pki.a_id})))
    assert server["peer_id"] == pki.b_id and client["peer_id"] == pki.a_id
    assert server["received"] == CLIENT_MSG and client["received"] == SERVER_MSG


def test_server_refuses_a_certificate_from_another_ca(pki):
    # The impostor trusts the cluster CA, so only the server's check can stop it. With TLS 1.3 the client's
    # do_handshake() completes; it learns of the refusal on its first receive.
    server, client = exchange(server_context(pki.a), client_context(trusting(pki.rogue, pki.a)))
    assert server["handshake"] is False
    assert_refused(server)
    assert isinstance(server["error"].__cause__, ssl.SSLCertVerificationError)
    assert "peer_id" not in server
    assert client["handshake"] is True  # the TLS 1.3 quirk: the refused client's handshake "succeeds"...
    assert_refused(client)  # ...and its first receive fails, with no data through


def test_client_refuses_a_server_certificate_from_another_ca(pki):
    server, client = exchange(server_context(trusting(pki.rogue, pki.a)), client_context(pki.a))
    assert client["handshake"] is False
    assert_refused(client)
    assert isinstance(client["error"].__cause__, ssl.SSLCertVerificationError)
    assert_refused(server)
    assert "peer_id" not in server and "peer_id" not in client


def test_two_clusters_never_talk(pki):
    server, client = exchange(server_context(pki.a), client_context(pki.rogue))
    assert_refused(server)
    assert_refused(client)


def test_client_without_certificate_is_refused(pki):
    server, client = exchange(server_context(pki.a), bare_client_context(pki.a.ca_path))
    assert server["handshake"] is False
    assert_refused(server)
    assert "certificate" in str(server["error"].__cause__).lower()
    assert_refused(client)


def test_tls12_is_refused_both_ways(pki):
    old_client = bare_client_context(pki.b.ca_path, cert=pki.b.cert_path, key=pki.b.key_path,
                                     max_version=ssl.TLSVersion.TLSv1_2)
    server, client = exchange(server_context(pki.a), old_client)
    assert server["handshake"] is False and client["handshake"] is False
    assert_refused(server)
    assert_refused(client)

    old_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old_server.maximum_version = ssl.TLSVersion.TLSv1_2
    old_server.load_cert_chain(pki.a.cert_path, pki.a.key_path)
    server, client = exchange(old_server, client_context(pki.b))
    assert client["handshake"] is False
    assert_refused(client)
    assert_refused(server)


def test_check_peer_detects_a_different_id(pki):
    # b is a valid cluster member, but the client dialled the address advertised for someone else
    server, client = exchange(server_context(pki.b), client_context(pki.a),
                              client_check=lambda s: check_peer(s, pki.rogue_id, None))
    err = client["error"]
    assert isinstance(err, PeerIdentityError) and isinstance(err, IdentityError)
    assert err.peer_id == pki.b_id and err.expected_id == pki.rogue_id
    assert format_node_id(pki.b_id) in str(err) and format_node_id(pki.rogue_id) in str(err)
    assert client["received"] == b"" and server["received"] == b""


def test_allowlist_refuses_a_member_not_listed(pki):
    server, client = exchange(server_context(pki.a), client_context(pki.b),
                              server_check=lambda s: check_peer(s, None, frozenset({pki.rogue_id})))
    err = server["error"]
    assert isinstance(err, PeerIdentityError) and err.peer_id == pki.b_id
    assert "allowlist" in str(err)
    assert server["received"] == b"" and client["received"] == b""
    # an empty allowlist allows nobody; None means no allowlist
    _, client = exchange(server_context(pki.a), client_context(pki.b),
                         client_check=lambda s: check_peer(s, None, frozenset()))
    assert isinstance(client["error"], PeerIdentityError)


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
    assert NodeIdentity.load(path, pki.a.key_path, pki.a.ca_path).node_id == pki.a_id


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


def make_cert(issuer_key, issuer_name: x509.Name, key, name: str, not_before: dt.datetime,
              not_after: dt.datetime, eku: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # OpenSSL's strict verification (peers', and load()'s self-handshake) wants the issuer's key id
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


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
    ident = NodeIdentity.from_dir(tmp_path / "n")
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
    assert NodeIdentity.from_dir(tmp_path).node_id == node_id


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
        NodeIdentity.from_dir(d)
    pem = (pki.root / "a" / NODE_CERT).read_bytes()
    (d / NODE_CERT).write_bytes(pem[:40] + b"!!!!" + pem[44:])  # broken base64 inside the armour
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: not a PEM"):
        NodeIdentity.from_dir(d)
    shutil.copy(pki.root / "a" / NODE_CERT, d / NODE_CERT)
    (d / NODE_KEY).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: not a PEM private key"):
        NodeIdentity.from_dir(d)
    shutil.copy(pki.root / "a" / NODE_KEY, d / NODE_KEY)
    (d / CA_CERT).write_bytes(b"")
    with pytest.raises(IdentityError, match=rf"{d / CA_CERT}: not a PEM"):
        NodeIdentity.from_dir(d)
    (d / CA_CERT).unlink()
    with pytest.raises(IdentityError, match=rf"{d / CA_CERT}: certificate not found"):
        NodeIdentity.from_dir(d)


def test_wrong_key_names_the_key_file(pki, tmp_path):
    d = node_copy(pki, "a", tmp_path)
    shutil.copy(pki.root / "b" / NODE_KEY, d / NODE_KEY)
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: this key does not belong to the certificate"):
        NodeIdentity.from_dir(d)


def test_encrypted_key_is_refused(pki, tmp_path):
    d = node_copy(pki, "a", tmp_path)
    key = serialization.load_pem_private_key((d / NODE_KEY).read_bytes(), None)
    (d / NODE_KEY).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(IdentityError, match=rf"{d / NODE_KEY}: the private key is encrypted"):
        NodeIdentity.from_dir(d)


def test_certificate_of_another_ca_names_the_file(pki, tmp_path):
    d = node_copy(pki, "rogue", tmp_path)
    shutil.copy(pki.ca / CA_CERT, d / CA_CERT)
    with pytest.raises(IdentityError, match=rf"{d / NODE_CERT}: not signed by the cluster CA") as err:
        NodeIdentity.from_dir(d)
    assert "unable to get local issuer certificate; issuer 'some other CA'" in str(err.value), "OpenSSL's reason"


def test_ca_and_node_roles_are_checked(pki, tmp_path):
    with pytest.raises(IdentityError, match=rf"{pki.root / 'a' / NODE_CERT}: not a CA certificate"):
        NodeIdentity.load(pki.b.cert_path, pki.b.key_path, pki.root / "a" / NODE_CERT)
    with pytest.raises(IdentityError, match=rf"{pki.ca / CA_CERT}: is a CA certificate, not a node"):
        NodeIdentity.load(pki.ca / CA_CERT, pki.ca / CA_KEY, pki.ca / CA_CERT)


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
        NodeIdentity.from_dir(d)
    assert describe_certificate(d / NODE_CERT)["status"] == status


def test_validity_uses_the_time_passed_in(pki):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    with pytest.raises(IdentityError, match="expired on"):
        NodeIdentity.from_dir(pki.root / "a", now=later)
    with pytest.raises(IdentityError, match="not valid before"):
        NodeIdentity.from_dir(pki.root / "a", now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))


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


# ---------------------------------------------------------------- CLI


def gossipfl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("certs", *args, check=check, timeout=120)


def test_cli_init_issue_show(tmp_path):
    ca, node = tmp_path / "ca", tmp_path / "node"
    out = gossipfl("init-ca", "--dir", str(ca), "--name", "lab CA").stdout
    assert str(ca / CA_KEY) in out and str(ca / CA_CERT) in out
    printed = gossipfl("issue", "--ca", str(ca), "--name", "sensor-7", "--out", str(node)).stdout
    assert printed.endswith("\n") and len(printed.splitlines()) == 1
    node_id = printed.strip()
    assert parse_node_id(node_id) == node_id_from_cert_file(node / NODE_CERT)
    assert NodeIdentity.from_dir(node).node_id_hex == node_id
    assert stat.S_IMODE((node / NODE_KEY).stat().st_mode) == 0o600

    human = gossipfl("show", str(node / NODE_CERT)).stdout
    assert f"node id   {node_id}" in human
    assert "CN=sensor-7" in human and "CN=lab CA" in human and "(valid)" in human
    info = json.loads(gossipfl("show", str(node / NODE_CERT), "--json").stdout)
    assert info["node_id"] == node_id and info["subject"] == "CN=sensor-7" and info["issuer"] == "CN=lab CA"
    assert info["status"] == "valid" and info["is_ca"] is False
    assert info["not_before"] < info["not_after"]

    again = one_line_error(gossipfl("issue", "--ca", str(ca), "--name", "sensor-7", "--out", str(node), check=False))
    assert f"{node / NODE_KEY}: already exists" in again


def test_cli_bad_input_is_one_line(tmp_path):
    line = one_line_error(gossipfl("issue", "--ca", str(tmp_path / "missing"), "--name", "n", "--out",
                                   str(tmp_path / "n"), check=False))
    assert line.startswith("gossipfl: error:") and str(tmp_path / "missing" / CA_CERT) in line
    init_ca(tmp_path / "ca")
    line = one_line_error(gossipfl("issue", "--ca", str(tmp_path / "ca"), "--name", "two words", "--out",
                                   str(tmp_path / "n"), check=False))
    assert "bad node name" in line
    line = one_line_error(gossipfl("show", str(tmp_path / "ca" / CA_KEY), check=False))
    assert f"{tmp_path / 'ca' / CA_KEY}: not a PEM" in line


# ---------------------------------------------------------------- the loader's own checks (OpenSSL underneath)


def write_cert(path: Path, cert: x509.Certificate, encoding=serialization.Encoding.PEM) -> Path:
    path.write_bytes(cert.public_bytes(encoding))
    return path


def cluster_keys(pki: Pki):
    ca_key = serialization.load_pem_private_key((pki.ca / CA_KEY).read_bytes(), None)
    key = serialization.load_pem_private_key(pki.a.key_path.read_bytes(), None)
    return ca_key, key


def test_the_time_passed_in_governs_the_signature_check_too(tmp_path):
    # OpenSSL alone would call this certificate expired; load() checks time from now= only, so back then it is fine.
    clock = dt.datetime.now(dt.UTC)
    init_ca(tmp_path / "ca", now=clock - dt.timedelta(days=60))
    node_id = issue_node_cert(tmp_path / "ca", "old", tmp_path / "old", days=5, now=clock - dt.timedelta(days=30))
    with pytest.raises(IdentityError, match="expired on"):
        NodeIdentity.from_dir(tmp_path / "old")
    assert NodeIdentity.from_dir(tmp_path / "old", now=clock - dt.timedelta(days=28)).node_id == node_id


def test_a_tampered_signature_is_not_signed_by_the_ca(pki, tmp_path):
    der = bytearray(cert_of(pki.a.cert_path).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature: still well-formed DER, no longer a valid signature
    path = write_cert(tmp_path / "tampered.crt", x509.load_der_x509_certificate(bytes(der)))
    with pytest.raises(IdentityError, match=rf"{path}: not signed by the cluster CA in {pki.a.ca_path} \(") as err:
        NodeIdentity.load(path, pki.a.key_path, pki.a.ca_path)
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
        NodeIdentity.load(path, pki.a.key_path, pki.a.ca_path)


def test_extended_key_usage_must_allow_server_and_client(pki, tmp_path):
    ca_key, key = cluster_keys(pki)
    now = dt.datetime.now(dt.UTC)
    cert = make_cert(ca_key, cert_of(pki.ca / CA_CERT).subject, key, "node-a", now - dt.timedelta(days=1),
                     now + dt.timedelta(days=1), eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    path = write_cert(tmp_path / "server-only.crt", cert)
    with pytest.raises(IdentityError, match=rf"{path}: extendedKeyUsage lacks clientAuth"):
        NodeIdentity.load(path, pki.a.key_path, pki.a.ca_path)


def test_der_files(pki, tmp_path):
    ca_der = write_cert(tmp_path / "ca.der", cert_of(pki.ca / CA_CERT), serialization.Encoding.DER)
    assert NodeIdentity.load(pki.a.cert_path, pki.a.key_path, ca_der).node_id == pki.a_id
    node_der = write_cert(tmp_path / "node.der", cert_of(pki.a.cert_path), serialization.Encoding.DER)
    assert node_id_from_cert_file(node_der) == pki.a_id
    with pytest.raises(IdentityError, match=rf"{node_der}: a DER certificate; TLS needs the node certificate in PEM"):
        NodeIdentity.load(node_der, pki.a.key_path, pki.a.ca_path)


def test_a_file_of_two_certificates_is_refused(pki, tmp_path):
    path = tmp_path / "two.crt"
    path.write_bytes(pki.a.cert_path.read_bytes() + pki.b.cert_path.read_bytes())
    with pytest.raises(IdentityError, match=rf"{path}: holds 2 certificates, expected exactly one"):
        NodeIdentity.load(path, pki.a.key_path, pki.a.ca_path)


def test_a_key_that_cannot_sign_is_named(pki, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import x25519

    path = tmp_path / "x25519.key"
    path.write_bytes(x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(IdentityError, match=rf"{path}: X25519 keys cannot sign"):
        NodeIdentity.load(pki.a.cert_path, path, pki.a.ca_path)


def test_garbled_key_files_are_not_pem_private_keys(pki, tmp_path):
    path = tmp_path / "bad.key"
    pem = pki.a.key_path.read_bytes()
    for data in (b"", pem.replace(b"-----END", b"-----FIN"), pem[:40] + b"\xff\xfe" + pem[42:], pem[:60] + pem[64:],
                 b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"):
        path.write_bytes(data)
        with pytest.raises(IdentityError, match=rf"{path}: not a PEM private key"):
            NodeIdentity.load(pki.a.cert_path, path, pki.a.ca_path)


def test_a_traditional_encrypted_key_is_refused_without_a_prompt(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.a.key_path.read_bytes(), None)
    path = tmp_path / "enc.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(IdentityError, match=rf"{path}: the private key is encrypted"):
        NodeIdentity.load(pki.a.cert_path, path, pki.a.ca_path)


# ---------------------------------------------------------------- the DER reader


def issued(ca_key, issuer: x509.Name, public_key, not_before: dt.datetime, not_after: dt.datetime,
           **kwargs) -> x509.Certificate:
    return make_cert(ca_key, issuer, _PublicOnly(public_key), "reader-test", not_before, not_after, **kwargs)


class _PublicOnly:
    def __init__(self, public_key) -> None:
        self._public = public_key

    def public_key(self):
        return self._public


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_node_id_and_fields_agree_with_cryptography(pki, key_type):
    ca_key, _ = cluster_keys(pki)
    key = ec.generate_private_key(ec.SECP256R1()) if key_type == "p256" else ed25519.Ed25519PrivateKey.generate()
    # UTCTime up to 2049 (two-digit years: 50 is 1950, 49 is 2049), GeneralizedTime from 2050
    for nb, na in (((2020, 1, 2, 3, 4, 5), (2049, 12, 31, 23, 59, 59)),
                   ((1950, 1, 1, 0, 0, 0), (2060, 2, 29, 12, 0, 1))):
        cert = issued(ca_key, cert_of(pki.ca / CA_CERT).subject, key.public_key(), dt.datetime(*nb, tzinfo=dt.UTC),
                      dt.datetime(*na, tzinfo=dt.UTC), eku=[ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH])
        der = cert.public_bytes(serialization.Encoding.DER)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        assert (b"\x18\x0f" + str(na[0]).encode() in der) == (na[0] >= 2050)
        parsed = parse_certificate(der)
        assert parsed.spki == spki
        assert node_id_from_cert_der(der) == hashlib.sha256(spki).digest() == parsed.node_id
        assert (parsed.not_before, parsed.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)
        assert parsed.subject_cn == "reader-test" and parsed.issuer_cn == "gossipfl cluster CA"
        assert parsed.is_ca is False
        assert parsed.extended_key_usage == {OID_SERVER_AUTH, OID_CLIENT_AUTH}


def test_fields_of_the_generated_certificates(pki):
    ca = load_certificate(pki.ca / CA_CERT)
    assert ca.is_ca and ca.extended_key_usage is None and ca.subject_cn == ca.issuer_cn == "gossipfl cluster CA"
    node = load_certificate(pki.a.cert_path)
    assert not node.is_ca and node.subject_cn == "node-a" and node.node_id == pki.a_id
    assert node.not_after == cert_of(pki.a.cert_path).not_valid_after_utc


def test_tlv_reader_refuses_what_is_not_strict_der():
    assert read_whole(b"\x04\x02ab").content == 2
    assert read_tlv(b"\x04\x81\x80" + b"x" * 128).end == 131
    cases = {
        b"": "truncated",
        b"\x30": "length .* missing",
        b"\x30\x80\x00\x00": "indefinite length",
        b"\x04\x05abc": "claims 5 bytes, only 3",
        b"\x04\x84\xff\xff\xff\xffabc": "claims 4294967295 bytes",
        b"\x04\x85\x00\x00\x00\x00\x01a": "length of 5 octets",
        b"\x04\x82\x01": "cut off",
        b"\x04\x81\x05abcde": "not minimally encoded",
        b"\x04\x82\x00\x85" + b"x" * 133: "not minimally encoded",
        b"\x1f\x01\x00": "high tag number",
        b"\x04\x01ab": "1 trailing bytes",
    }
    for data, message in cases.items():
        with pytest.raises(DerError, match=message):
            read_whole(data)


def test_garbage_and_truncated_certificates_are_identity_errors(pki):
    der = cert_of(pki.a.cert_path).public_bytes(serialization.Encoding.DER)
    for data in (b"", b"\x00", b"\x30\x00", b"\x30\x03\x02\x01\x01", der[:-1], der + b"\x00", der[:100],
                 b"\x30\x80" + der[2:], b"\x30\x84\x7f\xff\xff\xff" + der[4:], b"\x04" + der[1:], bytes(500)):
        with pytest.raises(IdentityError, match=r"not a DER X\.509 certificate"):
            parse_certificate(data)
    for cut in range(0, len(der), 7):
        with pytest.raises(IdentityError):
            node_id_from_cert_der(der[:cut])


def test_a_mangled_pem_file_names_the_file(pki, tmp_path):
    path = tmp_path / "bad.crt"
    pem = pki.a.cert_path.read_bytes()
    for data in (pem.replace(b"-----END", b"-----FIN"), pem[:60] + pem[64:],
                 pem[:200] + b"\n-----END CERTIFICATE-----\n",
                 b"-----BEGIN CERTIFICATE-----\n\xff\xfe\n-----END CERTIFICATE-----\n"):
        path.write_bytes(data)
        with pytest.raises(IdentityError, match=rf"{path}: not a PEM \(or DER\) X.509 certificate"):
            load_certificate(path)


_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, arg in mutations:
        i = where % (len(out) + 1)
        if op == "set" and i < len(out):
            out[i] = arg
        elif op == "flip" and i < len(out):
            out[i] ^= 1 << arg
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = bytes([arg])
        elif op == "delete":
            del out[i:i + arg]
    return bytes(out)


@pytest.fixture(scope="module")
def real_ders(pki) -> list[bytes]:
    paths = [pki.ca / CA_CERT, pki.a.cert_path, pki.rogue.cert_path]
    return [cert_of(p).public_bytes(serialization.Encoding.DER) for p in paths]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_certificates_only_raise_identity_error(real_ders, which, mutations):
    data = _mutate(real_ders[which], mutations)
    try:
        parsed = parse_certificate(data)
    except IdentityError:
        return
    assert len(parsed.node_id) == 32 and parsed.spki in data


def test_the_daemon_does_not_import_cryptography():
    code = ("import sys, gossipfld.main, gossipfld.node, gossipfl.identity; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
