"""A 2-process launch (DDP over gloo, recipes/accelerate/cpu-ddp.yaml: accelerate does not shard with FSDP on the CPU,
tests/test_train_fsdp.py) killed with SIGKILL mid-stage, launched again, reaches the same losses as a run never
interrupted: the trainer resumes model, optimizer, scheduler, every rank's RNG and the data order from the last
checkpoint it finished writing, and a checkpoint the kill cut short is not taken for one. Relaunched on another
process count it is refused first, checkpoints kept."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from test_train_launch import _recipe_with_done_inputs

REPO = Path(__file__).resolve().parent.parent


def _setup(root: Path, tiny_model: Path) -> tuple[list[str], Path]:
    recipe = _recipe_with_done_inputs(root, tiny_model)
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["args"].update(max_steps=16, save_steps=2, learning_rate=5e-4)
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu-ddp.yaml"), "--log_dir", str(root / "launch"),
           "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft", "--runs-dir", str(root / "runs")]
    return cmd, root / "runs" / "launch" / "default"


def _losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((run_dir / "sft" / "log_history.json").read_text()) if "loss" in h}


def test_sigkill_mid_stage_then_relaunch_reaches_the_uninterrupted_losses(tmp_path, tiny_model):
    cmd_a, run_a = _setup(tmp_path / "a", tiny_model)
    proc = subprocess.run(cmd_a, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uninterrupted = _losses(run_a)
    assert sorted(uninterrupted) == list(range(1, 17))

    cmd_b, run_b = _setup(tmp_path / "b", tiny_model)
    stage = run_b / "sft"
    job = subprocess.Popen(cmd_b, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(job.pid)
    try:
        deadline = time.time() + 600
        while not (stage / "checkpoint-4" / "trainer_state.json").exists():
            assert job.poll() is None, "the job ended before its second checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        # SIGKILL the launcher and every rank (torch's elastic agent starts the ranks in sessions of their own, so a
        # process-group kill would leave them training): no handler runs, as with the OOM killer or a lost node
        job_procs = [launcher, *launcher.children(recursive=True)]
        for proc in job_procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(job_procs, timeout=60)
    assert len(job_procs) >= 3 and not alive  # the launcher and both ranks are dead
    assert not (stage / "model").exists() and not (stage / "log_history.json").exists()  # killed mid-stage
    steps = sorted(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*"))
    assert 4 in steps and max(steps) < 16, steps
    # A save the kill cut short (the weights written, not yet trainer_state.json) must not be resumed from:
    # transformers' get_last_checkpoint would pick it and the relaunch would fail
    cut = stage / f"checkpoint-{max(steps) + 2}"
    if not cut.exists():
        cut.mkdir()
        (cut / "model.safetensors").write_bytes(b"")

    # relaunched on one process instead of two: refused before anything is touched (checkpoints kept)
    one = [*cmd_b[:3], "--config_file", str(REPO / "recipes/accelerate/cpu.yaml"), *cmd_b[5:]]
    proc = subprocess.run(one, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0 and "written by a launch of 2 processes; this one has 1" in proc.stderr, proc.stderr
    assert sorted(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*")) == sorted({*steps, max(steps) + 2})

    proc = subprocess.run(cmd_b, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((run_b / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done" and entry["metrics"]["steps"] == 16 and entry["metrics"]["world_size"] == 2
    resumed_from = entry["metrics"]["resumed_from_step"]
    assert resumed_from == max(steps) >= 4  # the newest complete checkpoint, not step 0 and not the cut one
    resumed = _losses(run_b)
    for step in range(resumed_from + 1, 17):  # every step trained after the relaunch
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4), (step, resumed, uninterrupted)
