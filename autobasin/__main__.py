"""``python -m autobasin ...`` (and ``torchrun --nproc-per-node N -m autobasin ...``): the command line."""
import sys

from .cli import main

sys.exit(main())
