"""`python -m hadw_trainer ...` (what torchrun launches) = `hadw-train ...`."""

import sys

from hadw_trainer.cli import main

sys.exit(main())
