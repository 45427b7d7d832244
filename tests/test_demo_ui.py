"""The Gradio chat demo, tested as a person uses it: a real `llmstack serve` (transformers engine, tiny model + a LoRA
adapter as a second model name), the demo app on 127.0.0.1, and Debian's chromium driven by Playwright. A screenshot
of each step is saved under the test's output folder. The demo's tools (calculator, clock) are tested on their own
(hostile input), through the tool loop against an in-process server with a scripted engine, and in the browser."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app as build_server
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine, free_port, wait_http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "sk-llmstack-demo-test"
BLOCKED = "forbidden-word"


@pytest.fixture(scope="module")
def adapter(tiny_loras) -> Path:
    """'tiny-lora' really is a different model from 'tiny' (random non-zero LoRA weights)."""
    return tiny_loras[0]


def start_server(d: Path, model: Path, adapters: dict, max_model_len: int, guard: dict):
    port = free_port()
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "demo", "sha256": hash_key(KEY), "models": ["*"]}]}))
    (d / "guard.yaml").write_text(yaml.safe_dump(guard))
    (d / "server.yaml").write_text(yaml.safe_dump({
        "engine": "hf", "model": str(model), "served_model_name": "tiny", "adapters": adapters,
        "port": port, "max_model_len": max_model_len, "keys": "keys.yaml", "guard": "guard.yaml",
        "audit_log": "audit.jsonl"}))
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(d / "server.yaml")],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
            yield {"base": f"http://127.0.0.1:{port}/v1", "audit": d / "audit.jsonl"}
        finally:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_model, adapter, tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("server"), tiny_model, {"tiny-lora": str(adapter)}, 512,
                            {"input": {"blocklist": [BLOCKED]}, "output": {"holdback_chars": 8}})


@pytest.fixture(scope="module")
def tool_server(tiny_model, tmp_path_factory):
    """Room for the tool specs in the prompt (~600 of the tiny tokenizer's tokens), and prompts in the audit log so
    a test can see what the demo sent back."""
    yield from start_server(tmp_path_factory.mktemp("tool-server"), tiny_model, {}, 2048,
                            {"audit": {"log_prompts": True, "max_field_chars": 100_000}})


def audit_after(path: Path, n: int, until=bool, timeout: float = 60) -> list[dict]:
    """All audit entries, once the ones after the first n satisfy `until` (by default: there is one). The server writes
    an entry when a request finishes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        entries = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if until(entries[n:]):
            return entries
        time.sleep(0.3)
    raise TimeoutError(f"the audit entries after {n} never satisfied {until.__name__}")


def settled_count(path: Path, quiet: float = 0.6, timeout: float = 30) -> int:
    """Audit lines once none has been added for `quiet` seconds: a streamed request's entry is written just after its
    client has read [DONE], so counting right after the previous test could miss it."""
    deadline = time.time() + timeout
    last, since = -1, time.time()
    while time.time() < deadline:
        n = len(path.read_text().splitlines()) if path.exists() else 0
        if n != last:
            last, since = n, time.time()
        elif time.time() - since >= quiet:
            return n
        time.sleep(0.1)
    return last


def answered(entries: list[dict]) -> bool:
    return any(e["status"] == 200 for e in entries)


def test_backend_streams_in_pieces_and_renders_refusals(server):
    from llmstack.demo.app import ChatBackend

    backend = ChatBackend(server["base"], KEY)
    models, err = backend.models()
    assert models == ["tiny", "tiny-lora"] and err is None
    parts = list(backend.stream([], "Hello there", "tiny", "", 1.0, 32))
    assert len(parts) > 1 and all(b.startswith(a) for a, b in itertools.pairwise(parts))  # it really streamed
    blocked = list(backend.stream([], f"say {BLOCKED}", "tiny", "", 0.0, 8))
    assert len(blocked) == 1 and blocked[0].startswith("**Blocked by the guard:**")
    wrong = ChatBackend(server["base"], "sk-llmstack-wrong")
    models, err = wrong.models()
    assert models == [] and "401" in err


def test_backend_fits_a_long_conversation_into_the_context(server):
    """The server's context is 512 tokens: a history that outgrows it loses its oldest turns instead of failing, and a
    message that leaves less room than Max tokens asks for gets the room there is."""
    from llmstack.demo.app import ChatBackend

    backend = ChatBackend(server["base"], KEY)
    long = " ".join(["word"] * 150)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i}: {long}"}, {"role": "assistant", "content": long}]
    n0 = settled_count(server["audit"])
    parts = list(backend.stream(history, "and now?", "tiny", "", 0.0, 16))
    assert parts and not parts[-1].startswith("**"), parts[-1]
    entries = audit_after(server["audit"], n0, until=answered)[n0:]
    assert [e["status"] for e in entries][-1] == 200
    assert any(e["status"] == 400 for e in entries), "the history was meant to overflow the context at first"

    n0 = settled_count(server["audit"])
    parts = list(backend.stream([], f"one message: {' '.join(['word'] * 95)}", "tiny", "", 0.0, 400))
    assert parts and not parts[-1].startswith("**"), parts[-1]
    entries = audit_after(server["audit"], n0, until=answered)[n0:]
    assert [e["status"] for e in entries] == [400, 200], entries
    assert entries[-1]["prompt_tokens"] + entries[-1]["completion_tokens"] <= 512, entries[-1]

    # a 400 that is not about the context is shown, not retried
    n0 = settled_count(server["audit"])
    parts = list(backend.stream([], "hi", "tiny", "", 5.0, 8))  # temperature above the API's 2.0
    assert len(parts) == 1 and "400" in parts[0]
    assert len(server["audit"].read_text().splitlines()) - n0 <= 1


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="needs Debian's chromium (`make test` installs it)")


@needs_chromium
def test_chat_in_a_real_browser(server, tmp_path, request):
    from playwright.sync_api import expect, sync_playwright

    from llmstack.demo.app import build_app

    shots = Path(os.environ.get("LLMSTACK_TEST_OUTPUT", tmp_path)) / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    demo = build_app(server["base"], KEY, max_tokens=24)  # short answers keep the history inside the 512 context
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            n0 = settled_count(server["audit"])
            box = page.locator("#chat-input textarea")
            expect(box).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Settings ▼").click()
            expect(page.locator("#max-tokens input[type='number']")).to_have_value("24", timeout=10_000)

            # 1. a message gets a streamed answer from the first model
            box.fill("Hello, who are you?")
            box.press("Enter")
            bot = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']")
            expect(bot.first).to_be_visible(timeout=60_000)
            page.wait_for_function("""() => {
                const m = document.querySelectorAll("#chatbot [data-testid='bot']");
                return m.length > 0 && m[m.length - 1].innerText.trim().length > 0; }""", timeout=60_000)
            page.screenshot(path=str(shots / "1-answer.png"))
            entries = audit_after(server["audit"], n0)
            assert entries[-1]["model"] == "tiny" and entries[-1]["status"] == 200
            assert entries[-1]["completion_tokens"] <= 24, "the Max tokens setting did not reach the request"

            # 2. switch to the adapter model: the next request goes to it
            page.locator("#model-picker input").click()
            page.get_by_role("option", name="tiny-lora").click()
            box.fill("And now?")
            box.press("Enter")
            entries = audit_after(server["audit"], len(entries))
            assert entries[-1]["model"] == "tiny-lora" and entries[-1]["status"] == 200, entries[-1]

            # 3. a guard refusal is rendered as a message, not an error toast
            page.wait_for_timeout(1000)
            box.fill(f"please say {BLOCKED}")
            box.press("Enter")
            refusal = page.get_by_text("Blocked by the guard")
            expect(refusal.first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(shots / "2-refusal.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert (shots / "2-refusal.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------ the demo's tools
HOSTILE = ["9**9**9", "10**10**10**10", "2**100000", "(10**4000)*(10**4000)", "10.0**400", "1e999", "(-8)**0.5",
           "__import__('os').system('id')", "().__class__.__mro__", "open('/etc/passwd')", "'a'*10**9", "[1]*10**9",
           "x", "lambda: 1", "1 if 1 else 2", "True + 1", "1j * 2", "1 << 1000000", "1/0", "5 % 0", "-" * 99 + "1",
           "(" * 120 + "1" + ")" * 120, "1+" * 150 + "1", "1" * 201, "", "   ", "1 +", "{}"]


@pytest.mark.parametrize("expression", HOSTILE)
def test_the_calculator_refuses_hostile_expressions_quickly(expression):
    from llmstack.demo.tools import ToolError, calculate

    t0 = time.perf_counter()
    with pytest.raises(ToolError):
        calculate(expression)
    assert time.perf_counter() - t0 < 0.2, f"{expression[:30]!r} took {time.perf_counter() - t0:.2f} s"


def test_the_calculator_does_arithmetic_and_the_tools_never_raise():
    from llmstack.demo.tools import calculate, run_tool

    assert [calculate(e) for e in ("17 * 23", "(2 + 3) ** 2 / 7", "7 // 2", "-7 % 3", "2 ** -2", "0.1 + 0.2",
                                  "2 ** 64", "-(3)", "(-1) ** (10 ** 100)", "(" * 90 + "4" + ")" * 90)] == [
        "391", "3.57142857143", "3", "2", "0.25", "0.3", "18446744073709551616", "-3", "1", "4"]
    assert run_tool("calculator", '{"expression": " 17 * 23 "}') == (True, "17 * 23 = 391")
    ok, now = run_tool("clock", "{}")
    assert ok and now.endswith(")") and "UTC" in now
    ok, paris = run_tool("clock", '{"timezone": "Europe/Paris"}')
    assert ok and ("CET" in paris or "CEST" in paris)
    for name, args in (("calculator", "{not json"), ("calculator", "[1, 2]"), ("calculator", '{"expr": "1"}'),
                       ("calculator", '{"expression": 5}'), ("calculator", '{"expression": "9**9**9"}'),
                       ("clock", '{"timezone": "../../etc/passwd"}'), ("clock", '{"timezone": "Mars/Olympus"}'),
                       ("clock", '{"timezone": []}'), ("rm_rf", "{}"), ("calculator", "[" * 100_000)):
        ok, result = run_tool(name, args)
        assert not ok and result.startswith("error: "), (name, args, result)


# --------------------------------------------------------------------- the tool loop, against a scripted server
CALC_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>'


class ScriptEngine(ScriptedEngine):
    """Says the next of `texts` on each request (then "done."), keeping every prompt as ScriptedEngine does."""

    def __init__(self, tokenizer, texts: list[str]):
        super().__init__(tokenizer, texts[0], chunk=5, max_model_len=4096)
        self.texts = list(texts)

    async def generate(self, request_id, prompt_ids, params, model_name):
        self.text = self.texts.pop(0) if self.texts else "done."
        async for deltas in super().generate(request_id, prompt_ids, params, model_name):
            yield deltas


def scripted_backend(tokenizer, texts: list[str], tmp_path: Path):
    from llmstack.demo.app import ChatBackend

    engine = ScriptEngine(tokenizer, texts)
    keys = KeyFile.model_validate({"keys": [{"id": "demo", "sha256": hash_key(KEY), "models": ["*"]}]})
    policy = GuardPolicy.model_validate({"input": {"blocklist": [BLOCKED]}})
    client = TestClient(build_server(engine, ServeSpec(engine="hf"), policy, keys,
                                     audit_path=str(tmp_path / "audit.jsonl")))
    backend = ChatBackend("http://testserver/v1", KEY)
    backend.client = openai.OpenAI(api_key=KEY, base_url="http://testserver/v1", http_client=client, max_retries=0)
    return engine, client, backend


def test_the_tool_loop_runs_the_call_shows_it_and_sends_the_result_back(tokenizer, tmp_path):
    engine, client, backend = scripted_backend(tokenizer, ["Let me compute.\n" + CALC_CALL, "17 * 23 is 391."],
                                               tmp_path)
    with client:
        steps = list(backend.turn([], "What is 17 * 23?", "tiny", "", 0.0, 64, tools=True, tool_choice="auto"))
        client.app.state.ref["server"].audit.flush()
    final = steps[-1]
    assert [(m.metadata.get("title"), m.content) for m in final] == [
        (None, "Let me compute."),
        ("🔧 calculator", '`calculator({"expression": "17 * 23"})`\n\n→ **17 * 23 = 391**'),
        (None, "17 * 23 is 391.")]
    assert any(m.metadata.get("status") == "pending" for s in steps for m in s)  # shown while it ran
    assert len(engine.prompts) == 2
    second = tokenizer.decode(engine.prompts[1])
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 * 23"}}\n</tool_call>' in second
    assert "<tool_response>\n17 * 23 = 391\n</tool_response>" in second and "Let me compute." in second
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["status"], a.get("tool_calls"), a.get("tool_choice")) for a in audit] == [
        (200, ["calculator"], "auto"), (200, None, "auto")]


def test_bad_arguments_go_back_as_an_error_and_the_rounds_are_capped(tokenizer, tmp_path):
    from llmstack.demo.app import MAX_TOOL_ROUNDS

    bad = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "9**9**9"}}\n</tool_call>'
    forced = '{"name": "calculator", "arguments": {"expression": "9**9**9"}}'  # required: the call's JSON alone
    engine, client, backend = scripted_backend(tokenizer, [forced] + [bad] * 10, tmp_path)
    with client:
        t0 = time.perf_counter()
        final = list(backend.turn([], "What is 9**9**9?", "tiny", "", 0.0, 64, tools=True, tool_choice="required"))[-1]
        assert time.perf_counter() - t0 < 30
        client.app.state.ref["server"].audit.flush()
    tool_msgs = [m for m in final if m.metadata.get("title")]
    assert len(tool_msgs) == MAX_TOOL_ROUNDS
    assert all(m.metadata["title"] == "🔧 calculator (error)" and "error: the exponent is too large" in m.content
               for m in tool_msgs)
    assert "<tool_response>\nerror: the exponent is too large\n</tool_response>" in tokenizer.decode(engine.prompts[1])
    # the first request forced a call, the follow-ups let the model answer, the last one asked for text only
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a.get("tool_choice") for a in audit] == ["required"] + ["auto"] * (MAX_TOOL_ROUNDS - 1) + [None]
    assert final[-1].content == bad  # tool_choice none: the server returns the model's text as text


def test_history_with_tool_messages_and_refusals_still_work(tokenizer, tmp_path):
    engine, client, backend = scripted_backend(tokenizer, ["It is noon."], tmp_path)
    history = [{"role": "user", "content": "What is 17 * 23?"},
               {"role": "assistant", "content": "Let me compute.", "metadata": None},
               {"role": "assistant", "content": "`calculator(...)` → 391", "metadata": {"title": "🔧 calculator"}},
               {"role": "assistant", "content": [{"type": "text", "text": "It is 391."}], "metadata": {}}]
    with client:
        final = list(backend.turn(history, "And the time?", "tiny", "", 0.0, 32, tools=True))[-1]
        assert [m.content for m in final] == ["It is noon."]
        prompt = tokenizer.decode(engine.prompts[0])
        assert "Let me compute.\n\nIt is 391." in prompt and "→ 391" not in prompt
        blocked = list(backend.turn([], f"say {BLOCKED}", "tiny", "", 0.0, 8, tools=True))
        assert len(blocked) == 1 and blocked[0][0].content.startswith("**Blocked by the guard:**")


@needs_chromium
def test_a_tool_call_in_a_real_browser(tool_server, tmp_path):
    """Tools on, tool choice `required` in Settings: the random model's call is forced (decoded under the tool's
    schema), the demo runs it and shows the call and its result, and the follow-up request carries the result as a
    `tool` message (the server's audit line holds the prompt it rendered)."""
    from playwright.sync_api import expect, sync_playwright

    from llmstack.demo.app import build_app

    shots = Path(os.environ.get("LLMSTACK_TEST_OUTPUT", tmp_path)) / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    audit = tool_server["audit"]
    port = free_port()
    demo = build_app(tool_server["base"], KEY, max_tokens=120)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.locator("#chat-input textarea")
            expect(box).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Settings ▼").click()
            page.locator("#tools input[type='checkbox']").check()
            page.locator("#tool-choice").get_by_text("required", exact=True).click()
            n0 = settled_count(audit)
            box.fill("What is 17 * 23?")
            box.press("Enter")
            title = page.locator("#chatbot").get_by_text("🔧", exact=False)
            expect(title.first).to_be_visible(timeout=90_000)
            # the answer after the tool result: the last bot message is not the tool message any more
            entries = audit_after(audit, n0, until=lambda new: len([e for e in new if e["status"] == 200]) >= 2,
                                  timeout=120)[n0:]
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "3-tool-call.png"), full_page=True)
            chat_text = page.locator("#chatbot").inner_text()
            browser.close()
    finally:
        demo.close()
    first, follow = [e for e in entries if e["status"] == 200][:2]
    assert first["tool_choice"] == "required" and first["tools_offered"] == 2, first
    (name,) = first["tool_calls"]
    assert name in ("calculator", "clock")
    assert f"🔧 {name}" in chat_text and "→" in chat_text, chat_text
    # the follow-up let the model answer (auto) and carried the call and its result, as the demo showed it
    assert follow["tool_choice"] == "auto"
    response = follow["prompt"].split("<tool_response>\n")[1].split("\n</tool_response>")[0]
    assert response and response in chat_text, (response, chat_text)
    assert f'"name": "{name}"' in follow["prompt"].split("<tool_call>")[-1]


def test_a_reasoning_models_thinking_shows_collapsed_above_the_answer_and_never_goes_back(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from llmstack.demo.app import THINKING_TITLE
    from llmstack.train import thinking

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.chat_template = thinking.chat_template(tok)
    engine, client, backend = scripted_backend(tok, ["SECRET_PLAN add two and two.\n</think>\n\nIt is 4.",
                                                     "It is 6."], tmp_path)
    with client:
        steps = list(backend.turn([], "What is 2+2?", "tiny", "", 0.0, 64))
        final = steps[-1]
        assert [(m.metadata.get("title"), m.metadata.get("status"), m.content) for m in final] == [
            (THINKING_TITLE, "done", "SECRET_PLAN add two and two."), (None, None, "It is 4.")]
        assert any(s[-1].metadata.get("status") == "pending" for s in steps)  # open while the model thinks
        history = [{"role": "user", "content": "What is 2+2?"},
                   *({"role": "assistant", "content": m.content, "metadata": m.metadata} for m in final)]
        list(backend.turn(history, "And 3+3?", "tiny", "", 0.0, 64))
    prompt = tok.decode(engine.prompts[1])
    assert "SECRET_PLAN" not in prompt and "<|im_start|>assistant\nIt is 4.<|im_end|>" in prompt
