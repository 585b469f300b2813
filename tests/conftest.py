"""Shared fixtures: tiny tokenizers and tiny random models built locally (never downloaded)."""

from __future__ import annotations

import pathlib

import pytest

# ChatML, as SmolLM2 and Qwen2 use it, so chat-template code paths see a realistic template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_WORDS = (
    "the a an is of to and in on law court contract judge party shall must not be by with for "
    "what who where when how why yes no hello world model data answer question user assistant system"
).split()


def build_tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast over ~60 words, with eos/bos/unk, a chat template and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {token: i for i, token in enumerate(specials + list("\n?.,!") + list(TINY_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A saved Hugging Face directory: tiny random Llama (seeded) + the tiny tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CACHE = REPO / ".cache" / "lorad-test"


@pytest.fixture(scope="session")
def real_model_cache() -> pathlib.Path:
    """The default SmolLM2-135M-Instruct converted once per machine into .cache/lorad-test (about 20 s)."""
    from pipelines.models import EMBEDDED_DEFAULT, resolve_base_model

    resolve_base_model(EMBEDDED_DEFAULT, SHARED_CACHE)
    return SHARED_CACHE


@pytest.fixture
def state_with_real_model(tmp_path, real_model_cache) -> pathlib.Path:
    """A fresh state folder whose model cache is the shared converted default model."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "cache").symlink_to(real_model_cache, target_is_directory=True)
    return state
