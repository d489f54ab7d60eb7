"""Qwen3-4B text encoding: tokenizer, encoder and loading."""

from __future__ import annotations

from .loading import FIX, MAX_LAYERS, WHAT, load_text_encoder
from .model import (
    MAX_CAPTION_TOKENS,
    RMS_NORM_EPS,
    ROPE_THETA,
    TEMPLATE_PREFIX,
    TEMPLATE_SUFFIX,
    ZImageTextEncoder,
    chat_prompt,
)
from .tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    MAX_TEXT_CHARS,
    QWEN3_ADDED_TOKENS,
    QwenTokenizer,
    TokenizerNotFoundError,
    check_text,
    load_tokenizer,
)

__all__ = [
    "ENDOFTEXT",
    "FIX",
    "IM_END",
    "IM_START",
    "MAX_CAPTION_TOKENS",
    "MAX_LAYERS",
    "MAX_TEXT_CHARS",
    "QWEN3_ADDED_TOKENS",
    "QwenTokenizer",
    "RMS_NORM_EPS",
    "ROPE_THETA",
    "TEMPLATE_PREFIX",
    "TEMPLATE_SUFFIX",
    "TokenizerNotFoundError",
    "WHAT",
    "ZImageTextEncoder",
    "chat_prompt",
    "check_text",
    "load_text_encoder",
    "load_tokenizer",
]
