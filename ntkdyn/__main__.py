"""``python -m ntkdyn`` — the same as the ``ntkdyn`` command."""

import sys

from ntkdyn.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
