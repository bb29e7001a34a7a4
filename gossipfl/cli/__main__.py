"""``python -m gossipfl.cli``: the ``gossipfl`` command."""

import sys

from gossipfl.cli import main

sys.exit(main())
