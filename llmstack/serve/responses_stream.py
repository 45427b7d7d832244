"""The Responses API's output items and its stream: chat's server-sent chunks (already through the output rails)
read back and written as the typed events the openai client's ResponseStream accumulates — `response.output_item.added`
/ `.done` around each item, `response.content_part.*` and `response.output_text.*` for a message,
`response.function_call_arguments.*` for a call, `response.reasoning_text.*` for thinking — each with its
sequence_number; a chat error event becomes `error` and `response.failed`."""

from __future__ import annotations

import json


def message_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{rid[5:]}", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(rid: str, j: int, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{rid[5:]}_{j}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class EventStream:
    """One streamed response (`resp`: the response object so far): the output items open so far (reasoning,
    message, function calls) and the sequence of events that open, fill and close them."""

    def __init__(self, resp: dict):
        self.rid, self.resp = resp["id"], resp
        self.seq, self.output, self.open = 0, [], {}  # open: kind -> (output_index, item)
        self.finish, self.usage, self.failed, self.n_calls = None, None, False, 0

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def feed(self, line: str):
        if line.startswith("event: error"):
            err = json.loads(line.split("data: ", 1)[1])["error"]
            self.failed = True
            yield self.event("error", code=err.get("code"), message=err["message"], param=err.get("param"))
            self.resp.update(status="failed", error={"code": err.get("code") or "server_error",
                                                     "message": err["message"]}, output=self.output)
            yield self.event("response.failed", response=self.resp)
            return
        if self.failed or not line.startswith("data: {"):
            return  # data: [DONE], or anything after a failure
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                yield from self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                yield from self.close("reasoning")
                yield from self._text("message", delta["content"])
            for tc in delta.get("tool_calls") or []:
                yield from self._call(tc)
            self.finish = choice["finish_reason"] or self.finish

    def _text(self, kind: str, text: str):
        if kind not in self.open:
            item = (message_item(self.rid, "", "in_progress") if kind == "message" else
                    {"type": "reasoning", "id": f"rs_{self.rid[5:]}", "summary": [], "status": "in_progress",
                     "content": []})
            item["content"] = []
            self.open[kind] = (len(self.output), item)
            self.output.append(item)
            yield self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)
            if kind == "message":
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self.event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                                 content_index=0, part=part)
            item["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []} if
                               kind == "message" else {"type": "reasoning_text", "text": ""}]
        index, item = self.open[kind]
        item["content"][0]["text"] += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        yield self.event(name, item_id=item["id"], output_index=index, content_index=0, delta=text, **extra)

    def _call(self, tc: dict):
        if tc.get("id"):  # a call opens: its name now, its arguments in the next delta (tooling.ToolStream)
            yield from self.close("reasoning")
            yield from self.close("message")
            item = call_item(self.rid, self.n_calls, tc["id"], tc["function"]["name"], "", "in_progress")
            self.n_calls += 1
            self.open["call"] = (len(self.output), item)
            self.output.append(item)
            yield self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)
            return
        index, item = self.open["call"]
        args = tc["function"]["arguments"]
        item["arguments"] += args
        yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=args)
        yield from self.close("call")

    def close(self, kind: str):
        if kind not in self.open:
            return
        index, item = self.open.pop(kind)
        item["status"] = "completed"
        if kind == "call":
            yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             arguments=item["arguments"], name=item["name"])
        elif kind == "message":
            part = item["content"][0]
            yield self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"], logprobs=[])
            yield self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
        else:
            yield self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                             content_index=0, text=item["content"][0]["text"])
        yield self.event("response.output_item.done", output_index=index, item=item)

    def close_all(self):
        for kind in ("reasoning", "message", "call"):
            yield from self.close(kind)
