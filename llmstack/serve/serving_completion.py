"""/v1/completions: OpenAI's legacy completions endpoint over the shared request path (serving.py), as lm-eval and
vLLM's server use it. Its own parts: a prompt given as text or as token ids (used as given, so scoring sees exact
tokens), `echo` (the prompt, and its tokens' logprobs, before the completion; with max_tokens 0: scoring only), and
answers shaped as `text` choices."""

from __future__ import annotations

from llmstack.serve.protocol import APIError, CompletionRequest, completion_logprobs
from llmstack.serve.request import Answer, ServedRequest
from llmstack.serve.serving import Endpoint
from llmstack.serve.state import Server
from llmstack.serve.tooling import ToolPlan


class Completions(Endpoint):
    route = "/v1/completions"
    id_prefix = "cmpl"
    schema = CompletionRequest
    object = "text_completion"
    chunk_object = "text_completion"
    prompt_param = "prompt"
    logprobs_param = "logprobs"

    def echo(self, req) -> bool:
        return req.echo

    def render(self, srv: Server, req, guard, plan: ToolPlan | None, thinking=None) -> tuple[list[int], str]:
        tok = srv.engine.tokenizer
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            if len(prompt) != 1:  # a batch of prompts (texts or token lists), as lm-eval and vLLM's server send
                raise APIError(400, "send one prompt per request (a list of several prompts is not supported)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids: used as given (as OpenAI and vLLM do), so scoring sees exact tokens
            if not prompt or not all(0 <= t < len(tok) for t in prompt):
                raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {len(tok)})",
                               param="prompt")
            with srv.tokenizer_lock:
                text = tok.decode(prompt)
            checked = guard(text, "prompt")
            if checked == text:
                return prompt, checked
            with srv.tokenizer_lock:
                return tok(checked)["input_ids"], checked
        srv.check_prompt_chars(prompt, "prompt")
        prompt = guard(prompt, "prompt")
        with srv.tokenizer_lock:
            return tok(prompt)["input_ids"], prompt

    def user_text(self, req) -> str:
        return req.prompt if isinstance(req.prompt, str) else ""

    def settle(self, call: ServedRequest, answer: Answer) -> None:
        n = call.params.n
        if call.req.echo and call.req.max_tokens == 0:  # scoring only: drop the one step the engine had to take
            answer.texts, answer.lps, answer.finish, answer.n_out = [""] * n, [[] for _ in range(n)], ["length"] * n, 0
        if call.req.echo and call.params.logprobs is not None and len(answer.prompt_lps) != len(call.prompt_ids):
            raise APIError(500, f"the engine returned {len(answer.prompt_lps)} prompt logprobs for "
                           f"{len(call.prompt_ids)} prompt tokens", code="internal_error")  # never misaligned scores

    def choice(self, call: ServedRequest, i: int, text: str, rows: list[dict], reason: str, blocked: bool,
               answer: Answer) -> dict:
        echo = call.req.echo
        if echo:  # the prompt (as the input guard passed it) before the completion, its logprobs before theirs
            text = call.prompt_text + text
            rows = [*answer.prompt_lps, *rows]
        first = call.srv.engine.tokenizer.decode(call.prompt_ids[:1]) if echo else ""
        return {"index": i, "text": text, "finish_reason": reason,
                "logprobs": completion_logprobs(rows, first) if call.params.logprobs is not None else None}

    def delta(self, index, text, finish, lp, role, calls, reasoning=None) -> dict:
        return {"index": index, "text": text or "", "finish_reason": finish,
                "logprobs": completion_logprobs(lp) if lp else None}
