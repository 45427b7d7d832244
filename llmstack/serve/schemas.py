"""Client JSON Schemas (a `response_format` json_schema, each tool's parameters, the forced-call schema built from the
tools) checked in the API process before any engine compiles them, so a schema the engine cannot take is the
client's 400 with the reason, never a 500 `engine_error` or an engine stuck compiling:

- a recursive `$ref` (a schema that refers to itself, directly or through a cycle): 400 `recursive_json_schema`;
- too many `$ref`s to check cheaply: 400;
- what xgrammar (the structured-output backend of both engines) refuses when it turns the schema into a grammar —
  an integer bound past int64 (`minimum: -1e30`), a pointer to nothing, an empty `enum`, `minLength` above
  `maxLength` and the other cheaply detected unsatisfiable ranges: 400 `invalid_json_schema` with xgrammar's reason;
- a grammar larger than `MAX_GRAMMAR_CHARS` (what the engine would then compile against the whole vocabulary): 400;
- string length bounds whose compile would take long: each distinct (`minLength`, `maxLength`) pair is its own
  bounded repetition that xgrammar expands and masks over the vocabulary, at a cost that grows with the bound
  (60 distinct pairs near 500 took 15 s and 48 MB on a 548-token vocabulary, 46-93 s on SmolLM2's): their bounds,
  summed over distinct pairs, are capped at `MAX_LENGTH_BOUNDS`.

The conversion runs without a tokenizer (milliseconds); the token-level compile stays with the engine."""

from __future__ import annotations

import json
import re
from typing import Any

from llmstack.serve.protocol import APIError

MAX_REFS = 512  # `$ref`s one schema may hold (the recursion check is quadratic in them)
MAX_GRAMMAR_CHARS = 1_000_000  # EBNF text of the converted grammar
MAX_LENGTH_BOUNDS = 8192  # string length bounds summed over distinct (minLength, maxLength) pairs
_DATA_KEYS = ("enum", "const", "default", "examples")  # values, not schemas
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed:\s*)?")


def check_schema(schema: Any, what: str, param: str) -> None:
    """Raise the client's 400 unless `schema` is one the engines can compile (see the module's docstring)."""
    refs = _refs(schema)
    if len(refs) > MAX_REFS:
        raise APIError(400, f"{what} holds {len(refs)} `$ref`s; the limit is {MAX_REFS}", param=param,
                       code="invalid_json_schema")
    bounds = _length_bounds(schema)
    if bounds > MAX_LENGTH_BOUNDS:
        raise APIError(400, f"{what} sets string length bounds summing to {bounds} over distinct minLength/maxLength "
                       f"pairs; the limit is {MAX_LENGTH_BOUNDS} (each distinct pair is compiled on its own): use "
                       "fewer distinct or smaller bounds", param=param, code="invalid_json_schema")
    loop = _cycle(refs)
    if loop:
        raise APIError(400, f"{what} is recursive: `$ref` '{loop[:200]}' refers back to itself; constrained "
                       "decoding needs a schema without reference cycles", param=param, code="recursive_json_schema")
    try:
        import xgrammar as xgr
    except ImportError:  # pragma: no cover - both engines install it
        return
    try:
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as exc:  # noqa: BLE001 - xgrammar's refusal is the client's 400, with its reason
        reason = _XGR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise APIError(400, f"{what} cannot be compiled for constrained decoding: {reason[:300]}", param=param,
                       code="invalid_json_schema") from None
    size = len(str(grammar))
    if size > MAX_GRAMMAR_CHARS:
        raise APIError(400, f"{what} converts to a grammar of {size} characters; the limit is {MAX_GRAMMAR_CHARS}: "
                       "use fewer distinct bounds, enums or alternatives", param=param, code="invalid_json_schema")


def _refs(node: Any, loc: str = "#") -> list[tuple[str, str]]:
    """(location, target) of every local `$ref` in the schema, iteratively (the body's depth cap already holds)."""
    out, todo = [], [(node, loc)]
    while todo:
        node, loc = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                out.append((loc, ref.rstrip("/") or "#"))
            todo += [(v, f"{loc}/{_esc(k)}") for k, v in node.items() if k not in _DATA_KEYS]
        elif isinstance(node, list):
            todo += [(v, f"{loc}/{i}") for i, v in enumerate(node)]
    return out


def _length_bounds(node: Any) -> int:
    pairs, todo = set(), [node]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            lo, hi = node.get("minLength"), node.get("maxLength")
            if isinstance(lo, int | float) or isinstance(hi, int | float):
                pairs.add((lo if isinstance(lo, int | float) else 0, hi if isinstance(hi, int | float) else 0))
            todo += [v for k, v in node.items() if k not in _DATA_KEYS]
        elif isinstance(node, list):
            todo += node
    return int(sum(min(max(lo, hi), 1e9) for lo, hi in pairs))


def _esc(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _within(loc: str, target: str) -> bool:
    return loc == target or loc.startswith(target + "/") or target == "#"


def _cycle(refs: list[tuple[str, str]]) -> str | None:
    """A `$ref` on a cycle, or None. Ref r leads to ref r' when r' sits inside r's target; a cycle in that graph is
    a schema whose expansion never ends (a self-reference is the one-ref cycle)."""
    edges = [[j for j, (loc, _) in enumerate(refs) if _within(loc, target)] for _, target in refs]
    state = [0] * len(refs)  # 0 unseen, 1 on the path, 2 done
    for start in range(len(refs)):
        if state[start]:
            continue
        stack = [(start, iter(edges[start]))]
        state[start] = 1
        while stack:
            i, it = stack[-1]
            j = next(it, None)
            if j is None:
                state[i] = 2
                stack.pop()
            elif state[j] == 1:
                return refs[j][1]
            elif state[j] == 0:
                state[j] = 1
                stack.append((j, iter(edges[j])))
    return None
