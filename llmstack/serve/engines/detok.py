"""Generated token ids to the API's deltas, for the engines that generate one token at a time in a thread of their own
(transformers in hf.py, llama.cpp in llamacpp.py): the thread puts lists of new token ids on an asyncio queue, then
None (or the exception it died of); `stream_deltas` turns them into text deltas of one choice.

Text is decoded from all ids so far (a token's text can depend on its neighbours), an end-of-turn token ends the
choice but is counted, a stop string cuts the text where it starts, and text is held back while it ends in a partial
UTF-8 character or in what may be the start of a stop string (stop "\\n\\n" arriving as two "\\n" tokens must not leak
one). vLLM does all of this itself; these engines do not.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from llmstack.serve.engines.base import Delta, GenParams


async def stream_deltas(queue: asyncio.Queue, tokenizer, p: GenParams, eos: set[int], index: int,
                        stop_flag: threading.Event,
                        logprob_rows: Callable[[int, list[int]], list[dict]] | None = None) -> AsyncIterator[Delta]:
    """The deltas of choice `index`. `stop_flag` is set when a stop string ends the choice (the thread should stop
    generating); `logprob_rows(position, token_ids)` gives the logprob rows of tokens generated from `position` on
    (with p.logprobs)."""
    ids: list[int] = []
    text = sent = ""
    pending_ids: list[int] = []  # tokens whose text is held back
    pending_lps: list[dict] = []
    finish = stopped_by = None
    while True:
        item = await queue.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        # The end-of-turn token ends the text but is a generated token all the same: like vLLM (and OpenAI), count it
        # and give its logprob. `echo` scoring (lm-eval) relies on one row per generated token.
        end = next((i for i, t in enumerate(item) if t in eos), None)
        step = item if end is None else item[:end + 1]
        new = step if end is None else step[:-1]
        if end is not None:
            finish = "stop"
        if p.logprobs is not None and logprob_rows is not None:
            pending_lps += logprob_rows(len(ids), step)
        ids += new
        pending_ids += step
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = first_stop(text, p.stop)
        if cut is not None:
            stopped_by = next(s for s in p.stop if s and text.find(s) == cut)
            text, finish = text[:cut], "stop"
            stop_flag.set()
        if finish:
            break
        if text.endswith("\ufffd"):
            continue
        ready = text[:len(text) - stop_prefix_len(text, p.stop)]
        if len(ready) <= len(sent):
            continue
        yield Delta(index=index, text=ready[len(sent):], token_ids=pending_ids,
                    logprobs=pending_lps if p.logprobs is not None else None)
        sent, pending_ids, pending_lps = ready, [], []
    yield Delta(index=index, text=text[len(sent):], token_ids=pending_ids,
                logprobs=pending_lps if p.logprobs is not None else None, finish_reason=finish or "length",
                stop_reason=stopped_by)


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of a stop string (0 if none)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
