"""`llmstack chat`: a Gradio chat app that talks to an llmstack server through the official `openai` client.

It never touches a model itself: everything goes through the guarded API, so what a person sees in the demo is what an
API client gets — streaming, the models the key may use (from /v1/models), and the guard's refusals, shown as a
message in the chat rather than an exception. With Tools on, the model may call the demo's calculator and clock
(llmstack.demo.tools): the demo runs them — never the server — and shows each call and its result in the chat. A
reasoning model's thinking (the stream's `reasoning_content`, where the server's policy sends it) is shown above its
answer as a Gradio thought — collapsed once the answer begins — and never sent back in the history.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Generator, Iterator

import gradio as gr
import openai

from llmstack.demo.tools import TOOL_SPECS, run_tool

GUARD_MESSAGES = {
    401: "The server refused the API key (401). Set the key in the environment variable the app was started with.",
    403: "This API key may not use that model (403).",
    413: "The request is too large for the server's limits (413).",
    429: "Rate limit reached (429): wait a moment and try again.",
    503: "The server is busy or its engine is restarting (503): try again shortly.",
}
# the server's context_length_exceeded message: "this model's context is C tokens; the prompt has P and max_tokens ..."
CONTEXT_NUMBERS = re.compile(r"context is (\d+) tokens; the prompt has (\d+)")
MAX_TOOL_ROUNDS = 3  # tool rounds in one turn; after them the model is asked for text (tool_choice none)
THINKING_TITLE = "💭 Thinking"
log = logging.getLogger("llmstack.demo")


def refusal_text(exc: openai.APIError) -> str:
    """A guard refusal as a chat message: the server's own words (OpenAI error body) behind a plain explanation."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    detail = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message")
    detail = detail or str(exc)
    if status == 400 and "block" in detail.lower():
        return f"**Blocked by the guard:** {detail}"
    head = GUARD_MESSAGES.get(status, f"The server answered {status}." if status else "Request failed.")
    return f"**{head}**\n\n> {detail}"


class ChatBackend:
    """The app's only link to the model: an `openai.OpenAI` client pointed at an llmstack server."""

    def __init__(self, api_base: str, api_key: str | None):
        self.client = openai.OpenAI(base_url=api_base, api_key=api_key or "missing-key", max_retries=0, timeout=120)

    def models(self) -> tuple[list[str], str | None]:
        """The models this key may use, and an error text if the server refused to list them."""
        try:
            return [m.id for m in self.client.models.list().data], None
        except openai.APIStatusError as exc:
            return [], refusal_text(exc)
        except openai.APIConnectionError as exc:
            return [], f"Cannot reach the server at {self.client.base_url}: {exc}"

    def stream(self, history: list[dict], message: str, model: str, system: str, temperature: float,
               max_tokens: int) -> Iterator[str]:
        """The answer's text as it grows (a text-only turn: no tools offered), for callers that want plain text."""
        for shown in self.turn(history, message, model, system, temperature, max_tokens):
            if not shown[-1].metadata:  # a reasoning model's thinking is not the answer's text
                yield _text(shown[-1].content)

    def turn(self, history: list[dict], message: str, model: str, system: str, temperature: float, max_tokens: int,
             tools: bool = False, tool_choice: str = "auto") -> Iterator[list[gr.ChatMessage]]:
        """One turn of the chat: yields the messages to show for it (tool calls, their results, the answer) as they
        grow. A refusal or a mid-stream error ends it with a message.

        With `tools`, the demo's local tools (llmstack.demo.tools) are offered with `tool_choice`; each call the model
        makes is run here, shown, and sent back as a `tool` message, and the model's next answer is streamed (with
        `tool_choice: auto`, so it can answer in text; after MAX_TOOL_ROUNDS rounds, `none`, so it must).

        A conversation that outgrows the model's context is not an error to the person chatting: the oldest turns are
        left out (the server says `context_length_exceeded`), and when the new message alone leaves less room than
        Max tokens asks for, the answer gets the room there is.
        """
        turns = history_turns(history)
        max_tokens = int(max_tokens)
        shown: list[gr.ChatMessage] = []
        exchange: list[dict] = []  # this turn's assistant tool calls and tool results, sent back to the model
        rounds = 0
        while True:
            messages = ([{"role": "system", "content": system}] if system.strip() else [])
            messages += turns + [{"role": "user", "content": message}] + exchange
            offer = {}
            if tools:
                choice = tool_choice if rounds == 0 else ("auto" if rounds < MAX_TOOL_ROUNDS else "none")
                offer = {"tools": TOOL_SPECS, "tool_choice": choice, "parallel_tool_calls": False}
            try:
                calls = yield from self._answer(messages, model, temperature, max_tokens, offer, shown)
            except openai.BadRequestError as exc:
                fit = self._fit(exc, turns, max_tokens)
                if fit is None:
                    shown.append(gr.ChatMessage(refusal_text(exc)))
                    yield list(shown)
                    return
                turns, max_tokens = fit
                continue
            if not calls:
                return
            rounds += 1
            content = _text(shown[-1].content) if exchange_text(shown) else None
            exchange.append({"role": "assistant", "content": content, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls]})
            for c in calls:
                shown.append(gr.ChatMessage(f"`{c['name']}({c['arguments']})`", metadata={
                    "title": f"🔧 {c['name']}", "status": "pending"}))
                yield list(shown)
                t0 = time.perf_counter()
                ok, result = run_tool(c["name"], c["arguments"])
                log.info("tool %s ran in %.3f s (%s)", c["name"], time.perf_counter() - t0, "ok" if ok else "error")
                shown[-1] = gr.ChatMessage(f"`{c['name']}({c['arguments']})`\n\n→ **{result}**", metadata={
                    "title": f"🔧 {c['name']}" + ("" if ok else " (error)"), "duration": time.perf_counter() - t0})
                exchange.append({"role": "tool", "tool_call_id": c["id"], "content": result})
                yield list(shown)

    @staticmethod
    def _fit(exc: openai.BadRequestError, turns: list[dict], max_tokens: int) -> tuple[list[dict], int] | None:
        """The next, smaller request after a context overflow, or None when nothing can be left out."""
        if exc.code != "context_length_exceeded":
            return None
        if turns:  # leave out the oldest exchange (a user turn and the answer to it)
            drop = 2 if len(turns) > 1 and turns[1]["role"] == "assistant" else 1
            log.info("conversation outgrew the context: leaving out its %d oldest turn(s)", drop)
            return turns[drop:], max_tokens
        numbers = CONTEXT_NUMBERS.search(str(exc.message))
        room = int(numbers[1]) - int(numbers[2]) if numbers else 0
        if 0 < room < max_tokens:
            log.info("max_tokens %d lowered to the %d tokens the context leaves", max_tokens, room)
            return turns, room
        return None

    def _answer(self, messages: list[dict], model: str, temperature: float, max_tokens: int, offer: dict,
                shown: list[gr.ChatMessage]) -> Generator[list[gr.ChatMessage], None, list[dict]]:
        """Stream one request's answer into `shown` (its text as one growing message); return the tool calls it made
        (OpenAI's streamed `tool_calls` deltas put together by index). Raises BadRequestError only before any output:
        the caller decides whether a smaller request fits."""
        base = len(shown)
        answer = thinking = ""
        calls: dict[int, dict] = {}

        def show(text: str | None) -> list[gr.ChatMessage]:
            """The thinking so far as a thought (open while it grows, closed once there is more), then `text`."""
            del shown[base:]
            if thinking.strip():
                shown.append(gr.ChatMessage(thinking.strip(), metadata={
                    "title": THINKING_TITLE, "status": "pending" if text is None else "done"}))
            if text is not None:
                shown.append(gr.ChatMessage(text))
            return list(shown)

        try:
            stream = self.client.chat.completions.create(model=model, messages=messages, stream=True,
                                                         temperature=temperature, max_tokens=max_tokens, **offer)
            for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                thought = (delta.model_extra or {}).get("reasoning_content")  # not a typed field of the SDK
                if thought:
                    thinking += thought
                    yield show(None)
                for tc in delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                if delta.content:
                    answer += delta.content
                    yield show(answer)
        except openai.BadRequestError as exc:
            if answer or base:  # never retry over an answer or tool results already shown
                yield show((answer + "\n\n" if answer else "") + refusal_text(exc))
                return []
            raise
        except openai.APIStatusError as exc:
            yield show((answer + "\n\n" if answer else "") + refusal_text(exc))
            return []
        except openai.APIConnectionError as exc:
            yield show((answer + "\n\n" if answer else "") + f"Lost the connection to the server: {exc}")
            return []
        except openai.APIError as exc:  # an error event inside the stream, e.g. the output rail blocked it
            yield show((answer + "\n\n" if answer else "") + f"The server ended the answer: {exc.message}")
            return []
        calls_made = [dict(c, id=c["id"] or f"call_demo_{i}") for i, c in sorted(calls.items()) if c["name"]]
        if not answer.strip() and not calls_made:
            yield show("(the model returned an empty answer)")
        elif calls_made and not answer.strip():
            del shown[base:]  # a call with no text: nothing to show but the thinking (if any) and the call
            if thinking.strip():
                shown.append(gr.ChatMessage(thinking.strip(), metadata={"title": THINKING_TITLE, "status": "done"}))
        elif calls_made:
            yield show(answer.strip())  # the text before the call, without the line break that led to it
        return calls_made


def exchange_text(shown: list[gr.ChatMessage]) -> bool:
    """Whether the last message shown is answer text (not a tool message): it goes back as the call's content."""
    return bool(shown) and not shown[-1].metadata and bool(_text(shown[-1].content).strip())


def history_turns(history: list[dict]) -> list[dict]:
    """Gradio's history as API turns: the tool messages it shows are left out (their results already shaped the
    answers after them; the calls' ids are gone), and what is left of one side's turn is joined."""
    turns: list[dict] = []
    for m in history:
        meta = m.get("metadata") if isinstance(m, dict) else None
        if meta and meta.get("title"):
            continue
        text = _text(m["content"])
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": m["role"], "content": text})
    return turns


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def build_app(api_base: str, api_key: str | None, title: str = "llmstack chat", max_tokens: int = 256,
              tools: bool = False, tool_choice: str = "auto") -> gr.Blocks:
    backend = ChatBackend(api_base, api_key)
    models, error = backend.models()

    def respond(message, history, model, system, temperature, max_tokens, use_tools, choice):
        if not model:
            yield error or "No model is available to this API key."
            return
        yield from backend.turn(history, message, model, system, temperature, max_tokens, tools=use_tools,
                                tool_choice=choice)

    def refresh_models():
        names, err = backend.models()
        return gr.Dropdown(choices=names, value=names[0] if names else None), (err or "")

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nTalking to `{api_base}` through the guarded OpenAI-compatible API.")
        status = gr.Markdown(error or "", elem_id="server-status")
        with gr.Row():
            model = gr.Dropdown(choices=models, value=models[0] if models else None, label="Model",
                                elem_id="model-picker", interactive=True, scale=3)
            refresh = gr.Button("↻ models", scale=0, elem_id="refresh-models")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox("", label="System prompt", placeholder="(none: the model's default)",
                                elem_id="system-prompt")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
            length = gr.Slider(1, 1024, value=max_tokens, step=1, label="Max tokens", elem_id="max-tokens")
            with gr.Row():
                use_tools = gr.Checkbox(tools, label="Tools (calculator, clock: run by this demo)", elem_id="tools")
                choice = gr.Radio(["auto", "required", "none"], value=tool_choice, label="Tool choice",
                                  elem_id="tool-choice")
        gr.ChatInterface(respond, additional_inputs=[model, system, temperature, length, use_tools, choice],
                         chatbot=gr.Chatbot(elem_id="chatbot", height=420), api_name="respond",
                         textbox=gr.Textbox(placeholder="Type a message…", elem_id="chat-input", scale=7),
                         fill_height=False)
        refresh.click(refresh_models, outputs=[model, status])
    return demo


def launch(api_base: str, api_key_env: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_tokens: int = 256, tools: bool = False, tool_choice: str = "auto") -> None:
    key = os.environ.get(api_key_env)
    app = build_app(api_base, key, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice)
    app.queue().launch(server_name=host, server_port=port, share=share, show_error=True)
