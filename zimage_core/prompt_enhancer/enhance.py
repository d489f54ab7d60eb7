"""Prompt enhancer: a short idea -> a precise visual prompt, with Qwen3-4B generating on the text
encoder's own weights (`text_encoder.generate`). Modes and instructions are in `instructions.py`.

The instruction language follows the idea (Chinese instructions for a mostly-Chinese idea), so an
enhanced Chinese idea stays Chinese, which Z-Image renders well, including Chinese text in images.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..text_encoder.generate import GREEDY, CausalLM, Generation, Sampling, chat_text
from ..text_encoder.tokenizer import QwenTokenizer, check_text
from .instructions import DEFAULT_NEGATIVE, INSTRUCTIONS, MODES, QUALITY_BOOST

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_THINK = re.compile(r"<think>.*?</think>", re.S)
_LABEL = r"(?:\*\*|#+\s*)?\s*(?:{names})\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?"
_PROMPT_LABEL = re.compile("^" + _LABEL.format(names=r"(?:enhanced |improved |completed |english )?prompt|"
                                                      r"translation|提示词|优化后的提示词|补全后的提示词|正面提示词"),
                           re.I)
_NEGATIVE_LABEL = re.compile(r"(?m)^\s*" + _LABEL.format(names=r"negative(?: prompt)?|负面提示词|反向提示词"), re.I)
_QUOTES = {'"': '"', "“": "”", "「": "」", "'": "'", "«": "»"}


@dataclass
class Enhanced:
    """The enhancer's result: `prompt` (falls back to the idea if the model returned nothing usable),
    `negative` (quality boost only, else ""), the model's `raw` answer, the instruction `language`
    ("en"/"zh") and the `generation` (tokens, timing)."""

    prompt: str
    negative: str
    raw: str
    language: str
    generation: Generation
    fell_back: bool = False


def idea_language(text: str) -> str:
    """"zh" when Chinese characters outnumber Latin words, else "en"."""
    return "zh" if len(_CJK.findall(text)) > len(_LATIN_WORD.findall(text)) else "en"


def prompt_ids(tokenizer: QwenTokenizer, idea: str, mode: str) -> tuple[list[int], str]:
    """Token ids of the chat (instruction as the system turn, the idea as the user turn, no thinking)
    and the instruction language."""
    if mode not in INSTRUCTIONS:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    idea = check_text(idea, "the idea").strip()
    if not idea:
        raise ValueError("The idea is empty: write a few words about the picture you want.")
    language = idea_language(idea)
    text = chat_text(idea, INSTRUCTIONS[mode][language])
    return tokenizer.encode(text, label="the idea"), language


def parse_answer(raw: str, mode: str, language: str) -> tuple[str, str]:
    """(prompt, negative) from the model's answer: think blocks, labels, code fences and wrapping
    quotes removed; in quality-boost mode the text after "Negative prompt:" is the negative prompt."""
    text = _THINK.sub("", raw).replace("<think>", "").replace("</think>", "").strip()
    negative = ""
    if mode == QUALITY_BOOST:
        m = _NEGATIVE_LABEL.search(text)
        if m:
            text, negative = text[: m.start()], _clean(text[m.end():])
        negative = negative or DEFAULT_NEGATIVE[language]
    return _clean(_PROMPT_LABEL.sub("", text.strip(), count=1)), negative


def _clean(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[^\n]*\n?|\n?```$", "", text).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text.count(text[0]) <= 1 + (text[0] == text[-1]):
        text = text[1:-1].strip()  # one pair of quotes around the whole answer (not quoted text inside)
    return text


def enhance_prompt(lm: CausalLM, tokenizer: QwenTokenizer, idea: str, mode: str, *, max_new_tokens: int = 512,
                   sampling: Sampling = GREEDY, device: torch.device | str | None = None,
                   callback: Callable[[int, int], None] | None = None,
                   prompt: tuple[list[int], str] | None = None) -> Enhanced:
    """Enhance `idea` in `mode` (see `instructions.MODES`) with `lm` (`CausalLM.from_encoder`). `prompt`: what
    `prompt_ids(tokenizer, idea, mode)` returned, when the caller already tokenized (e.g. to size memory)."""
    ids, language = prompt if prompt is not None else prompt_ids(tokenizer, idea, mode)
    gen = lm.generate(ids, max_new_tokens, sampling, device=device, callback=callback)
    tokens = gen.token_ids[:-1] if gen.stopped else gen.token_ids
    raw = tokenizer.decode(tokens)
    prompt, negative = parse_answer(raw, mode, language)
    fell_back = not prompt
    return Enhanced(prompt or idea.strip(), negative, raw, language, gen, fell_back)
