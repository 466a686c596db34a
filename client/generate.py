"""The command line for the swiftdiffusion server, from a checkout: `swiftdiffusion generate` (see
`swiftdiffusion/generate.py`)."""

import sys

from swiftdiffusion.generate import main

if __name__ == "__main__":
    sys.exit(main())
