"""python -m distill.mine [dedup | bench] ...: routes to the mining, dedup or benchmark command."""
from __future__ import annotations

import sys

from distill.core.errors import run_cli

from distill.mine import bench, dedup, mining

SUBCOMMANDS = {"mine": mining.main, "dedup": dedup.main, "bench": bench.main}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "mine"
    return SUBCOMMANDS[command](argv)


if __name__ == "__main__":
    run_cli(main)
