"""``python -m longnet_ref.cli``: the ``longnet-ref`` command."""

import sys

from . import main

sys.exit(main())
