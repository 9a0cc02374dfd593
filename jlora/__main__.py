"""``python -m jlora ...`` runs the ``jlora`` command (see :mod:`jlora.cli`)."""

import sys

from jlora.cli import main

if __name__ == "__main__":
  sys.exit(main())
