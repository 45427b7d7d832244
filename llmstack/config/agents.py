"""Recipe schema for an agent (tool-using) grpo stage: the tools and environment named by import string, and the
per-episode limits llmstack enforces around every tool call (llmstack/train/agents.py).

    - type: grpo
      tools: [mypkg.tools:search]          # functions with type hints and a docstring (TRL renders their schema)
      environment: mypkg.envs:Calculator   # a class with `reset`; its public methods are tools too
      tool_limits: {max_tool_calls: 4, max_turns: 4, tool_timeout_s: 5, max_tool_output_chars: 2000}

The Python is imported when the recipe loads (like a `python` reward at run time), so a module that does not import,
a tool TRL cannot describe to the model, or an environment without `reset` is a recipe error naming its YAML path
rather than a crash minutes into training. Importing nothing of llmstack: this is the config layer.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

from pydantic import Field

from llmstack.config.base import Strict

ENV_HOOKS = ("reset", "get_reward")  # environment methods TRL calls itself; every other public method is a tool


class ToolLimits(Strict):
    """Per-episode limits on an agent's tool use; passing one ends the episode with a counted reason."""

    max_tool_calls: int = Field(8, ge=1, description="tool calls per episode; the next call ends the episode "
                                                     "(reason `max_tool_calls`)")
    max_turns: int = Field(4, ge=1, description="assistant turns that may call tools per episode (TRL's "
                                                "max_tool_calling_iterations); after them the completion ends")
    tool_timeout_s: float = Field(10.0, gt=0, description="seconds one tool call may run; a slower call ends the "
                                                          "episode (reason `timeout`) and its thread is abandoned")
    max_tool_output_chars: int = Field(4000, ge=1, description="characters of one tool result; a longer result ends "
                                                               "the episode (reason `output_too_large`)")


def import_object(spec: str, what: str) -> Any:
    """`package.module:name` -> the object, or a ValueError saying what is wrong and how to fix it."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"'{spec}' is not an import string 'package.module:{what}'")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import-time failure of the user's module is a recipe error
        raise ValueError(f"module '{module}' does not import ({type(exc).__name__}: {exc}); make it importable "
                         f"(on PYTHONPATH, or installed)") from None
    if not hasattr(mod, name):
        raise ValueError(f"module '{module}' has no '{name}'")
    return getattr(mod, name)


def check_tool(fn: Any, label: str) -> None:
    """A tool TRL can offer the model: callable, with type hints on every argument and a docstring that describes
    them (transformers' get_json_schema builds the schema the chat template renders, and refuses otherwise)."""
    from transformers.utils import get_json_schema

    if not callable(fn):
        raise ValueError(f"{label} is not callable")
    try:
        get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own parsing exceptions
        raise ValueError(f"{label} cannot be described to the model ({exc}); give it type hints on every argument "
                         f"and a Google-style docstring with an `Args:` entry for each") from None


def environment_tools(cls: Any) -> list[str]:
    """The tool method names of an environment class, as TRL lists them (public functions but reset/get_reward)."""
    return [n for n, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if n not in ENV_HOOKS and not n.startswith("_")]


def check_tools(specs: list[str]) -> list[str]:
    for i, spec in enumerate(specs):
        try:
            check_tool(import_object(spec, "function"), f"'{spec}'")
        except ValueError as exc:
            raise ValueError(f"tools[{i}]: {exc}") from None
    return specs


def check_environment(spec: str | None) -> str | None:
    if spec is None:
        return None
    cls = import_object(spec, "Class")
    if not inspect.isclass(cls):
        raise ValueError(f"'{spec}' is not a class (TRL makes one instance per rollout by calling it)")
    if not callable(getattr(cls, "reset", None)):
        raise ValueError(f"environment class '{spec}' has no `reset` method; TRL calls `reset(**row)` before each "
                         f"episode (return None, or text to append to the prompt)")
    names = environment_tools(cls)
    if not names:
        raise ValueError(f"environment class '{spec}' has no public methods for the model to call as tools")
    for name in names:
        # bound to a placeholder so the schema leaves out `self`, as it does for the instance's methods TRL reads
        check_tool(types.MethodType(getattr(cls, name), object()), f"method '{name}' of '{spec}'")
    return spec
