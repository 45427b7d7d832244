"""The chat template a stage trains with: {% generation %} markers for assistant-only loss, tool-calling templates,
and the double-BOS check. Whatever is trained must render byte-identically to what is served."""

from __future__ import annotations

# SmolLM2's (and most ChatML models') template writes every message with one expression. TRL's assistant-only loss
# needs the assistant part wrapped in {% generation %}; we rewrite that one expression and then check the result
# renders byte-identically to the original, so training sees exactly the text the model is served with.
_CHATML_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_CHATML_MESSAGE_MARKED = (
    "{% if message['role'] == 'assistant' %}"
    "{{'<|im_start|>assistant\n'}}{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}"
    "{% else %}" + _CHATML_MESSAGE + "{% endif %}"
)

_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6\nDone."}],
]


class ChatTemplateError(ValueError):
    pass


def training_chat_template(tokenizer) -> str:
    """The template to train with: the tokenizer's own if it has generation markers, else a marked equivalent."""
    from trl.chat_template_utils import has_generation_markers

    original = tokenizer.chat_template
    if not original:
        raise ChatTemplateError("the model's tokenizer has no chat template; an sft stage trains on chat messages")
    if has_generation_markers(original):
        return original
    if _CHATML_MESSAGE not in original:
        raise ChatTemplateError(
            "the chat template has no {% generation %} markers and is not a ChatML template llmstack can mark; "
            "set `args.assistant_only_loss: false` for this stage (trains on the whole conversation)")
    marked = original.replace(_CHATML_MESSAGE, _CHATML_MESSAGE_MARKED)
    for conv in _PROBE_CONVERSATIONS:
        for gen_prompt, msgs in ((False, conv), (True, conv[:-1])):
            a = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            b = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt,
                                              chat_template=marked)
            if a != b:
                raise ChatTemplateError(f"marked chat template renders differently from the original: {a!r} != {b!r}")
    return marked


def tool_chat_template(tokenizer, assistant_only_loss: bool) -> str:
    """The template to train a tool dataset with AND to save with the model, so serving renders tools exactly as
    training did: the model's own when it renders tools, else llmstack's tool template (TRL's Qwen2.5 training
    template with the model's own system line, llmstack.tools). TRL renders one tool conversation to confirm (its
    `supports_tool_calling`); a template that renders tools but lacks {% generation %} markers gets TRL's training
    variant of it when assistant-only loss is on."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        supports_tool_calling,
    )

    from llmstack import tools

    original = tokenizer.chat_template
    tokenizer.chat_template = tools.template_for(tokenizer)
    try:
        if not supports_tool_calling(tokenizer):
            raise ChatTemplateError("the dataset has tool calls, but the model's chat template does not render them "
                                    "(TRL's supports_tool_calling): use a model whose template renders `tools` and "
                                    "`tool_calls`, or a dataset without tools")
        template = tokenizer.chat_template
        if assistant_only_loss and not has_generation_markers(template):
            try:
                template = get_training_chat_template(tokenizer) or template
            except ValueError:
                raise ChatTemplateError("the model's tool-calling chat template has no {% generation %} markers and "
                                        "TRL has no training variant of it; set `args.assistant_only_loss: false` "
                                        "for this stage") from None
        return template
    finally:
        tokenizer.chat_template = original


def check_single_bos(tokenizer, text: str) -> None:
    """A chat template that writes BOS plus a tokenizer that adds one gives <bos><bos>: a silent quality loss."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return
    ids = tokenizer(text).input_ids
    if len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise ValueError(f"tokenised training text starts with two BOS tokens ({tokenizer.bos_token!r})")
