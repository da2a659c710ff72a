"""Run benchmarks and rewrite their sections of docs/benchmarks.md: `python benchmarks/run.py [name …]`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_section

BENCHMARKS = ["backfill", "validation", "training", "serving", "explain", "deploy", "replay"]


def main(names: list[str]) -> int:
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        print(f"benchmark {name}:", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        write_section(name, module.run())
    print("results written to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
