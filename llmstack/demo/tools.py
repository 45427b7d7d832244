"""The chat demo's local tools: a calculator and a clock, run by the demo process (never by the server).

The model only ever proposes a call; the demo decides what runs. Both tools are pure functions of their arguments with
bounded cost, so a hostile or random call (the model's arguments are untrusted text) gets an error result, not a hang
or a crash.

The calculator is hand-written on `ast` rather than a library: the maintained safe evaluators on PyPI (simpleeval,
asteval) are not in the project's lock, and arithmetic needs a dozen lines. It accepts numbers, + - * / // % **, unary
signs and parentheses — nothing else — and bounds the input length, the tree's size and depth, exponents and the size
of every intermediate integer, so `9**9**9` is refused at once instead of computing a number of 370 million digits.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 100
MAX_DEPTH = 40
MAX_INT_BITS = 4096  # about 1,200 decimal digits: far past any demo question, cheap to compute and to print
MAX_FLOAT_EXPONENT = 10_000

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ToolError(ValueError):
    """A call the tool refuses; its message is the result the model (and the person) sees."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression; the result as text. Raises ToolError for anything but plain arithmetic."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolError(f"not an arithmetic expression ({type(exc).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"expression has more than {MAX_NODES} parts")
    try:
        value = _eval(tree.body, 0)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    return _format(value)


def _eval(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise ToolError(f"expression is nested more than {MAX_DEPTH} deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        if isinstance(node.value, float) and not math.isfinite(node.value):  # 1e999
            raise ToolError("the number is too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex):  # (-8) ** 0.5
            raise ToolError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ToolError("the result is too large")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("the result is too large")
        return value
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed (found {type(node).__name__})")


def _check_power(base: float, exponent: float) -> None:
    """Refuse a power before computing it when its result could not be small: integer powers are exact and their
    cost grows with the result's size."""
    if abs(exponent) > MAX_FLOAT_EXPONENT:
        if abs(base) not in (0, 1):
            raise ToolError("the exponent is too large")
        return
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0
            and base.bit_length() * exponent > MAX_INT_BITS + 64):
        raise ToolError("the result is too large")


def _format(value: float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def clock(timezone_name: str = "UTC") -> str:
    """The current date and time in an IANA timezone (UTC by default)."""
    if not isinstance(timezone_name, str):
        raise ToolError("timezone must be a string")
    name = timezone_name.strip() or "UTC"
    if len(name) > 64:
        raise ToolError("timezone name is too long")
    try:
        tz = UTC if name.upper() == "UTC" else ZoneInfo(name)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for malformed keys such as '../x'
        raise ToolError(f"unknown timezone {name!r}; use an IANA name such as Europe/Paris") from None
    return datetime.now(tz).strftime("%Y-%m-%d %H:%M:%S %Z (%A)")


# The functions as the API sees them (OpenAI's `tools` shape). The schemas are what forced calls are decoded under.
TOOL_SPECS = [
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly, e.g. 17 * 23 or (2 + 3) ** 2 / 7.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "description": "numbers with + - * / // % ** and parentheses",
            "pattern": r"^[-(0-9][0-9+\-*/%(). ]{0,79}$"}},
            "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "clock",
        "description": "The current date and time, in UTC or in an IANA timezone such as Europe/Paris.",
        "parameters": {"type": "object", "properties": {"timezone": {
            "type": "string", "description": "IANA timezone name; UTC when left out",
            "pattern": r"^[A-Za-z_/+-]{1,40}$"}},
            "additionalProperties": False}}},
]


def _calculator(expression: str) -> str:
    """The result with the expression it answers ("17 * 23 = 391"): a small model that restates the tool's result
    then still says what was computed."""
    value = calculate(expression)
    return f"{expression.strip()} = {value}"


_FUNCTIONS = {"calculator": _calculator,
              "clock": lambda timezone="UTC": clock(timezone)}


def run_tool(name: str, arguments: str) -> tuple[bool, str]:
    """Run one call as the model sent it: (True, result) or (False, error text). Never raises."""
    if name not in _FUNCTIONS:
        return False, f"error: there is no tool named {name!r}"
    try:
        args = json.loads(arguments or "{}")
    except (json.JSONDecodeError, RecursionError):
        return False, "error: the arguments are not valid JSON"
    if not isinstance(args, dict):
        return False, "error: the arguments must be a JSON object"
    try:
        return True, _FUNCTIONS[name](**args)
    except TypeError:  # a missing or unknown argument
        takes = ", ".join(_params(name)) or "no arguments"
        return False, f"error: {name} takes {takes}; got {', '.join(args) or 'none'}"
    except ToolError as exc:
        return False, f"error: {exc}"
    except Exception as exc:  # noqa: BLE001 - a bug in a tool must not end the chat: it is one more error result
        return False, f"error: {name} failed ({type(exc).__name__})"


def _params(name: str) -> list[str]:
    spec = next(t for t in TOOL_SPECS if t["function"]["name"] == name)
    return list(spec["function"]["parameters"]["properties"])
