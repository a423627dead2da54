"""``python -m fastlstm``: the ``fastlstm`` command (see ``fastlstm.cli``)."""

import sys

from .cli import main

sys.exit(main())
