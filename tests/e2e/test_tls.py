"""Real mutual TLS 1.3 over trio on 127.0.0.1 with the contexts of gossipfl.cli.tls, and ``gossipfl certs``."""

from __future__ import annotations

import dataclasses
import json
import ssl
import stat
import subprocess
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization

from gossipfl.cli.certs import init_ca
from gossipfl.cli.tls import client_context, load_identity_dir, server_context
from gossipfl.errors import IdentityError
from gossipfl.identity.ids import (
    PeerIdentityError,
    check_peer,
    format_node_id,
    parse_node_id,
    peer_node_id,
)
from gossipfl.identity.node import (
    CA_CERT,
    CA_KEY,
    NODE_CERT,
    NODE_KEY,
    NodeIdentity,
    node_id_from_cert_file,
)

from ..conftest import cert_of, one_line_error, run_cli

TIMEOUT = 10


def trusting(identity: NodeIdentity, ca: NodeIdentity) -> NodeIdentity:
    """An impostor: its own certificate and key, but it trusts (knows) the cluster CA's public certificate."""
    return dataclasses.replace(identity, ca_path=ca.ca_path, ca_der=ca.ca_der)


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
    assert load_identity_dir(node).node_id_hex == node_id
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


