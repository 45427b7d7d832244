"""FSDP on this CPU: accelerate 1.15 upgrades only GPU-like device types to FSDP, so two CPU processes launched with an
FSDP config would silently run plain data parallel (MULTI_CPU), every rank holding the whole model. The stage refuses
that with the reason instead of training something other than what the config says. (Sharded training itself is left
for the GPU check: `scripts/gpu_check.sh`.) Also: every stage records how its processes split the work."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from test_train_launch import _recipe_with_done_inputs

REPO = Path(__file__).resolve().parent.parent


def test_an_fsdp_launch_on_the_cpu_is_refused_with_the_reason(tmp_path, tiny_model):
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    config = yaml.safe_load((REPO / "recipes/accelerate/fsdp2.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no")
    (tmp_path / "cpu-fsdp2.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "cpu-fsdp2.yaml"),
           "--log_dir", str(tmp_path / "launch"), "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft",
           "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode != 0
    assert "the launch config asks for FSDP, but accelerate runs these processes as MULTI_CPU" in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the model loads (transformers' progress bar)
    manifest = json.loads((tmp_path / "runs/launch/default/manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] != "done"
    assert not (tmp_path / "runs/launch/default/sft/model").exists()
