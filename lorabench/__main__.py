"""`python -m lorabench` is the `lorabench` command."""

import sys

from .cli import main

sys.exit(main())
