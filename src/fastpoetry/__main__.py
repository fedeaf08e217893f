"""``python -m fastpoetry`` and the ``fastpoetry`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
