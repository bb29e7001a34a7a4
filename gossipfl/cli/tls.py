"""TLS for a node: loading its identity with OpenSSL's own checks, and the mutual TLS 1.3 contexts.

Apart from ``gossipfl.identity`` because this is the part that needs ``ssl`` (and reads the clock when its
caller passes no ``now``): ``load_identity`` runs the file checks of ``gossipfl.identity.node.read_identity``,
then builds both contexts (OpenSSL: does the key fit the certificate?) and shakes hands with itself in memory
(did the cluster CA sign it, as every peer will verify?). ``server_context`` and ``client_context`` build the
``ssl.SSLContext`` objects that the daemon hands to ``trio.SSLStream``: TLS 1.3 only, mutual, trusting the
cluster CA only, with no hostname check (peers are named by node id, checked by ``identity.ids.check_peer``).

Standard library only: the daemon imports this module, and never ``cryptography`` (``gossipfl.cli.certs``).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from gossipfl.errors import IdentityError
from gossipfl.identity.node import (
    CA_CERT,
    NODE_CERT,
    NODE_KEY,
    NodeIdentity,
    as_utc,
    check_node_cert,
    check_validity,
    encrypted_key,
    read_identity,
    warn_if_key_readable,
)

__all__ = ["client_context", "load_identity", "load_identity_dir", "server_context", "utc_now"]


def load_identity(cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str], *,
                  now: dt.datetime | None = None) -> NodeIdentity:
    """Load and check: files exist and parse, the key fits the certificate, the CA signed it, it is valid now.

    Every failure is an ``IdentityError`` naming the file at fault, so a daemon refuses to start with a
    sentence an operator can act on rather than failing its first handshake with a peer. ``now`` None reads
    the clock.
    """
    t = utc_now(now)
    identity, node_cert = read_identity(cert, key, ca, now=t)
    contexts = server_context(identity), client_context(identity)  # OpenSSL: does the key fit?
    check_node_cert(identity.cert_path, node_cert)
    _handshake_with_itself(identity, *contexts, issuer_cn=node_cert.issuer_cn)
    check_validity(identity.cert_path, node_cert, t)
    warn_if_key_readable(identity.key_path)
    return identity


def load_identity_dir(directory: str | os.PathLike[str], *, now: dt.datetime | None = None) -> NodeIdentity:
    """Load ``node.crt``, ``node.key`` and ``ca.crt`` from one directory, as ``issue_node_cert`` writes them."""
    d = Path(directory)
    return load_identity(d / NODE_CERT, d / NODE_KEY, d / CA_CERT, now=now)


def utc_now(now: dt.datetime | None = None) -> dt.datetime:
    """``now`` in UTC, or the clock when it is None; a naive ``now`` is a bug in the caller."""
    return dt.datetime.now(dt.UTC) if now is None else as_utc(now)


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


# ---------------------------------------------------------------- contexts


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Context for the listening side: TLS 1.3 only, client certificate required, cluster CA only."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.num_tickets = 0  # no session resumption: every connection proves its certificate afresh
    return ctx


def client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Context for the dialling side: TLS 1.3 only, presents our certificate, cluster CA only, no hostname check."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity)


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
        ctx.load_verify_locations(cadata=identity.ca_der)  # the CA that load_identity() checked, and nothing else
    except ssl.SSLError as exc:
        raise IdentityError(f"{identity.ca_path}: TLS cannot use this CA certificate: {exc}") from None
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path, password=_refuse_passphrase)
    except _PassphraseWanted:
        raise encrypted_key(identity.key_path) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise IdentityError(f"{identity.key_path}: this key does not belong to the certificate "
                                f"{identity.cert_path}") from None
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: TLS cannot use them: {exc}") from None
    except OSError as exc:
        raise IdentityError(f"{identity.cert_path}, {identity.key_path}: TLS cannot use them: {exc}") from None
    return ctx
