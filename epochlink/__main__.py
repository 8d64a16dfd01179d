"""``python -m epochlink``: the ``epochlink`` command line."""
import sys

from .cli import main

sys.exit(main())
