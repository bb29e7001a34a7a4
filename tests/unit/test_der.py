"""The strict DER reader of gossipfl.identity.der, against cryptography and against mutated certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipfl.errors import IdentityError
from gossipfl.identity.der import OID_CLIENT_AUTH, OID_SERVER_AUTH, DerError, parse_certificate, read_tlv, read_whole
from gossipfl.identity.ids import (
    node_id_from_cert_der,
)
from gossipfl.identity.node import (
    CA_CERT,
    load_certificate,
)

from ..conftest import cert_of, cluster_keys, make_cert

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
    code = ("import sys, gossipfld.main, gossipfld.app, gossipfl.identity.node, gossipfl.cli.tls; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
