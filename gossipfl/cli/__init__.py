"""The CLI side of the library: everything that does I/O for an operator (``gossipfl``, the demo, TLS).

``main`` is the ``gossipfl`` entry point (pyproject's ``gossipfl = "gossipfl.cli:main"``; ``python -m
gossipfl.cli`` runs it too). It imports the commands when called, not when this package is imported: the
daemon imports ``gossipfl.cli.tls``, and must not load the CLI's commands (``certs`` needs ``cryptography``,
about 11 MB of resident memory) to do so.

``app`` builds the parser from ``offline`` (models, training, certificates, config, service), ``cli_control``
(the commands that talk to a running daemon through ``client``) and ``demo``; ``command`` runs a command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: Commands that only talk to a running daemon: parsed without loading the other commands (and so without
#: onnx and numpy), so that ``gossipfl status`` answers at once.
FAST_COMMANDS = frozenset({"status", "peers", "metrics", "pause", "resume", "peer"})
#: ``gossipfl privacy plan`` needs numpy and the accountant, never onnx: parsed on its own too.
LIGHT_COMMANDS = frozenset({"privacy"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gossipfl`` with ``argv`` (default: the process's arguments); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    if command in FAST_COMMANDS | LIGHT_COMMANDS:
        from gossipfl.cli.command import Parser, run, top_parser

        if command in FAST_COMMANDS:
            from gossipfl.cli.cli_control import register
        else:
            from gossipfl.cli.cli_privacy import register
        parser, sub = top_parser()
        register(sub, Parser)
        return run(parser, args)
    from gossipfl.cli.app import main as run_app

    return run_app(args)
