"""Training on thinking (reasoning) traces: the reasoning-aware chat template a stage trains with and saves with the
model, and whether a dataset has thinking at all (a recipe's `thinking: auto`).

Curated rows carry an assistant turn's thinking as `reasoning_content` beside `content`. The template is TRL's copy of
Qwen3's own chat template (`trl.chat_template_utils.qwen3_chat_template`), the maintained reasoning template whose tool
calls are the Hermes format llmstack already trains, parses and serves (llmstack.tools), with these changes:

- the model's own default system line (SmolLM2's, for a ChatML model that writes one), as llmstack.tools does for
  the tool template, so a conversation without a system message renders as the model was trained;
- `{% generation %}` markers around the assistant turns that carry their thinking: those after the last user message
  (the answer being trained, with the tool calls and results of that answer). Earlier turns render as Qwen3 renders
  history, with their thinking dropped, and are NOT trained on: that rendering is not what the model generates (it
  always thinks first), so learning it would teach answering without thinking. TRL's own Qwen3 training variant
  (`qwen3_training.jinja`) instead keeps every turn's thinking and trains every turn; llmstack follows Qwen3's
  history rendering, which is what serving sends back to the model (clients do not return earlier thinking);
- every turn after the last user message renders its `<think>` block, even an empty one (Qwen3 leaves it out of an
  empty non-final turn), so appending a tool result never re-renders an earlier call: training and serving see the
  same prefix;
- the generation prompt opens the thinking block (`<think>\\n`), or closes an empty one (`<think>\\n\\n</think>\\n\\n`)
  with the chat-template kwarg `enable_thinking: false`, so the prompt is always a prefix of the trained turn.

Each change is an exact replacement in TRL's text: a TRL whose copy changed fails loudly here, never half-patched.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from llmstack import tools

_TOOLS_SYSTEM = """    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}"""
_PLAIN_SYSTEM = """    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}"""
_HISTORY = """        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}"""  # noqa: E501 - TRL's text verbatim
# The turn's text is captured in `body` so that one copy of Qwen3's tool-call rendering serves both the trained turns
# (inside {% generation %}) and history (outside): a {% generation %} block cannot be opened conditionally.
_HISTORY_MARKED = """        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- set trained = loop.index0 > ns.last_query_index %}
        {%- set body %}
        {%- if trained %}
            {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}"""
_TURN_END = """        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}"""
# <|im_end|> is trained (the model must learn to stop); the newline after it is never generated, as in llmstack's
# marked ChatML template (templates.training_chat_template).
_TURN_END_MARKED = """        {{- '<|im_end|>' }}
        {%- endset %}
        {%- if trained %}
            {%- generation %}{{- body }}{%- endgeneration %}
        {%- else %}
            {{- body }}
        {%- endif %}
        {{- '\\n' }}
    {%- elif message.role == "tool" %}"""
_PROMPT = """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}"""
_PROMPT_OPEN = """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}"""


class ThinkingTemplateError(ValueError):
    pass


def _literal(text: str) -> str:
    """`text` inside a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _or_else(block: str, expression: str) -> str:
    """One of Qwen3's `if messages[0].role == 'system'` blocks with an `else` that writes `expression`."""
    return block.replace("    {%- endif %}", "    {%- else %}\n        {{- " + expression + " }}\n    {%- endif %}")


def reasoning_template(default_system: str | None) -> str:
    """TRL's Qwen3 chat template with llmstack's changes (module docstring); `default_system` is the system line a
    conversation without a system message gets (None: no system turn, as Qwen3 writes)."""
    from trl.chat_template_utils import qwen3_chat_template

    edits = [(_HISTORY, _HISTORY_MARKED), (_TURN_END, _TURN_END_MARKED), (_PROMPT, _PROMPT_OPEN)]
    if default_system is not None:
        line = _literal(default_system)
        edits += [(_TOOLS_SYSTEM, _or_else(_TOOLS_SYSTEM, f"'{line}\\n\\n'")),
                  (_PLAIN_SYSTEM, _or_else(_PLAIN_SYSTEM, f"'<|im_start|>system\\n{line}<|im_end|>\\n'"))]
    template = qwen3_chat_template
    for old, new in edits:
        if template.count(old) != 1:  # a future trl changed its copy of Qwen3's template: fail, never half-patch
            raise RuntimeError("trl's qwen3.jinja no longer holds the text llmstack's reasoning template replaces: "
                               f"{old.strip()[:80]!r}")
        template = template.replace(old, new)
    return template


def chat_template(tokenizer) -> str:
    """The template to train a thinking dataset with AND to save with the model, for a ChatML tokenizer (the format
    Qwen3's template writes), carrying the model's own default system line. TRL renders one tool conversation to
    confirm it renders tools (its `supports_tool_calling`), as thinking rows may also call tools."""
    from trl.chat_template_utils import supports_tool_calling

    own = tokenizer.chat_template
    if not own or "<|im_start|>" not in own or tokenizer.convert_tokens_to_ids("<|im_end|>") in (
            None, tokenizer.unk_token_id):
        raise ThinkingTemplateError(
            "this sft stage trains on thinking (`reasoning_content`) and llmstack's reasoning template is ChatML "
            "(Qwen3's), but the model's chat template is not: use a ChatML model, or set the stage's `thinking: off` "
            "to train on the answers alone")
    template = reasoning_template(tools.default_system_of(own))
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        if not supports_tool_calling(tokenizer):
            raise ThinkingTemplateError("llmstack's reasoning template does not render a tool conversation with this "
                                        "tokenizer (TRL's supports_tool_calling)")
    finally:
        tokenizer.chat_template = original
    return template


def parse_completions(tokenizer) -> bool:
    """Make TRL's GRPO split each completion of a model with the reasoning template into `reasoning_content` and
    `content`, so the rewards (which read `content`) judge the answer alone, never a number met while thinking. TRL
    parses completions with the tokenizer's response template (`parse_response`, given the prompt, whose generation
    prompt opened `<think>`); the reasoning template renders turns exactly as Qwen3's does, so Qwen3's response template
    (`trl.chat_template_utils.qwen3_template`) is the parser. A completion whose thinking never closed has no answer
    (content ""). Returns whether the tokenizer's template opens thinking (False: nothing is changed)."""
    from trl.chat_template_utils import qwen3_template

    template = tokenizer.chat_template
    if not template or "<|im_start|>" not in template:
        return False
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    if not prompt.endswith("<|im_start|>assistant\n<think>\n"):
        return False
    tokenizer.response_template = qwen3_template
    return True


def has_thinking(dataset) -> bool:
    """Whether any assistant turn of the dataset carries non-empty `reasoning_content`. Messages saved as Arrow
    structs without that field have none; otherwise (JSON messages, or the field present) the `messages` column is
    read in batches, stopping at the first one found."""
    if "messages" not in dataset.column_names:
        return False
    turns = dataset.features["messages"]
    turn = turns[0] if isinstance(turns, list) else getattr(turns, "feature", None)
    if isinstance(turn, dict) and "reasoning_content" not in turn:
        return False
    for batch in dataset.select_columns(["messages"]).iter(batch_size=1024):
        for conversation in batch["messages"]:
            for message in conversation or []:
                if isinstance(message, dict) and message.get("role") == "assistant" and \
                        isinstance(message.get("reasoning_content"), str) and message["reasoning_content"].strip():
                    return True
    return False


def wanted(setting: str, dataset) -> bool:
    """A stage's `thinking` setting against its dataset: on, off, or (auto) on when the dataset has thinking."""
    return setting == "on" or (setting == "auto" and has_thinking(dataset))


_TRL_STOP_PROBE = "The chat template does not include the assistant turn's end-of-turn token"


@contextmanager
def trl_stop_probe_quiet():
    """Drop one TRL warning while SFTTrainer is built with the reasoning template. TRL's probe
    (`is_chat_template_stop_token_trained`) renders an assistant turn FOLLOWED by a user turn, which this template
    leaves out of the loss on purpose (it is history), so the probe finds no mask and warns that the model may not
    learn to stop; the trained turn's `<|im_end|>` is in the mask (tests/test_train_thinking.py checks it)."""
    trl_logger = logging.getLogger("trl.trainer.sft_trainer")

    def keep(record: logging.LogRecord) -> bool:
        return _TRL_STOP_PROBE not in str(record.getMessage())  # TRL prefixes its rank: "[RANK 0] The chat..."

    trl_logger.addFilter(keep)
    try:
        yield
    finally:
        trl_logger.removeFilter(keep)
