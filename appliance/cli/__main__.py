"""``python -m appliance.cli``: the ``imaging`` command."""

import sys

from .main import main

sys.exit(main())
