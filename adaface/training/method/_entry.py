"""A stage's two entry points, one definition for both stages: a validated config → a run, a command line → an
exit status (`adaface.training.engine.trainer.cli_main` says which)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.config import TrainingConfig
from ..engine.trainer import RunContext, RunResult, Stage, cli_main, run_training


@dataclass(frozen=True)
class StageEntry:
    """`name` (stage1, stage2), its builder, and its config parser (`parse(argv, default_config=, world_size=)`)."""

    name: str
    build: Callable[[RunContext], Stage]
    parse: Callable[..., Any]

    def run(self, cfg: TrainingConfig) -> RunResult:
        """Train according to a validated config (from `parse`)."""
        return run_training(cfg, self.build)

    def main(self, argv: list[str] | None = None, default_config: str | None = None) -> int:
        """The `training/<name>.py` command line (returns the exit status)."""
        def parse(args: list[str] | None, world_size: int) -> TrainingConfig:
            return self.parse(args, default_config=default_config, world_size=world_size)

        return cli_main(self.name, argv, parse, self.build)
