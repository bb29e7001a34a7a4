"""``python -m gossipfl.cli``: the ``gossipfl`` command."""

import sys

from gossipfl.cli.app import main

sys.exit(main())
