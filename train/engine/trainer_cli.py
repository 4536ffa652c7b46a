"""What every trainer script's command does: read its config, start the accelerator and the output folder,
build the task and its data, run the loop.

torch and the models are imported only after the arguments are read, so --help, --print-config and
--check-config (launch.sh's check before it starts any process) answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from sdkd.cli.errors import run_cli
from sdkd.train.engine.config import load_trainer_config


def run_trainer(schema: type, build: Callable, description: str | None, script: str) -> None:
    """`build(cfg, accelerator) -> (task, dataset)` is the trainer; `schema` its config's dataclass."""

    def main() -> None:
        cfg = load_trainer_config(schema, sys.argv[1:], description, prog=Path(script).name)
        from sdkd.train.engine.loop import Loop, make_accelerator

        acc = make_accelerator(cfg)
        task, dataset = build(cfg, acc)
        Loop(cfg, acc, task, dataset).fit()

    run_cli(main)
