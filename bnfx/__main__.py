"""``python -m bnfx``: the ``bnfx`` command."""

import sys

from bnfx.cli import main

sys.exit(main())
