"""The CLI side of the library: everything that does I/O for an operator (``gossipfl``, the demo, TLS).

``main`` is the ``gossipfl`` entry point (pyproject's ``gossipfl = "gossipfl.cli:main"``; ``python -m
gossipfl.cli`` runs it too). It imports the commands when called, not when this package is imported: the
daemon imports ``gossipfl.cli.tls``, and must not load the CLI's commands (``certs`` needs ``cryptography``,
about 11 MB of resident memory) to do so.

``app`` builds the parser from ``offline`` (models, training, certificates, config, service), ``cli_control``
(the commands that talk to a running daemon through ``client``) and ``demo``; ``command`` runs a command.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gossipfl`` with ``argv`` (default: the process's arguments); returns the exit code."""
    from gossipfl.cli.app import main as run_app

    return run_app(argv)
