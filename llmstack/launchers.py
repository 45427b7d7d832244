"""Where a stage runs: in this process, or under `accelerate launch` on several processes. The pipeline picks the
launcher for each stage (`launcher_for`); a stage is a plain function and never knows which one ran it.

A launched stage runs `python -m llmstack.worker` on every rank (llmstack/worker.py: it builds the stage context from
the run manifest). Rank 0 hands the StageResult back through one file, result.json in the stage folder
(`write_handoff` / `read_handoff`), and the pipeline records it in the manifest exactly as it records a stage that ran
in-process.

Slurm: scripts/slurm/train.sbatch runs the same `accelerate launch` once per node (a user submits it; the earlier
stages must be done first, see pipeline.stage_context).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.config.train import launch_config_path
from llmstack.stage import StageContext, StageResult

log = logging.getLogger("llmstack")

StageFunction = Callable[[StageContext], StageResult]

# The launched stage's result, written by rank 0 into the stage folder for the process that launched it.
HANDOFF = "result.json"

# The one entry every launched rank runs (outside llmstack.cli: launching is the pipeline's, not a command's).
WORKER = "llmstack.worker"


class InProcess:
    """The stage function called here, in this process (the default)."""

    def run(self, ctx: StageContext, fn: StageFunction) -> StageResult:
        return fn(ctx)


@dataclass
class Accelerate:
    """The stage run by the worker under `accelerate launch --config_file <config>` (a stage's `launch:`)."""

    config: Path

    def command(self, recipe: Path, stage: str, run_id: str, runs_dir: Path, handoff: bool = True,
                log_dir: Path | None = None) -> list[str]:
        """The launch command line. handoff: the launcher waits for the result (rank 0 writes result.json, the
        manifest is left to the caller); without it the launched ranks record the stage themselves. log_dir: where
        torch's elastic agent keeps its per-rank folders (a failed rank's error.json); without it, a new
        `torchelastic_*` folder in /tmp at every multi-process launch, never removed."""
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(self.config),
                *(["--log_dir", str(log_dir)] if log_dir else []),
                "-m", WORKER, str(recipe), "--stage", stage, "--run-id", run_id, "--runs-dir", str(runs_dir),
                *(["--handoff"] if handoff else [])]

    def run(self, ctx: StageContext, fn: StageFunction) -> StageResult:
        handoff = ctx.dir / HANDOFF
        handoff.unlink(missing_ok=True)
        cmd = self.command(Path(ctx.recipe_path).resolve(), ctx.name, ctx.run.dir.name,
                           ctx.run.dir.parent.parent.resolve(), log_dir=ctx.dir / "launch")
        log.info("launching: %s", " ".join(cmd))
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not handoff.exists():
            raise RuntimeError(f"`accelerate launch` of stage {ctx.name} failed (exit {proc.returncode}); see its log "
                               "above")
        return read_handoff(ctx.dir)


Launcher = InProcess | Accelerate


def launcher_for(spec: Any) -> Launcher:
    """`accelerate launch` for a stage spec with `launch:` (a name in recipes/accelerate/ or a YAML path), else here."""
    launch = getattr(spec, "launch", None)
    return Accelerate(launch_config_path(launch)) if launch else InProcess()


def write_handoff(folder: Path, result: StageResult) -> None:
    (Path(folder) / HANDOFF).write_text(json.dumps({
        "model": str(result.model) if result.model else None,
        "outputs": {k: str(v) for k, v in result.outputs.items()},
        "datasets": {k: str(v) for k, v in result.datasets.items()},
        "metrics": result.metrics}, indent=2))


def read_handoff(folder: Path) -> StageResult:
    res = json.loads((Path(folder) / HANDOFF).read_text())
    return StageResult(outputs={k: Path(v) for k, v in res["outputs"].items()}, metrics=res["metrics"],
                       model=Path(res["model"]) if res["model"] else None,
                       datasets={k: Path(v) for k, v in res["datasets"].items()})
