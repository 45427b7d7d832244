"""Training stages on the tiny model: real TRL trainers, outcomes that could fail (loss goes down, only adapter weights
move, the DPO margin grows, a crashed run resumes to the same losses, the exported folder is complete)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from train_data import make_ctx, make_recipe, messages_dataset, preference_dataset, text_dataset

# SmolLM2-135M-Instruct's own template (no {% generation %} markers): the marking path is exercised on the tiny model.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"chat": messages_dataset(root / "chat"), "text": text_dataset(root / "text"),
            "prefs": preference_dataset(root / "prefs")}


@pytest.fixture(scope="module")
def plain_template_model(tiny_model, tmp_path_factory):
    """The tiny model with SmolLM2's marker-less chat template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = SMOLLM2_TEMPLATE
    tok.save_pretrained(out)
    return out


SCHEMA = {"chat": "messages", "text": "text", "prefs": "preference"}


def train(tmp_path, model, data, stage: dict, name: str | None = None):
    from llmstack.pipeline import stage_function

    ds = {stage["dataset"]: data[stage["dataset"]]}
    recipe = make_recipe(model, {k: (SCHEMA[k], p) for k, p in ds.items()}, [stage])
    ctx = make_ctx(recipe, tmp_path / "runs", recipe.stages[0].id, model, ds)
    return ctx, stage_function(stage["type"])(ctx)


def fast_args(**kw):
    return {"max_steps": 10, "learning_rate": 2e-3, "per_device_train_batch_size": 4, "max_length": 128,
            "report_to": [], **kw}


def test_sft_full_loss_decreases_and_exports_complete_model(tmp_path, plain_template_model, data):
    from transformers import AutoTokenizer, GenerationConfig

    stage = {"type": "sft", "dataset": "chat", "args": fast_args(report_to=["tensorboard"])}
    ctx, res = train(tmp_path, plain_template_model, data, stage)
    losses = [h["loss"] for h in json.loads((ctx.dir / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert res.metrics["steps"] == 10 and res.metrics["tokens_per_s"] > 0
    out = res.model
    assert out == ctx.dir / "model" and (out / "model.safetensors").exists()
    # The ORIGINAL template ships with the model, not the marked training one.
    assert AutoTokenizer.from_pretrained(out).chat_template == SMOLLM2_TEMPLATE
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(out).eos_token_id
    assert (ctx.dir / "loss.png").stat().st_size > 1000 and "loss.png" in (ctx.dir / "section.md").read_text()
    assert list((ctx.dir / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs beside the model
    assert not list(ctx.dir.glob("checkpoint-*"))  # a finished stage drops its checkpoints


def test_training_template_marks_exactly_the_assistant_turns(plain_template_model):
    from transformers import AutoTokenizer

    from llmstack.train.templates import training_chat_template

    tok = AutoTokenizer.from_pretrained(plain_template_model)
    marked = training_chat_template(tok)
    msgs = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am llmstack."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template=marked) == \
        tok.apply_chat_template(msgs, tokenize=False)
    enc = tok.apply_chat_template(msgs, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert trained == "I am llmstack.<|im_end|>Yes.<|im_end|>"


def test_unmarkable_template_is_a_clear_error(tiny_model):
    from transformers import AutoTokenizer

    from llmstack.train.templates import ChatTemplateError, training_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="assistant_only_loss: false"):
        training_chat_template(tok)


def test_packed_sft_rows_have_no_double_bos_and_train_only_assistant_tokens(tmp_path, plain_template_model, data):
    """Tokenise as the trainer does; SmolLM2-style tokenizers name <|im_start|> as BOS, so a tokenizer that also added
    one would start every row with two."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmstack.train.templates import check_single_bos, training_chat_template

    tok = AutoTokenizer.from_pretrained(plain_template_model)
    tok.bos_token = "<|im_start|>"
    tok.chat_template = training_chat_template(tok)
    from datasets import load_from_disk

    ds = load_from_disk(str(data["chat"]))["train"]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True, packing=True,
                     max_length=128, report_to=[])
    trainer = SFTTrainer(model=str(plain_template_model), args=args, train_dataset=ds, processing_class=tok)
    bos = tok.bos_token_id
    for row in trainer.train_dataset:
        ids, lens = row["input_ids"], row["seq_lengths"]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        for s in starts:
            assert ids[s] == bos and ids[s + 1] != bos  # each packed document starts with exactly one BOS
        trained = [t for t in row["labels"] if t != -100]
        assert 0 < len(trained) < len(ids) and bos not in trained  # only assistant text (and its <|im_end|>)
    check_single_bos(tok, tok.apply_chat_template(ds[0]["messages"], tokenize=False))
    # A tokenizer that adds BOS itself, fed a template that writes it too, is caught before training.
    doubled = AutoTokenizer.from_pretrained(plain_template_model)
    from tokenizers import processors

    doubled.bos_token = "<|im_start|>"
    doubled._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    with pytest.raises(ValueError, match="two BOS"):
        check_single_bos(doubled, doubled.apply_chat_template(ds[0]["messages"], tokenize=False))


def test_lora_changes_only_adapter_weights(tmp_path, tiny_model, data):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stage = {"type": "sft", "dataset": "chat", "lora": {"r": 8, "alpha": 16}, "args": fast_args(max_steps=4)}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    base = load_file(tiny_model / "model.safetensors")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ctx.dir / "adapter")
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            assert p.abs().sum() > 0, f"{name} never moved"  # LoRA B starts at zero
        elif "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base[key]), f"{key} changed but is not an adapter weight"
    merged = load_file(res.model / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed  # targets: all linear layers
    assert "model.embed_tokens.weight" not in changed
    assert not (res.model / "adapter_config.json").exists()  # merged: a plain folder


def test_a_lora_stage_trains_in_the_policys_precision_and_saves_float32(tmp_path, tiny_model, data):
    """model.dtype auto: the sft stage loads what the device policy says and records it — on a CPU with native bf16
    a bf16 base with float32 adapters and no autocast, elsewhere float32 — and writes its merged model in float32."""
    from safetensors.torch import load_file

    from llmstack.device import policy

    stage = {"type": "sft", "dataset": "chat", "lora": {"r": 8, "alpha": 16}, "args": fast_args(max_steps=2)}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    if policy().train_weights("auto", adapter=True) == "bfloat16":
        assert res.metrics["dtype"] == "bfloat16 weights, float32 trainable"
    else:
        assert res.metrics["dtype"] == "float32 weights"
    assert res.metrics["device"] == "cpu" and math.isfinite(res.metrics["last_loss"])
    assert {t.dtype for t in load_file(res.model / "model.safetensors").values()} == {torch.float32}


def test_qlora_runs_on_cpu_and_exports_plain_weights(tmp_path, tiny_model, data):
    stage = {"type": "sft", "dataset": "chat", "qlora": {"r": 8}, "args": fast_args(max_steps=3)}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    cfg = json.loads((res.model / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert res.metrics["steps"] == 3 and math.isfinite(res.metrics["last_loss"])


def test_cpt_loss_decreases_on_text(tmp_path, tiny_model, data):
    ctx, res = train(tmp_path, tiny_model, data, {"type": "cpt", "dataset": "text", "args": fast_args()})
    assert res.metrics["last_loss"] < res.metrics["first_loss"] - 0.3, res.metrics
    assert res.metrics["tokens"] > 0


def _margin(model_dir: Path, prefs: Path) -> float:
    """Mean log p(chosen) - log p(rejected) over the training pairs (the quantity DPO pushes up)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt, answer):
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + answer, tokenize=False)
        ids = tok(full, return_tensors="pt").input_ids
        n = len(tok(p).input_ids)
        with torch.no_grad():
            lp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        return lp[n - 1:].sum().item()

    rows = load_from_disk(str(prefs))["train"]
    return sum(logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows) / len(rows)


def test_dpo_increases_chosen_over_rejected_margin(tmp_path, tiny_model, data):
    stage = {"type": "dpo", "dataset": "prefs", "args": fast_args(max_steps=8, learning_rate=1e-3)}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    before, after = _margin(tiny_model, data["prefs"]), _margin(res.model, data["prefs"])
    assert after > before + 1.0, (before, after)
    assert res.metrics["rewards_margins_last"] > 0
    assert (ctx.dir / "rewards_margins.png").exists()


def test_crashed_run_resumes_to_the_same_losses(tmp_path, tiny_model, data, monkeypatch):
    import trl

    stage = {"type": "sft", "dataset": "chat", "args": fast_args(max_steps=8, save_steps=2)}
    ctx_a, _ = train(tmp_path / "a", tiny_model, data, stage)
    uninterrupted = {h["step"]: h["loss"] for h in json.loads((ctx_a.dir / "log_history.json").read_text())
                     if "loss" in h}

    calls = {"n": 0}
    original = trl.SFTTrainer.training_step

    def crash_at_step_6(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return original(self, *a, **kw)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", tiny_model, data, stage)
    monkeypatch.setattr(trl.SFTTrainer, "training_step", original)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "runs" / "t" / "test" / "sft").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]

    # checkpoints written by a launch of another process count are refused before the model loads
    from llmstack.train import loading

    launched = tmp_path / "b" / "runs" / "t" / "test" / "sft" / "resume-processes.txt"
    assert launched.read_text() == "1"
    launched.write_text("2")
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: loads.append(a))
    with pytest.raises(RuntimeError, match="written by a launch of 2 processes; this one has 1"):
        train(tmp_path / "b", tiny_model, data, stage)
    assert loads == []
    monkeypatch.undo()
    launched.write_text("1")

    ctx_b, res = train(tmp_path / "b", tiny_model, data, stage)  # the pipeline re-runs a stage that is not done
    resumed = {h["step"]: h["loss"] for h in json.loads((ctx_b.dir / "log_history.json").read_text()) if "loss" in h}
    assert res.metrics["steps"] == 8
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4), (step, resumed, uninterrupted)


def test_stacked_adapter_chains_into_the_next_stage(tmp_path, tiny_model, data):
    """lora.merge: false outputs the adapter alone; the next stage (dpo) loads base + adapter and trains on it."""
    from llmstack.pipeline import stage_function

    stages = [{"type": "sft", "dataset": "chat", "lora": {"r": 8, "merge": False}, "args": fast_args(max_steps=3)},
              {"type": "dpo", "dataset": "prefs", "lora": {"r": 8}, "args": fast_args(max_steps=2)}]
    ds = {"chat": data["chat"], "prefs": data["prefs"]}
    recipe = make_recipe(tiny_model, {k: (SCHEMA[k], p) for k, p in ds.items()}, stages)
    sft = stage_function("sft")(make_ctx(recipe, tmp_path, "sft", tiny_model, ds))
    cfg = json.loads((sft.model / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve()) and not (sft.model / "config.json").exists()
    assert (sft.model / "tokenizer.json").exists()
    dpo = stage_function("dpo")(make_ctx(recipe, tmp_path, "dpo", sft.model, ds))
    assert (dpo.model / "config.json").exists() and dpo.metrics["steps"] == 2


def test_an_adapter_input_is_merged_once_and_again_when_it_changes(tmp_path, tiny_model):
    """QLoRA and reward stages merge an adapter-only input to disk in their own folder. Kept while the adapter is the
    same; merged anew when it changed (upstream trained again) or when a crash left a merge without its stamp."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmstack.train.loading import merged_copy

    def adapter(seed: int):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp_path / "adapter")

    def weights(folder):
        m = AutoModelForCausalLM.from_pretrained(folder)
        return m.model.layers[0].self_attn.q_proj.weight.detach().clone()

    stage = tmp_path / "stage"
    stage.mkdir()
    adapter(1)
    out = merged_copy(tmp_path / "adapter", stage, "float32")
    first, mtime = weights(out), (out / "model.safetensors").stat().st_mtime_ns
    assert out == stage / "merged-input" and not torch.equal(first, weights(tiny_model))  # the adapter is in it
    assert merged_copy(tmp_path / "adapter", stage, "float32") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # same adapter: not merged again
    adapter(2)  # upstream trained again into the same folder
    assert not torch.equal(weights(merged_copy(tmp_path / "adapter", stage, "float32")), first)
    (out / "adapter.sha256").unlink()  # as a crash between the weights and the stamp would leave it
    (out / "model.safetensors").write_bytes(b"")
    assert weights(merged_copy(tmp_path / "adapter", stage, "float32")).shape == first.shape
    assert sorted(p.name for p in stage.iterdir()) == ["merged-input"]  # no temporary folder left behind


def test_device_defaults_lose_to_the_recipe_args(tmp_path, tiny_model, data):
    from llmstack.device import policy
    from llmstack.train.setup import trainer_config

    stage = {"type": "sft", "dataset": "chat", "args": {"gradient_checkpointing": True, "max_steps": 1}}
    recipe = make_recipe(tiny_model, {"chat": ("messages", data["chat"])}, [stage])
    ctx = make_ctx(recipe, tmp_path, "sft", tiny_model, {"chat": data["chat"]})
    cfg = trainer_config(ctx, {"packing": True})
    assert cfg.gradient_checkpointing is True  # the user's choice
    # the device policy's autocast (bf16 only over float32 weights on a CPU with native bf16), not TRL's bf16=True
    assert cfg.bf16 is policy().trainer_defaults("float32")["bf16"] and cfg.use_cpu is True
    assert cfg.packing is True and cfg.output_dir == str(ctx.dir) and cfg.seed == 7
    stage["args"]["bf16"] = not cfg.bf16
    recipe = make_recipe(tiny_model, {"chat": ("messages", data["chat"])}, [stage])
    ctx = make_ctx(recipe, tmp_path, "sft", tiny_model, {"chat": data["chat"]})
    assert trainer_config(ctx, {}).bf16 is stage["args"]["bf16"]  # the recipe's args win over the policy


@pytest.mark.slow
def test_smollm2_training_template_is_byte_identical_and_masks_assistant(smollm2):
    """On the real SmolLM2 tokenizer: the marked template renders exactly as the shipped one, and the loss mask covers
    the assistant's words and its <|im_end|>, nothing of the default system prompt or the user turn."""
    from transformers import AutoTokenizer

    from llmstack.train.templates import training_chat_template

    tok = AutoTokenizer.from_pretrained(smollm2)
    marked = training_chat_template(tok)
    assert marked != tok.chat_template
    msgs = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am llmstack."}]
    for gen in (False, True):
        conv = msgs if not gen else msgs[:1]
        assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, chat_template=marked) == \
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    enc = tok.apply_chat_template(msgs, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == "I am llmstack.<|im_end|>"
    ids = enc["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]
