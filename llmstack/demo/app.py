"""`llmstack chat`: a Gradio chat app that talks to an llmstack server through the official `openai` client.

It never touches a model itself: everything goes through the guarded API, so what a person sees in the demo is what an
API client gets — streaming, the models the key may use (from /v1/models), and the guard's refusals, shown as a
message in the chat rather than an exception.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

import gradio as gr
import openai

GUARD_MESSAGES = {
    401: "The server refused the API key (401). Set the key in the environment variable the app was started with.",
    403: "This API key may not use that model (403).",
    413: "The request is too large for the server's limits (413).",
    429: "Rate limit reached (429): wait a moment and try again.",
    503: "The server is busy or its engine is restarting (503): try again shortly.",
}
# the server's context_length_exceeded message: "this model's context is C tokens; the prompt has P and max_tokens ..."
CONTEXT_NUMBERS = re.compile(r"context is (\d+) tokens; the prompt has (\d+)")
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
        """Yield the growing answer as chunks arrive; a refusal or a mid-stream error ends it with a message.

        A conversation that outgrows the model's context is not an error to the person chatting: the oldest turns are
        left out (the server says `context_length_exceeded`), and when the new message alone leaves less room than
        Max tokens asks for, the answer gets the room there is.
        """
        turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        max_tokens = int(max_tokens)
        while True:
            messages = ([{"role": "system", "content": system}] if system.strip() else [])
            messages += turns + [{"role": "user", "content": message}]
            try:
                yield from self._answer(messages, model, temperature, max_tokens)
                return
            except openai.BadRequestError as exc:
                fit = self._fit(exc, turns, max_tokens)
                if fit is None:
                    yield refusal_text(exc)
                    return
                turns, max_tokens = fit

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

    def _answer(self, messages: list[dict], model: str, temperature: float, max_tokens: int) -> Iterator[str]:
        answer = ""
        try:
            stream = self.client.chat.completions.create(model=model, messages=messages, stream=True,
                                                         temperature=temperature, max_tokens=max_tokens)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    yield answer
        except openai.BadRequestError as exc:
            if answer:  # not raised mid-stream by this server, but never retry over an answer already shown
                yield answer + "\n\n" + refusal_text(exc)
                return
            raise  # before any output: stream() decides whether a smaller request fits
        except openai.APIStatusError as exc:
            yield (answer + "\n\n" if answer else "") + refusal_text(exc)
            return
        except openai.APIConnectionError as exc:
            yield (answer + "\n\n" if answer else "") + f"Lost the connection to the server: {exc}"
            return
        except openai.APIError as exc:  # an error event inside the stream, e.g. the output rail blocked it
            yield (answer + "\n\n" if answer else "") + f"The server ended the answer: {exc.message}"
            return
        if not answer:
            yield "(the model returned an empty answer)"


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def build_app(api_base: str, api_key: str | None, title: str = "llmstack chat", max_tokens: int = 256) -> gr.Blocks:
    backend = ChatBackend(api_base, api_key)
    models, error = backend.models()

    def respond(message, history, model, system, temperature, max_tokens):
        if not model:
            yield error or "No model is available to this API key."
            return
        yield from backend.stream(history, message, model, system, temperature, max_tokens)

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
        gr.ChatInterface(respond, additional_inputs=[model, system, temperature, length],
                         chatbot=gr.Chatbot(elem_id="chatbot", height=420), api_name="respond",
                         textbox=gr.Textbox(placeholder="Type a message…", elem_id="chat-input", scale=7),
                         fill_height=False)
        refresh.click(refresh_models, outputs=[model, status])
    return demo


def launch(api_base: str, api_key_env: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_tokens: int = 256) -> None:
    key = os.environ.get(api_key_env)
    app = build_app(api_base, key, max_tokens=max_tokens)
    app.queue().launch(server_name=host, server_port=port, share=share, show_error=True)
