"""Launching training: `accelerate launch -m llmstack.cli.launch` on two CPU processes (gloo), the shipped accelerate
configs, and the `llmstack train` verb's errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_data import messages_dataset

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    expected = {"cpu": ("NO", 1), "cpu-ddp": ("MULTI_GPU", 2), "cpu-zero3": ("DEEPSPEED", 2), "ddp": ("MULTI_GPU", 8),
                "fsdp2": ("FSDP", 8), "multinode-fsdp2": ("FSDP", 16), "zero3": ("DEEPSPEED", 8)}[path.stem]
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes) == expected
    if path.stem == "multinode-fsdp2":  # per-node values come from the command line (scripts/slurm/train.sbatch)
        assert (cfg.num_machines, cfg.rdzv_backend, cfg.main_process_port) == (2, "static", 29500)
    if path.stem in ("fsdp2", "multinode-fsdp2"):
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if path.stem in ("zero3", "cpu-zero3"):
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"]


def _recipe_with_done_inputs(tmp_path: Path, model: Path, stage_extra: dict | None = None) -> Path:
    """A recipe file plus a run folder whose manifest says model and curate are done (as `llmstack run` leaves it)."""
    from llmstack.runs import Run

    chat = messages_dataset(tmp_path / "chat")
    raw = {"name": "launch", "seed": 3, "model": {"source": str(model)},
           "data": {"datasets": {"chat": {"schema": "messages", "sources": [{"name": "c", "path": str(chat)}]}},
                    "cards_dir": str(tmp_path / "cards")},
           "stages": [{"type": "sft", "dataset": "chat", **(stage_extra or {}),
                       "args": {"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 128,
                                "learning_rate": 1e-3, "report_to": []}}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    from llmstack.config.recipe import load_recipe
    from llmstack.pipeline import fingerprints

    # model and curate come before the stages in the chain, so a recipe without `stage_extra` gives their fingerprints
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**raw, "stages": [{k: v for k, v in raw["stages"][0].items()
                                                          if k not in (stage_extra or {})}]}))
    fp = fingerprints(load_recipe(plain, check_trainer=False))
    run = Run.open(tmp_path / "runs", "launch", "default")
    run.record("model", status="done", fingerprint=fp["model"], result={"model": str(model)})
    # the curated copy training reads (datasets writes cache files next to what it maps): the source stays as hashed
    curated = shutil.copytree(chat, tmp_path / "curated")
    run.record("curate", status="done", fingerprint=fp["curate"],
               result={"model": None, "datasets": {"chat": str(curated)}})
    return recipe


def test_two_process_cpu_launch_trains_and_saves_one_model(tmp_path, tiny_model):
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu-ddp.yaml"), "--log_dir", str(tmp_path / "launch"),
           "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "launch" / "default"
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done" and entry["metrics"]["world_size"] == 2 and entry["metrics"]["steps"] == 3
    assert entry["metrics"]["distributed"] == "MULTI_CPU"  # data parallel over gloo
    models = [p.parent for p in run_dir.rglob("config.json")]
    assert models == [run_dir / "sft" / "model"]  # one model, written once
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(models[0]).num_parameters() > 0

    # One fingerprint chain: the next `llmstack run` reuses the stage the launched processes recorded (the chain
    # includes curate's local input files, which an earlier copy of it in the launch entry left out).
    from llmstack.config.recipe import load_recipe
    from llmstack.pipeline import run_recipe

    again = run_recipe(load_recipe(recipe), recipe, tmp_path / "runs", only=["model", "curate", "sft"])
    assert again.manifest["stages"]["sft"]["started"] == entry["started"]  # not trained again
    assert again.manifest["stages"]["sft"]["fingerprint"] == entry["fingerprint"]


def test_a_sweep_pruned_two_process_stage_stops_every_rank_at_the_same_evaluation(tmp_path, tiny_model):
    """The PRUNE verdict is rank 0's, broadcast: both ranks raise at the same evaluation (no rank left waiting in a
    collective), rank 0 alone writes the intermediate values, and the stage is recorded as pruned."""
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["args"] |= {"eval_strategy": "steps", "eval_steps": 2, "max_steps": 6,
                                 "per_device_eval_batch_size": 2}
    recipe.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "launch" / "default"
    (run_dir / "pruning.json").write_text(json.dumps({"stage": "sft", "metric": "eval_loss"}))
    (run_dir / "sft").mkdir()
    (run_dir / "sft" / "PRUNE").write_text("{}")  # the sweep driver's verdict
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu-ddp.yaml"), "--log_dir", str(tmp_path / "launch"),
           "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "failed" and "pruned by the sweep at step 2" in entry["error"], entry
    lines = [json.loads(x) for x in (run_dir / "sft" / "intermediate.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2]  # one line: rank 0's, at the first evaluation
    assert (proc.stdout + proc.stderr).count("error: pruned by the sweep at step 2") == 2  # each rank stopped there


def _two_nodes(tmp_path: Path, recipe: Path, runs_dirs: list[Path], **env_extra: str) -> tuple[list[int], list[str]]:
    """Two "nodes" on this machine: two `accelerate launch --num_machines 2 --machine_rank 0|1` commands that meet at
    127.0.0.1:PORT (torch's static rendezvous, gloo), one CPU process each, exactly as scripts/slurm/train.sbatch runs
    one per node; node r uses runs_dirs[r] (and the environment plus `env_extra`). Returns (exit codes, logs)."""
    import os

    from llmstack.testing import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes/accelerate/cpu-ddp.yaml"), "--log_dir", str(tmp_path / f"launch{rank}"),
               "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft", "--runs-dir", str(runs_dirs[rank])]
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env), log))
    try:
        codes = [p.wait(600) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    return codes, [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]


def test_two_node_rendezvous_trains_one_model(tmp_path, tiny_model):
    """accelerate 1.15 refuses FSDP on a CPU (test_train_fsdp.py), so the two nodes run DDP (MULTI_CPU); the
    rendezvous, the ranks and the shared run folder are what multinode-fsdp2.yaml uses on GPUs."""
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    codes, logs = _two_nodes(tmp_path, recipe, [tmp_path / "runs"] * 2)
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    run_dir = tmp_path / "runs" / "launch" / "default"
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done" and entry["metrics"]["world_size"] == 2 and entry["metrics"]["steps"] == 3
    assert entry["metrics"]["distributed"] == "MULTI_CPU"
    assert [p.parent for p in run_dir.rglob("config.json")] == [run_dir / "sft" / "model"]  # written once, by rank 0
    assert not list((run_dir / "sft").glob("checkpoint-*"))  # a finished stage leaves no checkpoints behind
    assert not list(run_dir.rglob(".llmstack-shared-check"))  # the shared-folder check cleans up after itself


def test_nodes_without_a_shared_run_folder_are_refused_before_training(tmp_path, tiny_model):
    """Node 1 with its own copy of the run folder (its local disk, not the shared filesystem): it would resume from
    other checkpoints than rank 0, and rank 0's checkpoints would die with its node. Both nodes stop before the model
    loads, naming the rank that cannot see rank 0's folder and the fix. (Rank 1 gives up after one second, not the
    default ten a slow NFS mount may need: on its own disk the file never comes.)"""
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    shutil.copytree(tmp_path / "runs", tmp_path / "node1-disk")
    codes, logs = _two_nodes(tmp_path, recipe, [tmp_path / "runs", tmp_path / "node1-disk"],
                             LLMSTACK_SHARED_FOLDER_WAIT_S="1")
    assert codes[0] != 0 and codes[1] != 0, "\n".join(x[-3000:] for x in logs)
    for log in logs:
        assert "rank 1 on" in log and "cannot see what rank 0 writes" in log and "shared filesystem" in log, log[-3000:]
        assert "rank 0 on" not in log
        assert "Loading weights" not in log  # checked before the model loads (transformers' progress bar)
    run_dir = tmp_path / "runs" / "launch" / "default"
    assert not list(run_dir.rglob("checkpoint-*")) and not (run_dir / "sft" / "model").exists()


def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    """scripts/slurm/train.sbatch as Slurm would run it on 2 nodes (no Slurm here): `srun` runs the step once per node
    with that node's SLURM_NODEID, `scontrol` names the nodes, and `accelerate` prints the arguments it got, which
    accelerate's own launch parser then reads: each node gets its own --machine_rank, all the same rendezvous."""
    import os
    import shlex

    from accelerate.commands.launch import launch_command_parser

    script = REPO / "scripts" / "slurm" / "train.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sbatch = dict(line.split()[1].lstrip("-").split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH"))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "1"  # one launcher per node, never one per GPU
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {"scontrol": 'printf "127.0.0.1\\nnode-b\\n"',
             "srun": 'for id in 0 1; do SLURM_NODEID=$id "${@:2}" > "$OUT/node$id.args"; done',
             "accelerate": 'printf "%s\\n" "$@"'}
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(tmp_path), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "RUNS_DIR": "/shared/runs"}
    proc = subprocess.run(["bash", str(script), "recipes/fsdp2-7b-sft.yaml", "sft"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        argv = (tmp_path / f"node{rank}.args").read_text().splitlines()
        assert argv[0] == "launch", argv
        args = launch_command_parser().parse_args(argv[1:])
        assert (args.machine_rank, args.num_machines, args.num_processes) == (rank, 2, 16)
        assert (args.main_process_ip, args.main_process_port) == ("127.0.0.1", 29500)
        assert Path(args.config_file) == Path("recipes/accelerate/multinode-fsdp2.yaml")
        assert args.module and args.training_script == "llmstack.cli.launch"
        assert args.training_script_args == ["recipes/fsdp2-7b-sft.yaml", "--stage", "sft", "--runs-dir",
                                             "/shared/runs"], shlex.join(argv)


def test_old_launch_entry_points_to_the_new_one():
    proc = subprocess.run([sys.executable, "-m", "llmstack.train", "r.yaml", "--stage", "sft"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "llmstack.train is not a launch entry any more: use `accelerate launch [--config_file ...] "
        "-m llmstack.cli.launch RECIPE --stage NAME` (same arguments)"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmstack", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_train_unknown_stage_is_one_line_error(tmp_path, tiny_model):
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model)
    proc = _cli("train", str(recipe), "--stage", "dpo", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert "'dpo' is not a training stage" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_recipe_launch_must_name_a_config(tmp_path, tiny_model):
    from llmstack.config.recipe import RecipeError, load_recipe

    recipe = _recipe_with_done_inputs(tmp_path, tiny_model, {"launch": "cpu-dpp"})
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert info.value.problems == [
        "stages[0]: launch: 'cpu-dpp' is neither an accelerate config file nor one of "
        "['cpu', 'cpu-ddp', 'cpu-zero3', 'ddp', 'fsdp2', 'multinode-fsdp2', 'zero3']"]


def test_pipeline_hands_a_stage_with_launch_to_accelerate(tmp_path, tiny_model):
    """What `llmstack run` does for a stage with `launch:` — the stage runs in `accelerate launch` children, and the
    pipeline gets their result (model folder + metrics) back."""
    from llmstack.config.recipe import load_recipe
    from llmstack.launchers import Accelerate, InProcess, launcher_for
    from llmstack.pipeline import stage_context, stage_function
    from llmstack.runs import Run

    recipe_path = _recipe_with_done_inputs(tmp_path, tiny_model, {"launch": "cpu-ddp"})
    recipe = load_recipe(recipe_path)
    run = Run.open(tmp_path / "runs", "launch", "default")
    ctx = stage_context(recipe, recipe_path, run, "sft")
    assert ctx.model == tiny_model and set(ctx.datasets) == {"chat"}
    launcher = launcher_for(ctx.spec)  # the pipeline's choice; the stage function itself never launches
    assert launcher == Accelerate(REPO / "recipes/accelerate/cpu-ddp.yaml")
    assert isinstance(launcher_for(recipe.model), InProcess)
    result = launcher.run(ctx, stage_function("sft"))
    assert result.model == ctx.dir / "model" and (result.model / "model.safetensors").exists()
    # torch's elastic agent kept its per-rank folders in the stage's folder (without a log dir: a new /tmp folder)
    assert [p for p in (ctx.dir / "launch").iterdir() if p.is_dir()]
    assert result.metrics["steps"] == 3 and result.metrics["world_size"] == 2
    assert "sft" not in json.loads(run.manifest_path.read_text())["stages"]  # the children left the manifest alone


def test_every_launch_runs_the_one_worker_entry(tmp_path):
    """`llmstack run` (a stage's `launch:`, with the result handed back) and `llmstack train --launch` (the ranks
    record it) start the same command: accelerate with the config, running `-m llmstack.worker` on each rank."""
    from accelerate.commands.launch import launch_command_parser

    from llmstack.launchers import Accelerate

    config = REPO / "recipes/accelerate/cpu-ddp.yaml"
    for handoff in (True, False):
        cmd = Accelerate(config).command(Path("r.yaml"), "sft", "default", Path("runs"), handoff=handoff,
                                         log_dir=Path("runs/x/default/sft/launch"))
        assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        args = launch_command_parser().parse_args(cmd[3:])
        assert Path(args.config_file) == config and args.module and args.training_script == "llmstack.worker"
        assert args.log_dir == "runs/x/default/sft/launch"
        assert args.training_script_args == ["r.yaml", "--stage", "sft", "--run-id", "default", "--runs-dir", "runs",
                                             *(["--handoff"] if handoff else [])]


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_shared_folder_wait_is_refused_before_any_rank_waits(value, tmp_path, monkeypatch):
    """LLMSTACK_SHARED_FOLDER_WAIT_S must be seconds: words, negatives and NaN (a wait that would never end) are
    named with the fix, before the check's first collective."""
    from types import SimpleNamespace

    from llmstack.train.checkpoints import check_shared_folder

    monkeypatch.setenv("LLMSTACK_SHARED_FOLDER_WAIT_S", value)
    with pytest.raises(RuntimeError, match=f"LLMSTACK_SHARED_FOLDER_WAIT_S='{value}': give the seconds"):
        check_shared_folder(SimpleNamespace(num_processes=2), tmp_path)
