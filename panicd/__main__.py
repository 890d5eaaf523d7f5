"""``python -m panicd``: the daemon (as the ``panicd`` command)."""

import sys

from panicd.daemon import main

if __name__ == "__main__":
    sys.exit(main())
