"""Production-shaped workloads (`swiftdiffusion.workload`): write a seeded trace, or replay one against a server.

    python perf/workload.py write --mix A --count 100 --rate 6 --controlnets models/small/controlnets \\
        --loras models/small/lora_catalog --out trace.csv          # Poisson at 6 requests/min; .csv or .json
    python perf/workload.py replay trace.csv --url 127.0.0.1:8001 --model baseline_diffusers     # open loop
    python perf/workload.py replay trace.csv --url 127.0.0.1:8001 --concurrency 2                # closed loop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swiftdiffusion.workload import (catalog_names, generate, mix, read_trace, run_closed_loop, run_open_loop,
                                     summarize, write_trace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="draw a seeded trace from a service's published mix")
    write.add_argument("--mix", choices=("A", "B"), default="A")
    write.add_argument("--count", type=int, default=100)
    write.add_argument("--rate", type=float, help="requests/min, Poisson (default: closed loop, no arrival times)")
    write.add_argument("--controlnets", type=Path, required=True, help="ControlNet catalog folder")
    write.add_argument("--loras", type=Path, required=True, help="LoRA catalog folder")
    write.add_argument("--steps", type=int, default=10)
    write.add_argument("--size", type=int, default=192)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--out", type=Path, required=True)
    replay = sub.add_parser("replay", help="send a trace; print latency and throughput")
    replay.add_argument("trace", type=Path)
    replay.add_argument("--url", default="127.0.0.1:8001")
    replay.add_argument("--model", default="text_to_image")
    replay.add_argument("--concurrency", type=int, help="closed loop at this concurrency (default: open loop)")
    args = parser.parse_args()
    if args.command == "write":
        controlnets, loras = catalog_names(args.controlnets, args.loras)
        rate = None if args.rate is None else args.rate / 60.0
        print(write_trace(args.out, generate(mix(args.mix), args.count, controlnets, loras, rate, args.steps,
                                             args.size, args.seed)))
        return
    entries = read_trace(args.trace)
    if args.concurrency is None:
        outcomes, wall = run_open_loop(args.url, args.model, entries)
    else:
        outcomes, wall = run_closed_loop(args.url, args.model, entries, args.concurrency)
    print(json.dumps({**summarize(outcomes, wall), "errors": sorted({o.error for o in outcomes if not o.ok})},
                     indent=1))


if __name__ == "__main__":
    main()
