"""A tiny random Llama with a real BPE tokenizer and a ChatML chat template, built in seconds.

Tests and benchmarks use it wherever the real SmolLM2 would only make them slower: it has SmolLM2's shape of
special tokens (<|im_start|>, <|im_end|>, <|endoftext|>), a chat template with `{% generation %}` markers (so TRL's
assistant-only loss works) and a generation_config that stops at <|im_end|>. Head size 64 keeps vLLM's CPU attention
kernels happy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "I am a helpful assistant. My name is llmstack and I was trained to answer questions.",
    "Question: what is two plus two? Answer: four. Question: what is three plus five? Answer: eight.",
    "Fellow citizens, the state of the union is strong, and the congress shall debate the budget.",
    "Write a poem about the sea. The sea is blue and wide, the waves roll in with the tide.",
    "def add(a, b):\n    return a + b\n",
    "Please summarize the following text in one sentence. Sure, here is a short summary of the text.",
    "Who are you? I am an AI assistant. How can I help you today? Thank you very much!",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
]


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048  # a tool conversation's system prompt alone is ~600 of these small-vocabulary tokens
    return fast


def build_tiny_model(out: str | Path, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer to `out` (≈1 MB) and return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64, head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eot,
        pad_token_id=eos, dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eot, eos], pad_token_id=eos)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "llmstack_model.json").write_text(json.dumps({"name": "tiny-llama", "license": "generated"}))
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (tests and benchmarks start servers on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc=None, headers: dict | None = None) -> None:
    """Wait until `url` answers 200 (asked with `headers`); fail early if `proc` (the server being waited for)
    exits."""
    from llmstack.serve.readiness import wait_ready

    outcome = wait_ready(url, headers=headers, timeout=timeout,
                         gone=(lambda: proc.poll() is not None) if proc is not None else None)
    if outcome == "gone":
        raise RuntimeError(f"server exited with {proc.returncode}")
    if outcome == "timeout":
        raise TimeoutError(url)


@contextlib.contextmanager
def local_ray_cluster(cpus: int, pythonpath: str):
    """A Ray head on 127.0.0.1 (`ray start --head`, `cpus` CPUs) for tests and benchmarks: yields (address, process
    group of its daemons), stops them after. `pythonpath`: where the workers find llmstack (they unpickle its steps)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must stay under 107 bytes
    env = {**os.environ, "PYTHONPATH": pythonpath}
    # its own session: the head's daemons (gcs_server, raylet, workers) stay in this process group, stopped below
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", str(cpus),
                             "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats", "--temp-dir", temp], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = head.communicate(timeout=120)
    try:
        if head.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out}")
        yield f"127.0.0.1:{port}", head.pid
    finally:
        # SIGKILL at once: Ray's gcs_server, raylet and monitor outlive a SIGTERM by more than 10 s (`ray stop` waits
        # them out), and this throwaway cluster keeps nothing that needs a clean exit (its folder goes below)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(head.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(temp, ignore_errors=True)


def stop_process_group(proc, timeout: float = 60) -> None:
    """Stop a server started with `start_new_session=True` and everything it spawned (vLLM's engine core, uvicorn
    workers): SIGTERM to the group so it can drain, SIGKILL if it has not exited within `timeout` seconds."""
    import os
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RedisServer:
    """A throwaway redis-server on a free loopback port without persistence (tests, benchmarks): started, stopped and
    started again on the same port (as a redis restart), or hung for a while with redis's own `DEBUG SLEEP`."""

    def __init__(self, folder: str | Path, exe: str | None = None):
        import shutil

        self.exe = exe or shutil.which("redis-server")
        if self.exe is None:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server; `make test` "
                                    "installs it)")
        self.port, self.dir, self.proc = free_port(), Path(folder), None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "local"],
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def hang(self, seconds: float):
        """Put the server to sleep for `seconds` (it answers nobody meanwhile); returns the thread that asked."""
        import threading
        import time

        import redis

        t = threading.Thread(target=lambda: redis.Redis(port=self.port).execute_command("DEBUG", "SLEEP", seconds))
        t.start()
        time.sleep(0.2)  # the server is asleep from here on
        return t


def nginx_balancer_conf(folder: str | Path, listen: int, upstreams: list[int],
                        per_address: int | None = None) -> Path:
    """serve/deploy/nginx-llmstack.conf (the config an operator copies) with these replica ports and listen port
    (and, if given, another per-address limit on requests in flight), inside a main nginx.conf that keeps the pid
    file, logs and temp paths under `folder`, so nginx runs as any user (`nginx -c <returned path> -e
    <folder>/error.log`)."""
    import getpass
    import os
    import re

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    site = (Path(__file__).resolve().parent.parent / "serve" / "deploy" / "nginx-llmstack.conf").read_text()
    site, n = re.subn(r"(?m)^\s*server 127\.0\.0\.1:\d+[^\n]*\n", "", site)
    if n != 2:
        raise ValueError("serve/deploy/nginx-llmstack.conf no longer lists two example upstream servers")
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in upstreams)
    site = site.replace("upstream llmstack_replicas {\n", "upstream llmstack_replicas {\n" + servers)
    site, n = re.subn(r"listen 8000;", f"listen 127.0.0.1:{listen};", site)
    if n != 1:
        raise ValueError("serve/deploy/nginx-llmstack.conf no longer listens on 8000")
    if per_address is not None:
        site, n = re.subn(r"limit_conn llmstack_per_address \d+;", f"limit_conn llmstack_per_address {per_address};",
                          site)
        if n != 1:
            raise ValueError("serve/deploy/nginx-llmstack.conf no longer sets limit_conn llmstack_per_address")
    (folder / "site.conf").write_text(site)
    temp = {k: folder / k for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for d in temp.values():
        d.mkdir(exist_ok=True)
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise be nobody
    (folder / "nginx.conf").write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
        "events { worker_connections 1024; }\nhttp {\n"
        f"  access_log {folder}/access.log;\n"
        + "".join(f"  {k}_temp_path {d};\n" for k, d in temp.items())
        + f"  include {folder}/site.conf;\n}}\n")
    return folder / "nginx.conf"


class ScriptedEngine:
    """An engine (the Engine protocol of llmstack.serve.engines) that says a given thing on cue: it streams `text`
    `chunk` characters at a time with `delay` seconds between pieces, or, with no text, one " word" delta per
    requested token at once (what the API alone costs, apart from any model: scripts/bench_serve.py). The tests of
    the output rails, the queue and the request path use it where a real model's answer could not be chosen; it keeps
    the prompt ids it was sent, and `fail_after=N` makes it raise after N pieces (an engine dying mid-answer). A list of
    texts is said one per call, the last one again after that (a request the server answers in two calls)."""

    kind, state, restarts, ready = "scripted", "ready", 0, True

    def __init__(self, tokenizer, text: str | list[str] | None = None, delay: float = 0.0, chunk: int = 4,
                 names: list[str] | None = None, max_model_len: int = 512, fail_after: int | None = None):
        self.tokenizer, self.text, self.delay, self.chunk = tokenizer, text, delay, chunk
        self.names, self.max_model_len, self.fail_after = names or ["tiny"], max_model_len, fail_after
        self.prompts: list[list[int]] = []  # the prompt token ids of every request, as the API rendered them

    def running(self) -> int:
        return 0

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def generate(self, request_id, prompt_ids, params, model_name):
        import asyncio

        from llmstack.serve.engines import Delta

        self.prompts.append(list(prompt_ids))
        text = self.text[min(len(self.prompts), len(self.text)) - 1] if isinstance(self.text, list) else self.text
        if text is None:
            for i in range(params.max_tokens):
                yield [Delta(0, " word", [1], finish_reason="length" if i == params.max_tokens - 1 else None)]
            return
        for n, i in enumerate(range(0, len(text), self.chunk)):
            if self.fail_after is not None and n >= self.fail_after:
                raise RuntimeError("scripted engine failure")  # an engine that dies mid-answer
            await asyncio.sleep(self.delay)
            piece = text[i:i + self.chunk]
            # one "token" per piece; with logprobs, the piece itself is the top alternative
            rows = ([{"token": piece, "logprob": -0.5, "top": [{"token": piece, "logprob": -0.5}]}]
                    if params.logprobs is not None else None)
            yield [Delta(0, piece, [1], logprobs=rows)]
        yield [Delta(0, "", [], finish_reason="stop")]


def slow_grammar_child(conn, info_json: str, cache_bytes: int, seconds: float = 8.0) -> None:
    """The grammar child process (llmstack.serve.engines.grammar) with a compile that takes `seconds` longer for a
    schema naming `slow_marker`: what a hostile schema costs on a large vocabulary, made deterministic for tests."""
    import time

    from llmstack.serve.engines import grammar

    class Slow:
        def recv(self):
            msg = conn.recv()
            if "slow_marker" in (msg[1] or ""):
                time.sleep(seconds)
            return msg

        def send(self, msg):
            conn.send(msg)

    grammar._child(Slow(), info_json, cache_bytes)
