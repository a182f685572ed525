"""The console scripts pip installs (`ssld-distill -c r50` = `python -m distill.ssld -c r50`).

Each one imports its module only when run, so `ssld-zoo` does not pay for detection's imports, and runs
it under run_cli: a UserError is one line on stderr and exit code 2, as with `python -m`.
"""
from __future__ import annotations

import importlib

from distill.core.errors import run_cli

COMMANDS = {  # script name -> module with main(argv); pyproject.toml [project.scripts] lists the same names
    "ssld-demo": "distill.demo",
    "ssld-chain": "distill.chain.__main__",
    "ssld-demo-data": "distill.demo_data",
    "ssld-distill": "distill.ssld",
    "ssld-mine": "distill.mine.__main__",
    "ssld-relabel": "distill.relabel",
    "ssld-zoo": "distill.zoo",
    "ssld-convert": "distill.convert",
    "ssld-export": "distill.export",
    "ssld-predict": "distill.predict",
    "ssld-finetune": "transfer.finetune",
    "ssld-search": "transfer.search",
    "ssld-datasets": "transfer.datasets",
    "ssld-detect-train": "detection.train",
    "ssld-detect-eval": "detection.eval",
    "ssld-detect-predict": "detection.predict",
}


def _command(module: str):
    def run() -> None:
        run_cli(importlib.import_module(module).main)
    run.__doc__ = f"python -m {module.removesuffix('.__main__')}"
    return run


for _name, _module in COMMANDS.items():
    globals()[_name.replace("-", "_")] = _command(_module)
