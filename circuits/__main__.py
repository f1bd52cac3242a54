"""`python -m circuits`: the same as the `circuits` command."""

import sys

from .cli import main

sys.exit(main())
