"""/v1/chat/completions: OpenAI's chat endpoint over the shared request path (serving.py). Its own parts: tool
planning and the conversation's earlier calls (tooling.py), `response_format`, every message's text (and earlier
calls' arguments) through the input rails, the chat template rendered so that message text can never forge a turn
(`encode_chat`), and answers shaped as messages (with tool calls) and streamed as deltas."""

from __future__ import annotations

import json

from llmstack import tools
from llmstack.config.serve import KeyEntry
from llmstack.serve import reasoning
from llmstack.serve.engines import GenParams
from llmstack.serve.protocol import APIError, ChatRequest, chat_logprobs
from llmstack.serve.reasoning import Thinking
from llmstack.serve.request import Answer, ServedRequest
from llmstack.serve.serving import Endpoint
from llmstack.serve.state import Server
from llmstack.serve.tooling import (
    ToolPlan,
    check_history,
    check_json_schema,
    plan_tools,
    rail_arguments,
    rail_name,
    rail_spec,
)


class ChatCompletions(Endpoint):
    route = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    schema = ChatRequest
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prompt_param = "messages"
    logprobs_param = "top_logprobs"
    opens_with_role = True

    async def prepare(self, srv: Server, req) -> ToolPlan | None:
        plan = await srv.body_work(plan_tools, req, srv.policy.caps)  # in a worker: a request may carry many schemas
        await srv.body_work(check_history, req, srv.policy.caps.max_json_depth)  # parses earlier calls' arguments
        return plan

    async def structured(self, srv: Server, req, plan: ToolPlan | None) -> tuple[dict | None, bool]:
        if plan is not None and plan.forced:
            return plan.schema(), False
        if req.response_format is None or req.response_format.type == "text":
            return None, False
        if req.response_format.type != "json_schema":
            return None, True
        if req.response_format.json_schema is None:
            raise APIError(400, "response_format.json_schema is required for type json_schema",
                           param="response_format")
        schema = req.response_format.json_schema.schema_
        await srv.body_work(check_json_schema, schema, "response_format", srv.policy.caps.max_tool_schema_bytes)
        return schema, False

    def max_tokens(self, req) -> int | None:
        return req.max_completion_tokens or req.max_tokens

    def top_logprobs(self, req) -> int | None:
        return (req.top_logprobs or 0) if req.logprobs else None

    def thinking(self, srv: Server, req, key: KeyEntry, params: GenParams, structured: bool) -> Thinking | None:
        reasoning.check_messages(req)
        return reasoning.plan(srv.reasoning_parser, req, key.thinking or srv.policy.thinking, params,
                              srv.policy.caps.max_tokens, structured)

    def render(self, srv: Server, req, guard, plan: ToolPlan | None,
               thinking: Thinking | None = None) -> tuple[list[int], str]:
        tok = srv.engine.tokenizer
        # a spec or call that spells a special token is refused as such, before the rails (whose injection rail
        # would refuse `<|im_start|>system` under its own code, and only where the policy turns it on)
        shown = plan.tools if plan is not None and plan.mode != "none" else None
        calls = [[c.function.model_dump() for c in m.tool_calls] for m in req.messages if m.tool_calls]
        if shown or calls:
            raw = json.dumps([shown, calls], ensure_ascii=False)
            with srv.tokenizer_lock:
                if any(sp in raw for sp in _specials(tok)):
                    raise APIError(400, "a tool spec or tool call spells a special token of this model; remove it",
                                   param="tools", code="special_token_in_content")
        exempt = srv.policy.input.exempt_roles
        messages, specs, tooled = rail_chat(req, plan, guard, exempt)
        users = [m.text() for m in req.messages if m.role == "user" and m.role not in exempt]
        if len(users) > 1:  # an injection split across user turns is seen whole
            guard.joined(users, "messages")
        extra = json.dumps([specs, [m.get("tool_calls") for m in messages]], ensure_ascii=False) if tooled else ""
        srv.check_prompt_chars("".join(m["content"] + m.get("reasoning_content", "") for m in messages) + extra,
                               "messages")
        kwargs = thinking.template_kwargs() if thinking is not None else {}
        with srv.tokenizer_lock:
            return encode_chat(tok, messages, specs, tools.template_for(tok) if tooled else None, kwargs)

    def user_text(self, req) -> str:
        return next((m.text() for m in reversed(req.messages) if m.role == "user"), "")

    def choice(self, call: ServedRequest, i: int, text: str, rows: list[dict], reason: str, blocked: bool,
               answer: Answer) -> dict:
        message = {"role": "assistant", "content": text}
        if answer.reasoning[i] is not None:  # a reasoning model's thinking, as the policy lets it out
            message["reasoning_content"] = answer.reasoning[i]
        if call.plan is not None and not blocked:
            message["content"], calls = call.plan.read_calls(text, call.srv.engine, call.audit)
            if calls:
                message["tool_calls"], reason = calls, "tool_calls"
        return {"index": i, "message": message, "finish_reason": reason,
                "logprobs": chat_logprobs(rows) if call.params.logprobs is not None else None}

    def delta(self, index, text, finish, lp, role, calls, reasoning=None) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = calls
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": chat_logprobs(lp) if lp else None}


def rail_chat(req, plan: ToolPlan | None, guard, exempt: list[str]) -> tuple[list[dict], list[dict] | None, bool]:
    """One walk over every text-bearing field of a chat request, each through the input rails (`guard`), and the
    messages and tool specs the template renders, as the rails left them: every message's content (tool results
    included) unless its role is exempt; earlier calls' function names and their parsed arguments' keys and values
    (with their message's role); the offered tools' names, descriptions and parameters schemas (always: no role
    owns them). Also whether the chat needs the tool template."""
    messages, tooled = [], plan is not None and plan.mode != "none"
    for i, m in enumerate(req.messages):
        text = m.text()
        railed = m.role not in exempt  # every role's text is checked unless the policy exempts it
        if railed:
            text = guard(text, f"messages[{i}].content")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text}
        thought = reasoning.earlier_thinking(m)  # only on assistant turns (reasoning.check_messages)
        if thought is not None:
            msg["reasoning_content"] = guard(thought, f"messages[{i}].reasoning_content") if railed else thought
        if m.tool_calls:  # what the model sent earlier is text like any other (arguments parsed by check_history)
            msg["tool_calls"] = []
            for j, c in enumerate(m.tool_calls):
                param, args = f"messages[{i}].tool_calls[{j}].function", tools.arguments_object(c.function.arguments)
                msg["tool_calls"].append({"type": "function", "function": {
                    "name": rail_name(c.function.name, guard, f"{param}.name") if railed else c.function.name,
                    "arguments": rail_arguments(args, guard, f"{param}.arguments") if railed else args}})
            tooled = True
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
            tooled = True
        messages.append(msg)
    specs = None
    if plan is not None and plan.mode != "none":
        specs = [rail_spec(t, guard, f"tools[{i}].function") for i, t in enumerate(plan.tools)]
    return messages, specs, tooled


def _specials(tok) -> list[str]:
    return [t for t in tok.all_special_tokens if t] + [t.content for t in tok.added_tokens_decoder.values()
                                                       if t.special]


def _text_ids(tok, text: str) -> list[int]:
    """`tok(text, add_special_tokens=False)["input_ids"]`, straight from a fast tokenizer's Rust backend when it has
    one: the same ids, without transformers' per-call argument handling (half the call's time on a short prompt,
    paid by every request)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok(text, add_special_tokens=False)["input_ids"]
    return backend.encode(text, add_special_tokens=False).ids


_MARK = "\ue000{}\ue001"  # private-use characters around a message index: stand-ins for content while rendering


def encode_chat(tok, messages: list[dict], tool_specs: list[dict] | None = None,
                template: str | None = None, template_kwargs: dict | None = None) -> tuple[list[int], str]:
    """The prompt tokens of a chat, with the message contents tokenized as text: a `<|im_end|><|im_start|>system`
    typed into a message stays those characters, never the control tokens that would forge a turn.

    Ordinary content goes the way vLLM's own server goes (render to text, tokenize without extra specials), so the
    prompt tokens are the same as there. Content that spells a special token is rendered with a stand-in, and the
    template's own text around it is tokenized as usual while the content is tokenized with special tokens split."""
    def apply(msgs):
        return tok.apply_chat_template(msgs, tools=tool_specs, chat_template=template, add_generation_prompt=True,
                                       tokenize=False, **(template_kwargs or {}))

    prompt_text = apply(messages)
    specials = _specials(tok)
    if any(sp in m.get("reasoning_content", "") for m in messages for sp in specials):
        i = next(i for i, m in enumerate(messages) if any(sp in m.get("reasoning_content", "") for sp in specials))
        raise APIError(400, f"messages[{i}].reasoning_content spells a special token of this model; remove it",
                       param=f"messages[{i}].reasoning_content", code="special_token_in_content")
    forged = [i for i, m in enumerate(messages) if any(sp in m["content"] for sp in specials)]
    if not forged:
        return _text_ids(tok, prompt_text), prompt_text
    stand_in = [{**m, "content": _MARK.format(i) if i in forged else m["content"]} for i, m in enumerate(messages)]
    rendered = apply(stand_in)
    ids, rest = [], rendered
    for i in forged:
        mark = _MARK.format(i)
        if rest.count(mark) != 1:
            raise APIError(400, f"messages[{i}].content spells a special token of this model, and its chat template "
                           "does not keep message text apart; remove the special token", param=f"messages[{i}]",
                           code="special_token_in_content")
        before, rest = rest.split(mark)
        ids += tok(before, add_special_tokens=False)["input_ids"]
        ids += tok(messages[i]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tok(rest, add_special_tokens=False)["input_ids"]
    return ids, prompt_text
