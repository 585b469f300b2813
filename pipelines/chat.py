"""The one chat renderer: training, drift features and evaluation all turn messages into text here.

A tokenizer's own chat template is used when it has one; a base model's tokenizer without one gets
ChatML, so every stage sees the same text for the same record (and drift measures text the model
is actually trained on). Only the stdlib is imported; the tokenizer is passed in.
"""

from __future__ import annotations

from typing import Any

# ChatML, used only for tokenizers that have no chat template of their own (base models).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(tokenizer: Any) -> str | None:
    """The template to pass to ``apply_chat_template``: None (the tokenizer's own) or ChatML when it has none."""
    return None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE


def render_chat(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    """``messages`` as text, with the assistant's generation prompt appended when ``generation_prompt``."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=chat_template(tokenizer))
