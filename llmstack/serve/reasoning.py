"""Reasoning models on /v1/chat/completions: the model's thinking returned apart from its answer, as vLLM's OpenAI
server and DeepSeek's API return it (`message.reasoning_content`, streamed as `delta.reasoning_content` before
`delta.content`, counted in `usage.completion_tokens_details.reasoning_tokens`), under a thinking budget, and through
the guard's thinking policy (pass / rail / hide, per server and per key).

The format is Qwen3's, which llmstack trains and saves its reasoning models with (llmstack/train/thinking.py): the
generation prompt opens `<think>\\n`, the model thinks, closes with `\\n</think>\\n\\n` and answers; the chat-template
kwarg `enable_thinking: false` renders an empty block instead, and the model answers at once.

The split is written here rather than taken from vLLM's reasoning parsers (vllm/reasoning/), for two reasons seen in
vLLM 0.32: `DeepSeekR1ReasoningParser` (and every `BaseThinkingReasoningParser`) needs `<think>` and `</think>` to be
single vocabulary tokens and refuses a tokenizer where they are plain text, as on SmolLM2; and the text path of its
Qwen3 parser (`Qwen3ParserReasoningAdapter`) ends thinking at a `<tool_call>` tag written inside it (Qwen3's grammar:
"tool call directly from reasoning"), which would hand a call the model only thought about to the tool-call parser.
Here a tag inside thinking stays thinking: only the answer is read for tool calls. What is kept from vLLM: its
parser names (`qwen3`, `deepseek_r1`) and their rule for where the output begins (`opens`), the request field
`chat_template_kwargs`, unclosed thinking at the end of the output (a length cut) being all reasoning.

The budget (`max_reasoning_tokens`) is two engine calls, which works the same on both engines: thinking runs at most
that many tokens; if the model has not closed it by then, the server writes the template's own closing tag and the
answer is generated from the prompt extended by the thinking and the tag (vLLM's `thinking_token_budget` would need a
reasoning config built into the engine at start, with `<think>` as token ids, and has no transformers counterpart).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from llmstack.serve.engines import Delta, GenParams
from llmstack.serve.protocol import APIError

OPEN, CLOSE = "<think>", "</think>"
CLOSING = "\n</think>\n\n"  # what the template writes after thinking; the server writes it when the budget runs out
TEMPLATE_MARKS = ("<think>", "reasoning_content", "enable_thinking")


def parser_for(setting: str, chat_template: str | None) -> str | None:
    """The reasoning parser a server uses (`serve.reasoning.parser`): auto finds thinking in the chat template."""
    if setting == "auto":
        return "qwen3" if chat_template and any(m in chat_template for m in TEMPLATE_MARKS) else None
    return None if setting == "none" else setting


@dataclass
class Thinking:
    """What one chat request asks of a reasoning model, and where its output begins."""

    parser: str  # qwen3 | deepseek_r1
    policy: str  # pass | rail | hide: the key's, else the server's
    enable: bool | None  # chat_template_kwargs.enable_thinking as rendered (None: the template's default)
    budget: int | None  # max_reasoning_tokens
    opens: bool = True  # the model's output begins inside thinking (set from the rendered prompt)

    def template_kwargs(self) -> dict:
        return {} if self.enable is None else {"enable_thinking": self.enable}

    def settle(self, prompt_text: str) -> None:
        """Where the output begins, from the prompt as rendered: after an open `<think>` inside thinking, after a
        closed block in the answer; otherwise as vLLM's parser of that name assumes (deepseek_r1: inside thinking;
        qwen3: inside thinking unless enable_thinking is false)."""
        tail = prompt_text.rstrip()
        if tail.endswith(CLOSE):
            self.opens = False
        elif tail.endswith(OPEN):
            self.opens = True
        else:
            self.opens = self.parser == "deepseek_r1" or self.enable is not False


def plan(parser: str | None, req, policy: str, params: GenParams, max_tokens_cap: int,
         structured: bool) -> Thinking | None:
    """The request's thinking (None on a model that does not think), or its 400. A budget of 0, and structured
    output (response_format, a forced tool call — a grammar would otherwise constrain the thinking too), render the
    empty thinking block: the model answers at once."""
    budget = req.max_reasoning_tokens
    kwargs = req.chat_template_kwargs
    enable = kwargs.enable_thinking if kwargs is not None else None
    if parser is None:
        if budget is not None:
            raise APIError(400, "max_reasoning_tokens: this model does not think (its chat template renders no "
                           "thinking); leave it out", param="max_reasoning_tokens")
        return None
    if budget is not None and budget > max_tokens_cap:
        raise APIError(400, f"max_reasoning_tokens is {budget}; this server allows at most {max_tokens_cap} (its "
                       "max_tokens cap)", param="max_reasoning_tokens", code="max_tokens_exceeded")
    if budget == 0 or structured:
        enable = False
    return Thinking(parser, policy, enable, budget)


def check_messages(req) -> None:
    """Earlier thinking comes back only on assistant turns (where the template drops it for earlier turns)."""
    for i, m in enumerate(req.messages):
        if (m.reasoning_content is not None or m.reasoning is not None) and m.role != "assistant":
            raise APIError(400, f"messages[{i}] is a {m.role} message: only assistant messages carry "
                           "reasoning_content", param=f"messages[{i}].reasoning_content")


def earlier_thinking(m) -> str | None:
    return m.reasoning_content if m.reasoning_content is not None else m.reasoning


# ----------------------------------------------------------------------------------------------- the budget
def generate(engine, rid: str, prompt_ids: list[int], params: GenParams, model: str, thinking: Thinking | None,
             closing_ids):
    """The engine's deltas for one request, with the thinking budget applied (`_budgeted`); with no budget that
    applies, the engine's own generator (a generator around it would cost a step per token). Closing the generator
    returned aborts the engine call in flight."""
    budget = thinking.budget if thinking is not None and thinking.opens else None
    if budget is None or budget >= params.max_tokens:
        return engine.generate(rid, prompt_ids, params, model)
    return _budgeted(engine, rid, prompt_ids, params, model, budget, closing_ids)


async def _budgeted(engine, rid: str, prompt_ids: list[int], params: GenParams, model: str, budget: int,
                    closing_ids):
    """A first call of at most `budget` tokens, then, per choice cut there, the server's closing tag (a delta of
    text without tokens: it is prompt, not completion) and a second call that continues from the prompt, the tokens
    so far and the tag, with what is left of max_tokens after both. `closing_ids()` tokenizes the tag."""
    n = params.n
    ids: list[list[int]] = [[] for _ in range(n)]
    texts, done, cut = [""] * n, [False] * n, [False] * n
    async with contextlib.aclosing(engine.generate(rid, prompt_ids, replace(params, max_tokens=budget), model)) as gen:
        async for deltas in gen:
            out = []
            for d in deltas:
                if done[d.index]:  # an engine that runs past max_tokens is cut here
                    continue
                ids[d.index] += d.token_ids
                texts[d.index] += d.text
                if d.finish_reason not in (None, "length"):  # the model ended its turn within the budget
                    done[d.index] = True
                elif d.finish_reason == "length" or len(ids[d.index]) >= budget:
                    done[d.index] = cut[d.index] = True
                    d = replace(d, finish_reason=None)
                out.append(d)
            if out:
                yield out
            if all(done):
                break
    for i in (i for i in range(n) if cut[i]):
        closing = "" if CLOSE in texts[i] else CLOSING  # a model that closed thinking itself only goes on answering
        if closing:
            yield [Delta(i, closing, [])]
        tag = closing_ids() if closing else []
        # the tag's tokens are charged to max_tokens: the second call stays within the context admitted for the first
        left = params.max_tokens - len(ids[i]) - len(tag)
        if left <= 0:
            yield [Delta(i, "", [], finish_reason="length")]
            continue
        more = replace(params, n=1, max_tokens=left, prompt_logprobs=None)
        prompt = prompt_ids + ids[i] + tag
        async with contextlib.aclosing(engine.generate(f"{rid}-{i}", prompt, more, model)) as gen:
            async for deltas in gen:
                yield [replace(d, index=i) for d in deltas]


# ------------------------------------------------------------------------------------------------ the split
class ThinkSplit:
    """One choice's raw output split into thinking and answer as it arrives (`feed` returns the new part of each).
    Thinking is the text before `</think>` without its surrounding newlines; the answer is what follows, without the
    template's blank line. A tail that may still be (the start of) the closing tag, or newlines before it, is held
    back until it is known. Both parts are contiguous slices of the raw output (`reasoning_start`, `content_start`),
    which is how logprobs rows, in raw offsets, are told apart and placed on each part (`channel`). The split does
    not depend on how the text is cut into deltas (tests/test_serve_reasoning_split.py): a non-streamed answer is
    fed in one piece."""

    def __init__(self, opens: bool):
        self.opens = opens
        self.state = "lead" if opens else "answer_lead"
        self.thinking = opens  # the state is lead or think (an attribute: read on every delta)
        self.seen = 0  # raw characters fed
        self.held = ""  # the raw tail held back (it ends at `seen`)
        self.reasoning_start: int | None = None
        self.content_start: int | None = None
        self.closed_at: int | None = None  # raw offset just past `</think>`
        # the parts returned so far, joined when read (`+=` on an attribute copies the whole text on every delta)
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        if not final and not self.held and text:  # most deltas: plainly inside one part, nothing to look for
            if self.state == "answer":
                self.seen += len(text)
                self._content.append(text)
                return "", text
            if self.state == "think" and "<" not in text[-len(CLOSE):] and text[-1] != "\n" and CLOSE not in text:
                self.seen += len(text)
                self._reasoning.append(text)
                return text, ""
        pending, start = self.held + text, self.seen - len(self.held)
        self.seen += len(text)
        self.held, pos, reasoning, content = "", 0, "", ""
        while pos < len(pending) or (final and self.state == "think"):
            if self.state == "lead":  # newlines, and a `<think>` the model writes itself (vLLM's qwen3 absorbs it)
                j = _skip_newlines(pending, pos)
                if pending.startswith(OPEN, j):
                    j = _skip_newlines(pending, j + len(OPEN))
                elif OPEN.startswith(pending[j:]) and j < len(pending) and not final:
                    self.held = pending[j:]
                    break
                if j == len(pending) and not final:
                    break
                self.state, self.reasoning_start, pos = "think", start + j, j
            elif self.state == "think":
                k = pending.find(CLOSE, pos)
                if k >= 0:
                    reasoning += pending[pos:k].rstrip("\n")
                    self.closed_at, pos, self.state = start + k + len(CLOSE), k + len(CLOSE), "answer_lead"
                    continue
                keep = 0 if final else _closing_tail(pending, pos)
                part = pending[pos:len(pending) - keep]
                reasoning += part.rstrip("\n") if final else part
                self.held, pos = pending[len(pending) - keep:], len(pending)
                if final:
                    self.state = "answer_lead"
                break
            elif self.state == "answer_lead":
                j = _skip_newlines(pending, pos)
                if j == len(pending):
                    break
                self.state, self.content_start, pos = "answer", start + j, j
            else:
                content += pending[pos:]
                break
        self.thinking = self.state in ("lead", "think")
        self._reasoning.append(reasoning)
        self._content.append(content)
        return reasoning, content

    def is_thinking_row(self, start: int) -> bool:
        """Whether a logprobs row starting at this raw offset is a thinking token (the closing tag's included)."""
        return self.opens and (self.closed_at is None or start < self.closed_at)

    def channel(self, rows: list[tuple[int, int, dict]], thinking: bool) -> list[tuple[int, int, dict]]:
        """Rows moved from raw offsets to offsets in the thinking (or answer) text."""
        base = self.reasoning_start if thinking else self.content_start
        base = self.seen if base is None else base
        return [(s - base, e - base, row) for s, e, row in rows]


def _skip_newlines(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == "\n":
        pos += 1
    return pos


def _closing_tail(text: str, pos: int) -> int:
    """The length of the longest tail of text[pos:] that is newlines and then a proper prefix of `</think>`."""
    seg = text[pos:]
    for q in range(min(len(CLOSE) - 1, len(seg)), -1, -1):
        if seg.endswith(CLOSE[:q]):
            body = seg[:len(seg) - q]
            return q + len(body) - len(body.rstrip("\n"))
    return 0


def railed_thinking(policy: str, rails, split: ThinkSplit, rows: list[tuple[int, int, dict]]):
    """One finished choice's thinking as the policy lets it out: (text or None, its logprobs rows, the rails' verdict
    or None). hide: nothing, its rows dropped; pass: as written; rail: through the output rails like the answer
    (a blocking verdict withholds the choice)."""
    if not split.opens or policy == "hide":
        return None, [], None
    if policy == "pass":
        return split.reasoning, [row for _, _, row in rows], None
    v = rails.check(split.reasoning)
    if v.blocked:
        return None, [], v
    return v.text, rails.scrub(split.channel(rows, True), [(sp.start, sp.end) for sp in v.redacted]), v
