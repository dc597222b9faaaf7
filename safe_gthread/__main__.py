"""``python -m safe_gthread check``: the same as the ``safe-gthread`` console script."""
import sys

from .check.cli import main

if __name__ == "__main__":
    sys.exit(main())
