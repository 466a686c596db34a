"""`swiftdiffusion`: one command for the server, the client and the tools (`python -m swiftdiffusion` too).

    swiftdiffusion serve                      # the server on the built-in tiny model, 127.0.0.1:8000/8001/8002
    swiftdiffusion serve --model /models/sd15 --controlnets /models/controlnets --loras /models/loras
    swiftdiffusion generate --prompt "a lighthouse" --lora style_peft:0.8 --out lighthouse.png --stream
    swiftdiffusion demo                       # a server in the background, one image through it
    swiftdiffusion tiny --size small --out models/small
    swiftdiffusion export --size tiny --out artifacts/tiny
    swiftdiffusion bench --out perf/results/bench    # from a checkout: perf/bench.py

`swiftdiffusion <command> --help` lists a command's flags.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

COMMANDS = {  # command -> (module with main(argv), what it does)
    "serve": ("swiftdiffusion.serve", "render the model repository and run tritonserver"),
    "generate": ("swiftdiffusion.generate", "images from a running server"),
    "demo": ("swiftdiffusion.demo", "a server in the background and one image through it"),
    "tiny": ("swiftdiffusion.tiny", "write the built-in random model"),
    "export": ("swiftdiffusion.export", "ONNX graphs, weight maps and checks in onnxruntime"),
    "bench": (None, "the CPU benchmark against the diffusers baseline (perf/bench.py of a checkout)"),
}
BENCH = Path(__file__).resolve().parents[1] / "perf" / "bench.py"


def usage() -> str:
    commands = "\n".join(f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items())
    return f"usage: swiftdiffusion <command> [flags]\n\ncommands:\n{commands}\n\n{__doc__.split(chr(10), 2)[2]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not BENCH.is_file():
            print("swiftdiffusion bench runs perf/bench.py of a checkout of the project", file=sys.stderr)
            return 2
        sys.path.insert(0, str(BENCH.parent))  # its helper modules sit beside it
        return runpy.run_path(str(BENCH), run_name="bench")["main"](rest)
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0
