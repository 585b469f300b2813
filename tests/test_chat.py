"""pipelines/chat.py: the one chat renderer training, drift and evaluation share."""

from __future__ import annotations

from test_features import tiny_tokenizer

from pipelines.chat import render_chat

MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}]


def test_a_tokenizer_without_template_gets_chatml():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert render_chat(tok, MESSAGES, generation_prompt=False) == \
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n"
    assert render_chat(tok, MESSAGES[:1], generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_a_tokenizer_with_its_own_template_keeps_it():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    assert render_chat(tok, MESSAGES, generation_prompt=False) == "[user] hello [assistant] fine thanks "
