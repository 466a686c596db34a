"""`python -m swiftdiffusion`: the `swiftdiffusion` command."""

import sys

from .cli import main

sys.exit(main())
