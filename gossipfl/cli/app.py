"""The ``gossipfl`` command: offline tools, the daemon's control client, the demo.

The parser is put together here from the commands' own registration functions (``offline``, ``cli_control``,
``demo``); ``command.run`` runs the command and makes every ``GossipflError`` one line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gossipfl.cli.cli_control import register as register_control
from gossipfl.cli.cli_control import register_export
from gossipfl.cli.cli_privacy import register as register_privacy
from gossipfl.cli.command import Parser, run, top_parser
from gossipfl.cli.demo import register as register_demo
from gossipfl.cli.offline import register_admin, register_model, register_predict, register_train_eval


def build_parser() -> argparse.ArgumentParser:
    parser, sub = top_parser()
    model_sub = register_model(sub, Parser)
    register_train_eval(sub, Parser)
    register_demo(sub, Parser)
    common = register_control(sub, Parser)
    register_export(model_sub, common)
    register_predict(sub, Parser)
    register_admin(sub, Parser)
    register_privacy(sub, Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
