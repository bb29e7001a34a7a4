"""The CLI's command machinery: the parser whose usage errors are one line, and running a parsed command.

The CLI is the only part of the library that prints. Every ``GossipflError`` becomes one line on
stderr and a non-zero exit code; a traceback means a bug. ``gossipfl`` (``app``) and the demo's offline
pipeline (``demo``) run their commands through :func:`run`, so both report errors the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gossipfl.errors import GossipflError

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line, like every other error of the CLI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def top_parser() -> tuple[Parser, Any]:
    """The ``gossipfl`` parser, with its ``-v`` and an empty set of subcommands to register commands in."""
    parser = Parser(prog="gossipfl", description="Serverless gossip learning for fleets of Linux devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    return parser, sub


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command's handler, and turn a ``GossipflError`` into one line and an exit code."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except GossipflError as exc:
        print(f"gossipfl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gossipfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gossipfl status | head -1`): what it wanted it has; say nothing more, and
        # point stdout at /dev/null so the interpreter's last flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell pipeline expects
