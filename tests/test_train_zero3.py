"""DeepSpeed ZeRO-3 launched for real: two CPU processes over gloo (DeepSpeed's CPU accelerator), from the optional
DeepSpeed env (.venv-ds: `make .venv-ds/.llmstack-installed`, layered over .venv). Parameters are partitioned
across the ranks; rank 0 alone merges the LoRA adapter and answers the probes, which under `zero3_init_flag` hung
before (from_pretrained inside zero.Init is a collective call). Also: the recipe's gradient accumulation is what
DeepSpeed trains with, and a launch config pinning another value is refused with both places named. DeepSpeed's
shared-memory op comes compiled in the env's wheel: the launch builds nothing just in time."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from test_train_launch import _recipe_with_done_inputs

REPO = Path(__file__).resolve().parent.parent
DS_PYTHON = REPO / ".venv-ds" / "bin" / "python"


@pytest.mark.skipif(not DS_PYTHON.exists(), reason="the optional DeepSpeed env is not built: "
                                                  "make .venv-ds/.llmstack-installed")
def test_two_process_zero3_lora_merges_probes_and_accumulates_as_the_recipe_says(tmp_path, tiny_model):
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model, {"lora": {"r": 8}, "probe": ["Hi there"]})
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["args"]["gradient_accumulation_steps"] = 2  # the shipped config leaves it to the recipe
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [str(DS_PYTHON), "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu-zero3.yaml"), "--log_dir", str(tmp_path / "launch"),
           "-m", "llmstack.cli.launch", str(recipe), "--stage", "sft", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jit = list((tmp_path / "jit").rglob("*.so"))
    assert not jit, f"DeepSpeed compiled {jit} at launch: rebuild the env (rm .venv-ds/.llmstack-installed; make it)"
    run_dir = tmp_path / "runs" / "launch" / "default"
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    m = entry["metrics"]
    assert entry["status"] == "done" and m["distributed"] == "DEEPSPEED" and m["world_size"] == 2
    assert m["steps"] == 3 and m["gradient_accumulation_steps"] == 2
    assert [p["question"] for p in m["probe"]] == ["Hi there"] and isinstance(m["probe"][0]["answer"], str)

    # The adapter was gathered from both ranks and merged whole: the saved model is exactly base + adapter, and the
    # adapter learned something (LoRA's B starts at zero, so an ungathered or unsaved adapter merges to the base).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    by_hand = PeftModel.from_pretrained(base, run_dir / "sft" / "adapter").merge_and_unload().state_dict()
    assert saved.keys() == by_hand.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], by_hand[k])
    assert max((saved[k] - base_sd[k]).abs().max().item() for k in saved) > 1e-4
    assert [p.parent for p in run_dir.rglob("config.json")] == [run_dir / "sft" / "model"]  # written once


def test_a_launch_config_pinning_other_accumulation_is_refused(tmp_path, tiny_model):
    from llmstack.config.recipe import RecipeError, load_recipe

    config = yaml.safe_load((REPO / "recipes/accelerate/cpu-zero3.yaml").read_text())
    config["deepspeed_config"]["gradient_accumulation_steps"] = 1
    (tmp_path / "z3.yaml").write_text(yaml.safe_dump(config))
    recipe = _recipe_with_done_inputs(tmp_path, tiny_model, {"launch": str(tmp_path / "z3.yaml")})
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["args"]["gradient_accumulation_steps"] = 4
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert info.value.problems == [
        f"stages[0]: {tmp_path / 'z3.yaml'} sets deepspeed_config.gradient_accumulation_steps: 1, but this stage's "
        "args.gradient_accumulation_steps is 4; DeepSpeed would train with 1. Remove the key from "
        f"{tmp_path / 'z3.yaml'} (the recipe's value is then used) or set the two to the same number"]
    raw["stages"][0]["args"]["gradient_accumulation_steps"] = 1  # equal: fine
    recipe.write_text(yaml.safe_dump(raw))
    load_recipe(recipe)
    # the shipped GPU config leaves the value to the recipe (recipes/qlora-8b.yaml asks for 2 and 4)
    assert "gradient_accumulation_steps" not in yaml.safe_load(
        (REPO / "recipes/accelerate/zero3.yaml").read_text())["deepspeed_config"]
