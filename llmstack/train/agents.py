"""Tool calls in GRPO rollouts, guarded: the recipe's tools and environment handed to TRL's GRPOTrainer as one
`environment_factory`, whose tool methods enforce the stage's per-episode limits (config.agents.ToolLimits).

TRL runs the multi-turn loop itself (generate, parse the calls with the tokenizer's response template, call the tools,
render the results with the chat template, generate again, up to `max_tool_calling_iterations`), and turns an exception
from a tool into an `{"error": ...}` result. What it does not do is bound a tool: a call that sleeps forever hangs the
run, a 10 MB result blows the context and the memory, and a `print` lands in the run's log. So each tool is wrapped:

- it runs in a daemon thread joined with `tool_timeout_s` (a hung call is abandoned, never waited on at exit);
- stdout is captured while it runs; anything printed is a failure (`printed`), not noise in the log;
- its result must be JSON-able (`bad_output` otherwise) and at most `max_tool_output_chars` as text
  (`output_too_large`); an exception is `raised`; the call past `max_tool_calls` is `max_tool_calls`.

The first failure ends the episode: that call and every later one in it answer "episode ended: <reason>" without
running anything, the environment's `get_reward` (if it has one) scores the episode 0, and the reason is counted once in
`Failures` (the stage reports the counts). Standalone `tools:` are wrapped the same way, as methods of this class, so
they get per-episode state too. Per-rollout instances come from TRL's environment pool (one per rollout, reset before
each episode).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import threading
from collections import Counter
from typing import Any

from llmstack.config.agents import ToolLimits, environment_tools, import_object

REASONS = ("raised", "timeout", "printed", "bad_output", "output_too_large", "max_tool_calls")


class ToolFailure(RuntimeError):
    """A guarded tool call that ended its episode; TRL turns it into the tool's `{"error": ...}` result (and counts it
    in its `tools/failure_frequency` metric)."""


class Failures(Counter):
    """Episodes ended per reason, across the run (one counter per built environment class)."""

    def summary(self) -> dict[str, int]:
        return {r: self.get(r, 0) for r in REASONS}


def _run_bounded(fn, kwargs: dict, timeout_s: float) -> tuple[str | None, Any]:
    """(failure reason or None, result or error text), running `fn(**kwargs)` in a daemon thread: Python cannot kill
    a thread, so a call past its time is left running and the episode goes on without it."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - whatever the user's tool raises is this episode's failure
            box["error"] = f"{type(exc).__name__}: {exc}"

    printed = io.StringIO()
    thread = threading.Thread(target=target, daemon=True, name="llmstack-tool")
    # redirected around the join, not inside the thread: an abandoned thread must not keep stdout redirected
    with contextlib.redirect_stdout(printed):
        thread.start()
        thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", f"no result within {timeout_s:g} s"
    if "error" in box:
        return "raised", box["error"]
    if printed.getvalue():
        return "printed", f"the tool wrote {len(printed.getvalue())} characters to stdout"
    return None, box["result"]


def _as_text(result: Any, limit: int) -> tuple[str | None, str]:
    """The result as the text TRL renders into the tool message, or a failure reason."""
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result)
        except (TypeError, ValueError, RecursionError):
            return "bad_output", f"result of type {type(result).__name__} is not text or JSON"
    if len(text) > limit:
        return "output_too_large", f"result of {len(text)} characters is over the limit of {limit}"
    return None, text


def _guarded_method(name: str, fn, bound: bool):
    """A method named and described like `fn` (TRL builds the tool schema from its signature and docstring) that
    calls it through the episode's guard."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def method(self, **kwargs):
        target = getattr(self._inner, name) if bound else fn
        return self._call(name, target, kwargs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += list(sig.parameters.values())[1 if bound else 0:]
    method.__signature__ = sig.replace(parameters=params)
    del method.__wrapped__  # inspect.signature must read __signature__, not follow back to fn
    return method


def build_environment(tools: list[str], environment: str | None, limits: ToolLimits) -> type:
    """The class to pass as GRPOTrainer's `environment_factory`; its `failures` counts ended episodes."""
    inner_cls = import_object(environment, "Class") if environment else None
    failures = Failures()

    class GuardedEnvironment:
        def __init__(self):
            self._inner = inner_cls() if inner_cls else None
            self._calls = 0
            self.failure: str | None = None

        def reset(self, **row):
            self._calls, self.failure = 0, None
            return self._inner.reset(**row) if self._inner else None

        def _call(self, name: str, fn, kwargs: dict) -> str:
            if self.failure:
                raise ToolFailure(f"episode ended: {self.failure}")
            self._calls += 1
            if self._calls > limits.max_tool_calls:
                return self._fail("max_tool_calls", f"more than {limits.max_tool_calls} tool calls")
            reason, result = _run_bounded(fn, kwargs, limits.tool_timeout_s)
            if reason is None:
                reason, result = _as_text(result, limits.max_tool_output_chars)
            return self._fail(reason, result) if reason else result

        def _fail(self, reason: str, detail: str):
            self.failure = reason
            failures[reason] += 1
            raise ToolFailure(f"episode ended: {reason} ({detail})")

    GuardedEnvironment.failures = failures
    for spec in tools:
        fn = import_object(spec, "function")
        setattr(GuardedEnvironment, fn.__name__, _guarded_method(fn.__name__, fn, bound=False))
    if inner_cls is not None:
        for name in environment_tools(inner_cls):
            setattr(GuardedEnvironment, name, _guarded_method(name, getattr(inner_cls, name), bound=True))
        if callable(getattr(inner_cls, "get_reward", None)):
            def get_reward(self) -> float:
                return 0.0 if self.failure else float(self._inner.get_reward())

            GuardedEnvironment.get_reward = get_reward
        GuardedEnvironment.__name__ = GuardedEnvironment.__qualname__ = inner_cls.__name__  # TRL's reward column
    return GuardedEnvironment
