"""Qwen3-4B text encoding: tokenizer, encoder and loading; the same weights as a causal LM (generate)."""

from __future__ import annotations

from .generate import GREEDY, STOP_TOKEN_IDS, CausalLM, Generation, Sampling, chat_text
from .lm_tail import LMTail, load_lm_tail
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
from .ops import manual_cast
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
    "CausalLM",
    "GREEDY",
    "Generation",
    "LMTail",
    "STOP_TOKEN_IDS",
    "Sampling",
    "chat_text",
    "load_lm_tail",
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
    "manual_cast",
]
