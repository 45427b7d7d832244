"""The README's chat-demo screenshot (llmstack/demo/screenshot.png), made the way a person would see it: the
quickstart's model (SmolLM2-135M-Instruct, fetched offline from its PyPI wheel) served by `llmstack serve`, the Gradio
demo in front of it, and Debian's chromium driven by Playwright. The conversation: "Who are you?" (the model's identity
answer, Tools off), then "What is 17 * 23? Use the calculator." with Tools on and tool choice `required`, so the
model's calculator call (decoded under the tool's JSON Schema), the result the demo computed, and the model's answer
after it are shown.
Temperature 0, so a rerun gives the same words. The System prompt field says who the model is: with only its
template's default system line, SmolLM2-135M answers "Who are you?" with an offer to help with creative writing.
Greedy decoding makes a 135M model repeat itself after a few sentences, so Max tokens is 58: where its identity
answer's third sentence ends (the tool turn needs about 30).

    PYTHONPATH=$PWD .venv/bin/python scripts/demo_screenshot.py          # ~1-2 min on 2 CPU cores
    PYTHONPATH=$PWD .venv/bin/python scripts/demo_screenshot.py --engine vllm --out /tmp/shot.png

Needs chromium and fonts that cover every glyph the page uses (emoji such as 🔧 included): `make system-deps`
installs them (the Makefile's SYSTEM_DEPS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

KEY = "sk-llmstack-screenshot"
MODEL_NAME = "smollm2-135m-instruct"
SYSTEM = "You are SmolLM, a small language model by Hugging Face. Answer briefly."
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--font-render-hinting=none"]


def port_or_free(preferred: int) -> int:
    """The preferred port when it is free (the screenshot then shows the default URL), else any free one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_turn(path: Path, n0: int, timeout: float = 600, quiet: float = 3.0) -> list[dict]:
    """The audit entries of one chat turn: once one of them answered without a tool call and none came for `quiet`
    seconds (a tool round is one more request)."""
    deadline, last, since = time.time() + timeout, -1, time.time()
    while time.time() < deadline:
        new = audit_lines(path)[n0:]
        if len(new) != last:
            last, since = len(new), time.time()
        elif new and not new[-1].get("tool_calls") and time.time() - since >= quiet:
            return new
        time.sleep(0.3)
    raise TimeoutError("the chat turn did not finish")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL_NAME, help="a packaged model name or a model folder")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--out", default="llmstack/demo/screenshot.png")
    ap.add_argument("--system", default=SYSTEM, help="the System prompt typed into Settings ('' for none)")
    ap.add_argument("--question", default="What is 17 * 23? Use the calculator.", help="the tool turn's message")
    ap.add_argument("--max-tokens", type=int, default=58, help="the Max tokens setting")
    ap.add_argument("--port", type=int, default=8000, help="the server's port, when free (the URL the page shows)")
    args = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from llmstack.demo.app import build_app
    from llmstack.models import PACKAGED, fetch
    from llmstack.serve.guard import hash_key
    from llmstack.testing import wait_http

    model = fetch(args.model) if args.model in PACKAGED else Path(args.model)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    work = Path(tempfile.mkdtemp(prefix="llmstack-screenshot-"))
    port = port_or_free(args.port)
    keys = {"keys": [{"id": "demo", "sha256": hash_key(KEY), "models": ["*"]}]}
    (work / "keys.yaml").write_text(yaml.safe_dump(keys))
    (work / "server.yaml").write_text(yaml.safe_dump({
        "engine": args.engine, "model": str(model), "served_model_name": MODEL_NAME, "port": port,
        "max_model_len": 4096, "keys": "keys.yaml", "audit_log": "audit.jsonl"}))
    audit = work / "audit.jsonl"
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(work / "server.yaml")],
                                  stdout=log, stderr=subprocess.STDOUT)
        demo = None
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout=300, proc=server)
            demo = build_app(f"http://127.0.0.1:{port}/v1", KEY, max_tokens=args.max_tokens)
            demo_port = port_or_free(7860)
            demo.queue().launch(server_name="127.0.0.1", server_port=demo_port, prevent_thread_lock=True, quiet=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
                page.goto(f"http://127.0.0.1:{demo_port}/")
                box = page.locator("#chat-input textarea")
                expect(box).to_be_visible(timeout=60_000)
                page.get_by_role("button", name="Settings ▼").click()
                if args.system:
                    page.locator("#system-prompt textarea").fill(args.system)
                temperature = page.locator("#temperature input[type='number']")
                temperature.fill("0")
                temperature.press("Enter")

                n0 = len(audit_lines(audit))
                box.fill("Who are you?")
                box.press("Enter")
                first = wait_turn(audit, n0)
                print("turn 1:", [(e["status"], e.get("tool_calls")) for e in first])

                page.locator("#tools input[type='checkbox']").check()
                page.locator("#tool-choice").get_by_text("required", exact=True).click()
                n0 = len(audit_lines(audit))
                box.fill(args.question)
                box.press("Enter")
                second = wait_turn(audit, n0)
                print("turn 2:", [(e["status"], e.get("tool_choice"), e.get("tool_calls")) for e in second])
                if not second[0].get("tool_calls"):
                    raise SystemExit("the model made no tool call: the screenshot would not show one")
                expect(page.locator("#chatbot").get_by_text("🔧", exact=False).first).to_be_visible()
                # the whole conversation in one picture: let the chat grow instead of scrolling inside its box
                page.add_style_tag(content="#chatbot { height: auto !important; max-height: none !important; }"
                                           "#chatbot .bubble-wrap { height: auto !important;"
                                           " max-height: none !important; overflow: visible !important; }")
                page.mouse.move(0, 0)  # no hover highlight on the last control clicked
                page.wait_for_timeout(1500)
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
                print(page.locator("#chatbot").inner_text())
                browser.close()
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
        finally:
            if demo is not None:
                demo.close()
            server.terminate()
            server.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
