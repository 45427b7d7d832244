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

The callback (and `install`) is in pruning_callback.py: this module, the channel, imports no transformers, because
the sweep's driver reads its names and must not pay transformers' import (seconds) to do so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
