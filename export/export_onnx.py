"""ONNX export from a checkout: `swiftdiffusion export` (see `swiftdiffusion/export.py`)."""

import sys

from swiftdiffusion.export import main

if __name__ == "__main__":
    sys.exit(main())
