"""``python -m blockpredict ...``: the same as the ``blockpredict`` command."""

import sys

from .cli import main

sys.exit(main())
