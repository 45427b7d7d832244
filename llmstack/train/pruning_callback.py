"""The trainer callback of a stage a sweep's pruner watches (the channel it uses: train/pruning.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from llmstack.train.pruning import ACK_S, INTERMEDIATE, MARKER, READ, TrialPruned, request


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
