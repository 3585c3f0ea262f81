"""``python -m maeformer_fast.cli``: the ``maeformer`` command."""

import sys

from .main import main

sys.exit(main())
