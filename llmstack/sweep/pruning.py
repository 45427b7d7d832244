"""The driver's side of pruning: Optuna's pruner for the recipe's `sweep.pruner`, and the watch on a running trial.

A trial's training stage appends each evaluation's metric to `<stage dir>/intermediate.jsonl`
(llmstack/train/pruning.py). While the trial runs, the driver reads the new lines, reports them to Optuna
(`trial.report`), and when `trial.should_prune()` writes `<stage dir>/PRUNE`; then it writes how far it has read to
`<stage dir>/intermediate.read`, which the stage waits for before it looks for the marker, so a pruned trial stops at
the evaluation the pruner judged. The driver stays the only writer of the study; the trial only writes files in its
own run folder, so this works the same for a trial in this process and for a Ray task on another node.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmstack.config.sweep import PrunerSpec
from llmstack.train.pruning import INTERMEDIATE, MARKER, READ

log = logging.getLogger("llmstack")

POLL_S = 0.2


def make_pruner(spec: PrunerSpec):
    """The optuna.pruners object for `sweep.pruner` (NopPruner for kind none)."""
    import optuna

    pruners = optuna.pruners
    if spec.kind == "median":
        return pruners.MedianPruner(n_startup_trials=_startup(spec), n_warmup_steps=spec.n_warmup_steps)
    if spec.kind == "percentile":
        return pruners.PercentilePruner(spec.percentile, n_startup_trials=_startup(spec),
                                        n_warmup_steps=spec.n_warmup_steps)
    if spec.kind == "hyperband":
        return pruners.HyperbandPruner(min_resource=max(1, spec.n_warmup_steps),
                                       reduction_factor=spec.reduction_factor or 3)
    if spec.kind == "successive_halving":
        return pruners.SuccessiveHalvingPruner(min_resource=spec.n_warmup_steps or "auto",
                                               reduction_factor=spec.reduction_factor or 3)
    return pruners.NopPruner()


def _startup(spec: PrunerSpec) -> int:
    return 5 if spec.n_startup_trials is None else spec.n_startup_trials


def request(spec: PrunerSpec) -> dict[str, Any] | None:
    """What a trial writes to `<run dir>/pruning.json` (plain data: it crosses a Ray task boundary), or None."""
    return None if spec.kind == "none" else {"stage": spec.stage, "metric": spec.metric}


class Watch:
    """One running trial's intermediate values, read from its watched stage's folder and reported to Optuna. The
    metric is reported with the sign of the study's direction (negated where the two directions differ), so Optuna's
    pruner compares it the way it compares the objective."""

    def __init__(self, trial, stage_dir: Path, negate: bool):
        self.trial, self.dir, self.negate = trial, Path(stage_dir), negate
        self._offset = 0
        self.last: tuple[int, float] | None = None  # (step, metric as logged) of the last line read
        self.pruned_at: int | None = None

    @property
    def marker(self) -> Path:
        return self.dir / MARKER

    def poll(self) -> None:
        """Report the lines written since the last poll; write the marker when the pruner says so. A failure (a
        storage busy past its timeout) is logged: the next poll goes on from the next line, the trial runs on."""
        try:
            self._read()
        except Exception as exc:
            log.warning("trial %d: reading its intermediate values: %s: %s", self.trial.number, type(exc).__name__,
                        exc)

    def _read(self) -> None:
        path = self.dir / INTERMEDIATE
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            value = math.nan if entry["value"] is None else float(entry["value"])
            self.trial.report(-value if self.negate else value, int(entry["step"]))
            self.last = (int(entry["step"]), value)
            if self.pruned_at is None and self.trial.should_prune():
                self.pruned_at = self.last[0]
                self.marker.write_text(json.dumps({"step": self.pruned_at, "value": entry["value"]}))
                log.info("trial %d: pruned at step %d (%s)", self.trial.number, self.pruned_at, entry["value"])
        if complete:  # judged: the stage may go on (it waits for this, llmstack/train/pruning.py)
            tmp = self.dir / f"{READ}.tmp"
            tmp.write_text(str(self._offset))
            tmp.replace(self.dir / READ)

    def attrs(self) -> dict[str, Any]:
        """The user attrs a pruned trial is told with."""
        step, value = self.last or (None, None)
        return {"pruned_at": self.pruned_at, "last_step": step, "last_value": value}


@contextmanager
def watching(watch: Watch | None):
    """Poll `watch` on a thread while the body runs (a trial run in this process blocks the driver's thread), and
    once more after it. Optuna's RDB storage takes calls from several threads (as in study.optimize(n_jobs=...))."""
    if watch is None:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(POLL_S):
            watch.poll()

    thread = threading.Thread(target=loop, name=f"prune-watch-{watch.trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        watch.poll()
