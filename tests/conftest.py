"""Shared fixtures: the bundled digits data set, small models from the zoo, a small PKI, the CLI as a process."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gossipfl.cli.certs import init_ca, issue_node_cert
from gossipfl.cli.tls import load_identity_dir
from gossipfl.identity.node import CA_KEY, NodeIdentity
from gossipfl.learning.datasets import load_digits, train_test_split, write_csv
from gossipfl.learning.zoo import ArchSpec, build

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits()
    return train_test_split(x, y, test_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = digits
    write_csv(root / "train" / "digits.csv", x_train, y_train)
    write_csv(root / "test" / "digits.csv", x_test, y_test)
    return root / "train", root / "test"


@pytest.fixture
def mlp():
    return build(ArchSpec("mlp", inputs=64, classes=10, hidden=(32,), seed=3))


def rows(n: int, features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n)


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``gossipfl ARGS`` as a real process, as an operator runs it."""
    proc = subprocess.run([sys.executable, "-m", "gossipfl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's contract for errors: a non-zero exit and exactly one line on stderr, no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------- a small PKI (identity tests)


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
    return Pki(root=root, ca=root / "ca", a=load_identity_dir(root / "a"), b=load_identity_dir(root / "b"),
               a_id=a_id, b_id=b_id, other_ca=root / "other-ca", rogue=load_identity_dir(root / "rogue"),
               rogue_id=rogue_id)


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


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cluster_keys(pki: Pki):
    ca_key = serialization.load_pem_private_key((pki.ca / CA_KEY).read_bytes(), None)
    key = serialization.load_pem_private_key(pki.a.key_path.read_bytes(), None)
    return ca_key, key
