"""`python -m hadw_kernels.theory ...` is the same as the `hadw-theory` console script."""

import sys

from hadw_kernels.theory.cli import main

sys.exit(main())
