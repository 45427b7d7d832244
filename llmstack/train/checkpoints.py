"""Checkpoints: resume a killed stage from the last checkpoint written for the same inputs and process count, the
checks that keep a multi-process launch honest (sharding asked = sharding got, one shared run folder), and cleanup."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import NoReturn

from llmstack.runs import sha256_json
from llmstack.train import pruning_callback

log = logging.getLogger("llmstack")


def _fsdp_asked() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _distributed(distributed_type) -> str:
    """accelerate's DistributedType as the launch config names it (MULTI_CPU, FSDP, DEEPSPEED, ...)."""
    return str(distributed_type).split(".")[-1]


def _refuse_fsdp(got: str) -> NoReturn:
    raise RuntimeError(f"the launch config asks for FSDP, but accelerate runs these processes as {got}: accelerate "
                       "shards with FSDP only on GPUs (or other accelerators), not on the CPU. Launch with "
                       "recipes/accelerate/cpu-ddp.yaml on a CPU, or fsdp2.yaml on GPUs")


def check_sharding(trainer) -> None:
    """A launch config that asks for FSDP must get FSDP. accelerate (1.15) upgrades only GPU-like device types to
    FSDP: processes on the CPU (TRL's `use_cpu`) run plain data parallel (MULTI_CPU) with FSDP asked for, every
    rank holding the whole model. That would train, but not what the config says: refuse with the reason. (Processes
    on the CPU were already refused before loading, by check_before_loading; this is the trainer's own answer.)"""
    got = _distributed(trainer.accelerator.distributed_type)
    if _fsdp_asked() and got != "FSDP":
        _refuse_fsdp(got)
    pinned = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")  # the launch config's deepspeed value
    steps = trainer.args.gradient_accumulation_steps
    if got == "DEEPSPEED" and pinned.isdigit() and int(pinned) != steps:
        raise RuntimeError(f"the launch config sets deepspeed_config.gradient_accumulation_steps: {pinned}, but this "
                           f"stage's args.gradient_accumulation_steps is {steps}; DeepSpeed would train with {pinned}. "
                           "Remove the key from the accelerate config (the recipe's value is then used) or set the "
                           "two to the same number")


def last_complete_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint the trainer finished writing, the newer ones it did not). transformers writes
    trainer_state.json last (after weights, optimizer and RNG state), so a process killed while saving (SIGKILL, OOM
    killer, preemption) leaves a folder without it, which `get_last_checkpoint` would pick and fail to resume from."""
    import re

    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    found.sort(key=lambda p: int(p.name.split("-")[1]), reverse=True)
    partial = []
    for ckpt in found:
        if (ckpt / "trainer_state.json").exists():
            return ckpt, partial
        partial.append(ckpt)
    return None, partial


def _plain_cpu_device(args) -> None:
    """Processes on the CPU launched together (gloo) get the device `cpu:0` from accelerate 1.15 (MULTI_CPU indexes
    the device by local rank modulo torch.cpu.device_count()), and the Trainer resumes a multi-process run with
    `torch.load(optimizer.pt, map_location=args.device)`, which torch 2.13 refuses for `cpu:0` ("don't know how to
    restore data location ... tagged with cpu:0"): every killed 2-process CPU run failed to resume. `cpu` is the same
    memory; the Trainer reads the device from this cached property."""
    import torch

    device = args.device
    if device.type == "cpu" and device.index is not None:
        args.__dict__["_setup_devices"] = torch.device("cpu")


SHARED_WAIT_ENV = "LLMSTACK_SHARED_FOLDER_WAIT_S"


def check_shared_folder(accelerator, folder: Path, patience_s: float | None = None) -> None:
    """Every process must see the same stage folder: rank 0 alone writes the model, the checkpoints and the manifest,
    and each rank resumes from the checkpoints it finds there. Launched on several machines with `--runs-dir` on each
    node's own disk, the ranks would resume from different steps (their step counts part and the collectives hang) or
    lose rank 0's checkpoints with its node. Checked before training: rank 0 writes a fresh token into the folder and
    every rank must read it back, retried for `patience_s` (default: $LLMSTACK_SHARED_FOLDER_WAIT_S, else 10 s): NFS
    may show a new file late (a mount with long attribute caching needs more)."""
    import secrets
    import socket
    import time

    if accelerator.num_processes == 1:
        return
    if patience_s is None:
        raw = os.environ.get(SHARED_WAIT_ENV, "10")
        try:
            patience_s = float(raw)
        except ValueError:
            patience_s = float("nan")  # refused just below, as "nan" itself is
        if not 0 <= patience_s < float("inf"):  # NaN: the deadline would never pass
            raise RuntimeError(f"{SHARED_WAIT_ENV}={raw!r}: give the seconds a rank waits for rank 0's file, e.g. 30")
    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(16) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    marker = Path(folder) / ".llmstack-shared-check"
    if accelerator.is_main_process:
        marker.write_text(token[0])
    accelerator.wait_for_everyone()
    deadline, seen = time.monotonic() + patience_s, False
    while not seen:
        try:
            seen = marker.read_text().strip() == token[0]
        except OSError:
            pass
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    everyone = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in everyone if not ok]
    if blind:
        raise RuntimeError(f"{', '.join(blind)} cannot see what rank 0 writes into {folder}: every node must reach the "
                           "run folder on a shared filesystem (NFS, Lustre, a mounted bucket). Pass the same shared "
                           "--runs-dir on every node (scripts/slurm/train.sbatch: RUNS_DIR)")


# In the stage folder, written by rank 0 when a stage starts from step 0: what its checkpoints were written for
INPUTS_STAMP = "resume-inputs.sha256"  # the inputs' identity (_resumable)
PROCESSES_STAMP = "resume-processes.txt"  # the launch's process count


def _resumable(ctx) -> tuple[str, Path | None, list[Path], bool]:
    """(these inputs' identity, the last complete checkpoint, the cut-short ones, whether it was written for them)."""
    identity = sha256_json({"spec": ctx.spec.model_dump(mode="json"), "model": str(ctx.model),
                            "datasets": {k: str(v) for k, v in ctx.datasets.items()}, "seed": ctx.recipe.seed})
    stamp = ctx.dir / INPUTS_STAMP
    last, partial = last_complete_checkpoint(ctx.dir)
    fresh = bool(last) and stamp.exists() and stamp.read_text().strip() == identity
    return identity, last, partial, fresh


def _refuse_other_process_count(ctx, last: Path | None, fresh: bool, processes: int) -> None:
    launched = ctx.dir / PROCESSES_STAMP
    before = int(launched.read_text()) if fresh and launched.exists() else processes
    if before != processes:
        raise RuntimeError(
            f"{last.name} in {ctx.dir} was written by a launch of {before} processes; this one has "
            f"{processes}. Resumed so, the trainer would take another global batch and split the data between ranks "
            "otherwise (examples seen twice or never). Launch again on as many processes "
            f"(the same node count), or delete {ctx.dir}/checkpoint-* to train the stage again from step 0")


def check_before_loading(ctx) -> None:
    """The launch's checks that need no model, run as the stage starts (setup.trainer_config, every training stage's
    first call), before its model loads: a launch that cannot train as asked is refused in seconds, not after
    minutes of loading weights. They ask accelerate's shared state, which the stage's TRL config has just set up and
    the trainer's accelerator uses:
    - FSDP asked for processes on the CPU, where accelerate never shards with it (check_sharding);
    - a run folder some rank cannot see (check_shared_folder: every rank takes part);
    - checkpoints written by a launch of another process count (resume_checkpoint checks again)."""
    from accelerate import PartialState

    state = PartialState()
    if _fsdp_asked() and state.device.type == "cpu":
        _refuse_fsdp(_distributed(state.distributed_type))
    check_shared_folder(state, ctx.dir)
    _, last, _, fresh = _resumable(ctx)
    _refuse_other_process_count(ctx, last, fresh, state.num_processes)


def resume_checkpoint(ctx, trainer) -> str | None:
    """The last checkpoint in the stage folder if it was written for these same inputs, else None (and stale
    checkpoints are removed, so a changed recipe never resumes from another run's state). The trainer's own
    resume restores model, optimizer, scheduler and RNG state and skips the batches already seen: same data order.
    Every training stage calls this last before `trainer.train`, so it is also where a sweep trial's stage gets its
    pruning callback (llmstack/train/pruning_callback.py)."""
    pruning_callback.install(ctx, trainer)
    check_sharding(trainer)  # the run folder was checked before loading (check_before_loading)
    identity, last, partial, fresh = _resumable(ctx)
    trainer.accelerator.wait_for_everyone()  # every rank decides before rank 0 touches the folder
    processes = trainer.accelerator.num_processes
    _refuse_other_process_count(ctx, last, fresh, processes)
    if fresh:
        if trainer.accelerator.is_main_process:
            for cut in partial:  # a kill mid-save left it; the step is trained (and saved) again
                log.info("removing %s: cut short by the kill (no trainer_state.json)", cut.name)
                shutil.rmtree(cut, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        _plain_cpu_device(trainer.args)
        log.info("resuming %s from %s", ctx.name, last)
        trainer.llmstack_resumed_from = int(last.name.split("-")[1])  # reported in the stage's metrics
        return str(last)
    if trainer.accelerator.is_main_process:
        for old in ctx.dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        (ctx.dir / INPUTS_STAMP).write_text(identity)
        (ctx.dir / PROCESSES_STAMP).write_text(str(processes))
    trainer.accelerator.wait_for_everyone()
    return None


def cleanup_checkpoints(ctx) -> None:
    """A finished stage's checkpoints are only useful for resuming it; drop them (full-FT ones are 3x the model)."""
    for old in ctx.dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    for merged in ctx.dir.glob("merged-input*"):  # the merged adapter input, and a merge a crash cut short
        shutil.rmtree(merged, ignore_errors=True)
