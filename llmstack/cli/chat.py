"""`llmstack chat`: the Gradio chat demo on a running llmstack server."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llmstack.cli.common import console


def chat(api_base: Annotated[str, typer.Option(help="the llmstack server's /v1 URL")] = "http://127.0.0.1:8000/v1",
         api_key_env: Annotated[str, typer.Option(help="environment variable with the API key")] = "LLMSTACK_API_KEY",
         host: Annotated[str, typer.Option(help="where the demo listens")] = "127.0.0.1",
         port: Annotated[int, typer.Option(help="demo port")] = 7860,
         max_tokens: Annotated[int, typer.Option(min=1, help="the Max tokens control's starting value")] = 256,
         tools: Annotated[bool, typer.Option(help="start with the Tools toggle on (calculator, clock)")] = False,
         tool_choice: Annotated[str, typer.Option(help="the Tool choice control's starting value: auto, required "
                                                  "or none")] = "auto"):
    """Open the Gradio chat demo on an llmstack server (through the openai client: streaming, model picker, guard,
    tool calls run by the demo)."""
    if tool_choice not in ("auto", "required", "none"):
        raise typer.BadParameter("auto, required or none", param_hint="--tool-choice")
    if not os.environ.get(api_key_env):
        console.print(f"[yellow]warning:[/] ${api_key_env} is not set: the server will answer 401 until it is")
    from llmstack.demo.app import launch

    launch(api_base, api_key_env, host=host, port=port, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice)
