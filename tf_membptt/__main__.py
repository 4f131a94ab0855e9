"""``python -m tf_membptt``: the command line (see `tf_membptt.cli`)."""

import sys

from tf_membptt.cli import main

if __name__ == "__main__":  # guarded: the plot's worker processes may import this module
    sys.exit(main())
