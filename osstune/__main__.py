"""`python -m osstune ...`, which is also what `torchrun -m osstune train ...` starts in each process."""

import sys

from osstune.cli import main

sys.exit(main())
