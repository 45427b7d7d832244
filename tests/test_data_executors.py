"""Curation on a cluster, on datatrove's executors (`data.executor`): a real local Ray cluster (`ray start --head`,
2 CPUs, started and stopped here) curates the same dataset, byte for byte, with the same data card counts, as the
local executor; for Slurm (none here) the generated job scripts are checked and their payloads are run the way Slurm
would run them (SLURM_ARRAY_TASK_ID per array task), ending in the same dataset. Bad executor config names its path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.testing import local_ray_cluster
from test_data_curate import hostile_rows

REPO = Path(__file__).resolve().parent.parent


def write_recipe(tmp: Path, tiny_model: Path, name: str, executor: str | None) -> Path:
    src = tmp / "rows.jsonl"
    if not src.exists():
        lines, _ = hostile_rows()
        src.write_bytes(b"\n".join(lines[:-1]) + b"\n")  # all but the 50 MB row
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(
        f"name: exec\nseed: 7\nmodel: {{source: {tiny_model}}}\n"
        f"data:\n  cards_dir: null\n  workers: 2\n" + (f"  executor: {executor}\n" if executor else "") +
        f"  datasets:\n    sft:\n      schema: messages\n      validation_fraction: 0.2\n"
        f"      filters: {{max_tokens: 2000, blocklist: [frobnicator]}}\n"
        f"      sources: [{{name: fixture, path: {src}, format: alpaca}}]\n")
    return recipe


def curate_cli(recipe: Path, runs: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llmstack", "curate", str(recipe), "--runs-dir", str(runs), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def outcome(runs: Path) -> tuple[dict, str]:
    from llmstack.runs import sha256_path

    stage = runs / "exec" / "default" / "curate"
    card = json.loads((stage / "cards" / "sft.json").read_text())
    return ({k: card[k] for k in ("content_sha256", "counts", "dropped", "rows_after_step")},
            sha256_path(stage / "sft"))


@pytest.fixture(scope="module")
def local_result(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("local")
    proc = curate_cli(write_recipe(tmp, tiny_model, "local", None), tmp / "runs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executor = json.loads((tmp / "runs/exec/default/curate/work/sft/logs_pass1/executor.json").read_text())
    assert "start_method" in executor  # LocalPipelineExecutor's
    return outcome(tmp / "runs")


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (requirements/ray.lock; `make test` installs it)")
    with local_ray_cluster(2, str(REPO)) as (address, _):
        yield address


def test_ray_cluster_curates_what_the_local_executor_curates(ray_cluster, local_result, tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, "ray", f"{{type: ray, address: '{ray_cluster}'}}")
    proc = curate_cli(recipe, tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executor = json.loads((tmp_path / "runs/exec/default/curate/work/sft/logs_pass1/executor.json").read_text())
    assert executor["cpus_per_task"] == 1 and executor["world_size"] == 2  # RayPipelineExecutor's, 2 tasks
    card, dataset_hash = outcome(tmp_path / "runs")
    assert card["counts"]["dropped"] > 5 and card["counts"]["kept"] > 5  # a run that decided things
    assert (card, dataset_hash) == local_result


def test_executor_is_not_part_of_the_curate_fingerprint(tmp_path, tiny_model):
    from llmstack.config.recipe import load_recipe
    from llmstack.pipeline import fingerprints

    fp = {e: fingerprints(load_recipe(write_recipe(tmp_path, tiny_model, e, e), check_trainer=False))["curate"]
          for e in ("local", "ray")}
    assert fp["local"] == fp["ray"]  # a dataset curated on either is reused by `llmstack run`


def test_bad_executor_config_names_its_path(tmp_path, tiny_model):
    from llmstack.config.recipe import RecipeError, load_recipe

    for executor, message in [
        ("{type: slurm}", "data.executor: a slurm executor needs `partition:`"),
        ("{type: ray, address: 'http://head:8265'}", "data.executor: address 'http://head:8265': use auto, HOST:PORT"),
        ("{type: local, partition: cpu}", "data.executor: partition: only for `type: slurm`"),
        ("{type: dask}", "data.executor.type: "),
    ]:
        with pytest.raises(RecipeError) as info:
            load_recipe(write_recipe(tmp_path, tiny_model, "bad", executor), check_trainer=False)
        assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_ray_address_with_no_cluster_is_a_one_line_error(tmp_path, tiny_model):
    pytest.importorskip("ray", reason="ray is not installed (requirements/ray.lock; `make test` installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = curate_cli(write_recipe(tmp_path, tiny_model, "r", f"{{type: ray, address: '127.0.0.1:{port}'}}"),
                      tmp_path / "runs")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert f"data.executor.address '127.0.0.1:{port}': no Ray cluster there" in proc.stdout + proc.stderr
    assert "fetching" not in proc.stdout + proc.stderr  # refused before curation reads or tokenizes anything


SLURM = "{type: slurm, partition: cpu, time: '00:30:00', cpus_per_task: 2, sbatch_args: {account: proj}}"


def test_slurm_dry_run_writes_jobs_that_curate_what_the_local_executor_curates(local_result, tiny_model, tmp_path):
    """No Slurm here: the dry run's scripts are checked, submit.sh is run against an `sbatch` that records its
    arguments (the dependency chain), and each job's payload is run as Slurm would run it on a node (its
    SLURM_ARRAY_TASK_ID, SLURM_NODELIST and `scontrol`), ending with the collect job: the same dataset as local."""
    recipe = write_recipe(tmp_path, tiny_model, "slurm", SLURM)
    runs = tmp_path / "runs"
    plain = curate_cli(recipe, runs)  # without --slurm: a clear error, nothing half-done
    assert plain.returncode == 1 and "llmstack curate RECIPE --slurm" in " ".join((plain.stdout + plain.stderr).split())
    proc = curate_cli(recipe, runs, "--slurm", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage = runs / "exec" / "default" / "curate"
    work = stage / "work" / "sft"
    pass1, pass2 = (work / f"logs_{t}" / "launch_script.slurm" for t in ("pass1", "pass2"))
    head1 = {line.split("=")[0]: line.split("=", 1)[-1] for line in pass1.read_text().splitlines()
             if line.startswith("#SBATCH")}
    assert head1["#SBATCH --partition"] == "cpu" and head1["#SBATCH --time"] == "00:30:00"
    assert head1["#SBATCH --cpus-per-task"] == "2" and head1["#SBATCH --array"] == "0-1"  # data.workers: 2 tasks
    assert head1["#SBATCH --mem-per-cpu"] == "2048M" and head1["#SBATCH --account"] == "proj"
    assert "#SBATCH --array=0-0" in pass2.read_text()
    assert not (stage / "sft").exists()  # a dry run curates nothing
    submit = stage / "slurm" / "submit.sh"
    assert subprocess.run(["bash", "-n", str(submit)]).returncode == 0

    # submit.sh chains the jobs: pass 2 after pass 1, collect after pass 2
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 100 ))\n'
                                 'echo "$n $*" >> "$LOG"\necho "$n;cluster"\n')
    (bin_ / "scontrol").write_text('#!/bin/bash\necho localhost\n')  # `scontrol show hostnames $SLURM_NODELIST`
    for stub in bin_.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LOG": str(tmp_path / "sbatch.log"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(["bash", str(submit)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert [c.split()[-1] for c in calls] == [str(pass1), str(pass2), str(stage / "slurm" / "collect.slurm")]
    assert "--dependency=afterok:100 " in calls[1] and "--dependency=afterok:101 " in calls[2]

    # the payloads, as the nodes would run them
    def payload(script: Path) -> str:
        line = next(x for x in script.read_text().splitlines() if "launch_pickled_pipeline" in x)
        return line.split("srun -l -n 1 ", 1)[-1]

    for script, tasks in ((pass1, 2), (pass2, 1)):
        for task in range(tasks):
            ran = subprocess.run(["bash", "-c", payload(script)], capture_output=True, text=True, timeout=300,
                                 env={**env, "SLURM_ARRAY_TASK_ID": str(task), "RUN_OFFSET": "0",
                                      "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "1"})
            assert ran.returncode == 0, ran.stderr[-3000:]
    collect = (stage / "slurm" / "collect.slurm").read_text()
    assert "--slurm-collect" in collect and "#SBATCH --partition=cpu" in collect
    ran = subprocess.run(["bash", "-c", collect.split("set -xe", 1)[1]], capture_output=True, text=True,
                         timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    manifest = json.loads((runs / "exec" / "default" / "manifest.json").read_text())
    assert manifest["stages"]["curate"]["status"] == "done"  # recorded: `llmstack run` goes on from here
    assert outcome(runs) == local_result


def test_slurm_collect_refuses_incomplete_passes(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, "slurm", SLURM)
    assert curate_cli(recipe, tmp_path / "runs", "--slurm", "--dry-run").returncode == 0
    proc = curate_cli(recipe, tmp_path / "runs", "--slurm-collect")  # as if the array job never ran
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1 and "pass1: 2 of 2 Slurm task(s) did not complete" in out, out
    assert "Traceback" not in out
