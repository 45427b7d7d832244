"""Where curation's datatrove passes run: LocalPipelineExecutor (forked processes on this machine), RayPipelineExecutor
(Ray tasks on a running cluster), or Slurm (the passes already ran as Slurm jobs written by `curate.slurm_jobs`; here
only the check that every task completed).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from llmstack.cluster import START_HINT, ray_unreachable
from llmstack.config.data import ExecutorSpec


class CurationError(Exception):
    pass


def execute(steps: list, work: Path, tag: str, tasks: int, executor: ExecutorSpec | None = None) -> None:
    """Run a pipeline on one of datatrove's executors: LocalPipelineExecutor (forked processes on this machine) or
    RayPipelineExecutor (Ray tasks on a running cluster); for slurm, the pass already ran in Slurm jobs (slurm_jobs)
    and this only checks that every task completed. Their per-task logs and stats tables go to work/<tag>.log and
    work/logs_<tag>/, not the terminal: datatrove attaches its loguru handlers to whatever sys.stderr is."""
    from datatrove.executor import LocalPipelineExecutor
    from loguru import logger

    kind = executor.type if executor else "local"
    work.mkdir(parents=True, exist_ok=True)
    logging_dir = str(work / f"logs_{tag}")
    if kind == "slurm":
        _check_completed(LocalPipelineExecutor(steps, tasks=tasks, logging_dir=logging_dir), tag, work, "Slurm")
        return
    with open(work / f"{tag}.log", "a") as log_file, contextlib.redirect_stderr(log_file):
        try:
            # With several workers the parent never re-points its handlers, so its merged stats table would go to
            # the stream loguru captured at import (the terminal): point them at the log file here.
            logger.remove()
            logger.add(sys.stderr)
            if kind == "ray":
                _run_on_ray(steps, tasks, logging_dir, executor, work, tag)
            else:
                # fork: workers inherit the redirected stderr (forkserver children would print to the terminal)
                LocalPipelineExecutor(steps, tasks=tasks, workers=tasks, logging_dir=logging_dir,
                                      skip_completed=False, start_method="fork").run()
        finally:
            logger.remove()  # datatrove re-adds a handler on the redirected (soon closed) stream
            logger.add(sys.stderr, level="WARNING")


def preflight(executor: ExecutorSpec | None) -> None:
    """What a Ray executor needs, checked before curation fetches, tokenizes or loads anything: ray installed and a
    cluster answering at the address (unless this process already joined one). Failing here costs a second, not the
    minutes of work before the first pass."""
    if executor is None or executor.type != "ray":
        return
    if not _import_ray().is_initialized():
        _reachable(executor.address)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise CurationError("data.executor is ray, but ray is not installed: pip install -r requirements/ray.lock "
                            "(or `pip install llmstack[ray]`)") from None
    return ray


def _run_on_ray(steps: list, tasks: int, logging_dir: str, executor: ExecutorSpec, work: Path, tag: str) -> None:
    """datatrove's RayPipelineExecutor on the cluster at `executor.address`. The workers unpickle the steps, so they
    import llmstack (install it on every node), and read and write the stage folder: it must be on a filesystem
    every node shares (on one machine it is)."""
    ray = _import_ray()
    from datatrove.executor import RayPipelineExecutor

    joined = not ray.is_initialized()
    if joined:
        _reachable(executor.address)
        try:
            ray.init(address=executor.address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as exc:
            raise CurationError(f"data.executor.address '{executor.address}': no Ray cluster there ({exc}). "
                                f"{START_HINT}") from None
    try:
        ray_executor = RayPipelineExecutor(steps, tasks=tasks, workers=tasks, logging_dir=logging_dir,
                                           skip_completed=False, cpus_per_task=executor.cpus_per_task,
                                           mem_per_cpu_gb=executor.mem_per_cpu_gb)
        ray_executor.run()
    finally:
        if joined:
            ray.shutdown()
    # RayPipelineExecutor logs a failed task and carries on; a curated dataset missing a task's rows must not pass
    _check_completed(ray_executor, tag, work, "Ray")


def _reachable(address: str) -> None:
    problem = ray_unreachable(address)
    if problem:
        raise CurationError(f"data.executor.address '{address}': {problem}")


def _check_completed(executor, tag: str, work: Path, where: str) -> None:
    missing = executor.get_incomplete_ranks(range(executor.world_size), skip_completed=True)
    if missing:
        raise CurationError(f"{tag}: {len(missing)} of {executor.world_size} {where} task(s) did not complete "
                            f"(ranks {missing[:10]}); their logs are under {work}")

