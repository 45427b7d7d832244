"""A sweep trial's side of pruning: the training stage a sweep's pruner watches writes each evaluation's metric where
the sweep's driver reads it, and stops when the driver has written that the trial is pruned.

The channel is files, because only the driver writes the Optuna study (llmstack/sweep/study.py) and a trial may run
on another node (a Ray task; the runs folder is shared):

    <run dir>/pruning.json              {"stage": "sft", "metric": "eval_loss"}: written by the sweep before the run
    <stage dir>/intermediate.jsonl      {"step": 8, "value": 2.31} per evaluation: appended here, on rank 0
    <stage dir>/intermediate.read       how far (bytes) the driver has read and judged intermediate.jsonl
    <stage dir>/PRUNE                   written by the driver when Optuna's pruner says the trial should stop

At each evaluation rank 0 appends the metric, waits (at most ACK_S) for the driver to have judged it, then looks for
PRUNE; its answer is broadcast so every rank stops at the same step, and the stage raises TrialPruned (the stage
fails, the run stops, the sweep records the trial as pruned). So a trial stops at the evaluation the pruner judged;
a driver that does not answer in time only delays the stop to a later evaluation.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

REQUEST = "pruning.json"
INTERMEDIATE = "intermediate.jsonl"
READ = "intermediate.read"
MARKER = "PRUNE"
ACK_S = 10.0


class TrialPruned(RuntimeError):
    """The sweep's pruner stopped this trial at an evaluation (optuna.TrialPruned's role; optuna is not imported by a
    training stage)."""


def request(run_dir: Path) -> dict[str, Any] | None:
    """The sweep's pruning request of a run ({stage, metric}), or None: not a pruned sweep's trial."""
    path = Path(run_dir) / REQUEST
    return json.loads(path.read_text()) if path.is_file() else None


class PruningCallback(TrainerCallback):
    """Appends `metric` to `<folder>/intermediate.jsonl` at each evaluation and raises TrialPruned once the driver
    has written `<folder>/PRUNE`."""

    def __init__(self, folder: Path, metric: str):
        self.folder = Path(folder)
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from accelerate.utils import broadcast_object_list

        metrics = metrics or {}
        if self.metric not in metrics:
            raise RuntimeError(f"sweep.pruner.metric: this stage's evaluation logs no '{self.metric}' (it logs "
                               f"{', '.join(sorted(metrics)) or 'nothing'}); choose one of those")
        value = float(metrics[self.metric])
        verdict = [False]
        if state.is_world_process_zero:
            line = {"step": state.global_step, "value": value if math.isfinite(value) else None}
            with open(self.folder / INTERMEDIATE, "a") as f:
                f.write(json.dumps(line) + "\n")
                written = f.tell()
            self._await_driver(written)
            verdict = [(self.folder / MARKER).exists()]
        # every rank stops at the same evaluation: rank 0's answer (a no-op in a single process)
        if broadcast_object_list(verdict)[0]:
            raise TrialPruned(f"pruned by the sweep at step {state.global_step} ({self.metric} {value:.4g})")
        return control

    def _await_driver(self, written: int) -> None:
        """Wait until the driver has read (and judged) intermediate.jsonl up to `written` bytes, or ACK_S."""
        deadline = time.monotonic() + ACK_S
        while time.monotonic() < deadline:
            try:
                if int((self.folder / READ).read_text() or 0) >= written:
                    return
            except (FileNotFoundError, ValueError):  # not read yet
                pass
            time.sleep(0.05)


def install(ctx, trainer) -> bool:
    """Add the PruningCallback to this stage's trainer when its run is a sweep trial whose pruner watches this stage.
    (A watched stage always has an eval dataset here: the recipe check asks it for eval_strategy, and the Trainer
    refuses eval_strategy without one.)"""
    wanted = request(ctx.run.dir)
    if not wanted or wanted.get("stage") != ctx.name:
        return False
    trainer.add_callback(PruningCallback(ctx.dir, wanted.get("metric", "eval_loss")))
    return True
