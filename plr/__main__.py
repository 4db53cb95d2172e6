"""``python -m plr ...`` (so that ``torchrun --nproc-per-node N -m plr train ...`` works): the ``plr`` command."""

import sys

from .cli import main

sys.exit(main())
