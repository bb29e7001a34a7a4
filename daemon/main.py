"""``gossipfld --config FILE``: the node daemon's entry point.

Start-up errors (a bad config key, missing certificates, an unreadable model or checkpoint) are one
log line and exit code 2, before anything listens; systemd's Restart=on-failure then does not spin
on a configuration an operator must fix (see the unit's RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

import trio

from gossipfl.cli.tls import load_identity
from gossipfl.config import LOG_FORMATS, check_named_files, load_config
from gossipfl.errors import GossipflError

from .app import App
from .logs import fields, setup_logging

log = logging.getLogger("gossipfld")
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gossipfld", description="gossipfl node daemon")
    parser.add_argument("--config", required=True, help="the node's TOML configuration")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="overrides log.format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides log.level")
    args = parser.parse_args(argv)
    setup_logging(args.log_format or "text", args.log_level or "info")
    try:
        config = load_config(args.config)
        setup_logging(args.log_format or config.log.format, args.log_level or config.log.level)
        check_named_files(config)
        identity = load_identity(config.tls.cert, config.tls.key, config.tls.ca)
        app = App(config, identity)
    except GossipflError as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        return EXIT_CONFIG
    failed = False
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(app.run)
    except* GossipflError as group:  # e.g. the control socket or the port is taken: still an operator's fix
        for exc in group.exceptions:
            log.error("cannot start", extra=fields(error=str(exc)))
        failed = True
    return EXIT_CONFIG if failed else 0


if __name__ == "__main__":
    sys.exit(main())
