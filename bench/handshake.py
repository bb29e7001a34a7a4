"""What one mutual TLS 1.3 handshake costs on the wire, and what session resumption would save.

    .venv/bin/python bench/handshake.py

Two nodes' real certificates (made by the test cluster's ``prepare``) and the daemon's own
``server_context`` / ``client_context``, over in-memory BIOs, counting every byte each side writes. Three
cases: today's full handshake (the listener issues no session tickets); a full handshake with one ticket
issued (what enabling resumption would cost the first connection); and a resumed one (PSK with ECDHE, no
certificates), which also receives a fresh ticket. The baseline is today's handshake, in the same run.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from gossipfl.cli.tls import client_context, load_identity, server_context
from gossipfl.learning.datasets import load_digits
from gossipfl.testing.cluster import ClusterPlan, prepare


def connect(server: ssl.SSLContext, client: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[int, int, ssl.SSLObject, bool]:
    """A handshake and one message each way (a ticket travels with the server's first data); bytes up, down."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=None, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    up = down = 0
    done: set[int] = set()
    for _ in range(20):
        for i, side in enumerate((c, s)):
            if i not in done:
                try:
                    side.do_handshake()
                    done.add(i)
                except ssl.SSLWantReadError:
                    pass
        a, b = c_out.read(), s_out.read()
        up, down = up + len(a), down + len(b)
        s_in.write(a)
        c_in.write(b)
    s.write(b"hello")
    b = s_out.read()
    down += len(b)
    c_in.write(b)
    c.read(16)
    c.write(b"x")
    a = c_out.read()
    up += len(a)
    s_in.write(a)
    s.read(16)
    assert s.getpeercert(binary_form=True) and c.getpeercert(binary_form=True)  # identities seen either way
    return up, down, c, bool(c.session_reused)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gfl-tls-") as tmp:
        x, y = load_digits()
        specs = prepare(Path(tmp), ClusterPlan(nodes=2, mdns=False), x[:50], y[:50])
        ids = [load_identity(s.directory / "certs/node.crt", s.directory / "certs/node.key",
                             s.directory / "certs/ca.crt") for s in specs]
        today, client = server_context(ids[0]), client_context(ids[1])
        ticketing = server_context(ids[0])
        ticketing.num_tickets = 1
        base_up, base_down, _, _ = connect(today, client)
        first_up, first_down, first, _ = connect(ticketing, client)
        res_up, res_down, _, reused = connect(ticketing, client, first.session)
    base = base_up + base_down
    print("mutual TLS 1.3 handshake plus one short message each way, bytes on the wire (ECDSA P-256 certificates)")
    print(f"{'case':<44}{'up':>7}{'down':>7}{'total':>8}{'vs today':>10}")
    for name, up, down in (("today: full handshake, no tickets (baseline)", base_up, base_down),
                           ("full handshake issuing one ticket", first_up, first_down),
                           (f"resumed with that ticket (reused: {reused})", res_up, res_down)):
        print(f"{name:<44}{up:>7}{down:>7}{up + down:>8}{(up + down) / base:>9.2f}x")


if __name__ == "__main__":
    main()
