"""``python -m medsynth`` (and ``torchrun -m medsynth``)."""

import sys

from medsynth.cli import main

sys.exit(main())
