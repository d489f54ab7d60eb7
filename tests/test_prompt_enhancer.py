"""The prompt enhancer's text side (zimage_core.prompt_enhancer): instruction choice, chat, answer parsing.
Generation is tested in test_generate.py, the node in test_comfy_prompt_enhancer.py."""

from __future__ import annotations

import pytest

from tests.text_fixtures import qtc_tokenizer_json
from zimage_core.prompt_enhancer import (
    DEFAULT_NEGATIVE,
    ENHANCE,
    INSTRUCTIONS,
    MODES,
    QUALITY_BOOST,
    TRANSLATE,
    idea_language,
    parse_answer,
    prompt_ids,
)
from zimage_core.text_encoder import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qtc_tokenizer_json())


@pytest.mark.parametrize("idea, language", [
    ("a red fox in the snow", "en"),
    ("一只橘猫坐在窗台上", "zh"),
    ("a neon sign that says “深夜食堂” above a ramen stall in the rain", "en"),  # quoted text to render
    ("一辆 Tesla 停在故宫门前的雪地里", "zh"),
    ("🐱🚀", "en"),
])
def test_instruction_language_follows_the_idea(idea, language):
    assert idea_language(idea) == language


def test_every_mode_has_english_and_chinese_instructions():
    assert set(INSTRUCTIONS) == set(MODES) == {ENHANCE, TRANSLATE, QUALITY_BOOST}
    for mode in MODES:
        assert set(INSTRUCTIONS[mode]) == {"en", "zh"}
        assert all(len(text) > 100 for text in INSTRUCTIONS[mode].values())
    # The answer format the quality-boost instructions ask for is the one parse_answer reads.
    assert "Negative prompt:" in INSTRUCTIONS[QUALITY_BOOST]["en"]
    assert "负面提示词：" in INSTRUCTIONS[QUALITY_BOOST]["zh"]


def test_chat_holds_the_instruction_and_the_idea(tokenizer):
    ids, language = prompt_ids(tokenizer, "  一只橘猫坐在窗台上 ", ENHANCE)
    text = tokenizer.decode(ids)
    assert language == "zh"
    assert text == (f"<|im_start|>system\n{INSTRUCTIONS[ENHANCE]['zh']}<|im_end|>\n<|im_start|>user\n"
                    "一只橘猫坐在窗台上<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("idea, mode, error", [
    ("   ", ENHANCE, "empty"),
    ("a fox", "summarise", "mode must be one of"),
])
def test_bad_requests(tokenizer, idea, mode, error):
    with pytest.raises(ValueError, match=error):
        prompt_ids(tokenizer, idea, mode)


@pytest.mark.parametrize("raw, prompt", [
    ("A red fox curled up in deep snow, golden backlight.", "A red fox curled up in deep snow, golden backlight."),
    ("Prompt: A red fox in snow.", "A red fox in snow."),
    ("**Enhanced prompt:** A red fox in snow.", "A red fox in snow."),
    ("<think>\nthe user wants a fox\n</think>\n\nA red fox in snow.", "A red fox in snow."),
    ("\"A red fox in snow.\"", "A red fox in snow."),
    ("“一只红狐狸卧在雪地里。”", "一只红狐狸卧在雪地里。"),
    ("A sign that says \"OPEN\" and a door that says \"PUSH\".", "A sign that says \"OPEN\" and a door that says \"PUSH\"."),
    ("```\nA red fox in snow.\n```", "A red fox in snow."),
    ("提示词：一只红狐狸卧在雪地里。", "一只红狐狸卧在雪地里。"),
    ("", ""),
])
def test_answer_cleanup(raw, prompt):
    assert parse_answer(raw, ENHANCE, "en") == (prompt, "")


def test_quality_boost_answer_splits_prompt_and_negative():
    raw = "Prompt: Portrait of an old fisherman, weathered skin.\nNegative prompt: blurry, extra fingers"
    assert parse_answer(raw, QUALITY_BOOST, "en") == ("Portrait of an old fisherman, weathered skin.",
                                                      "blurry, extra fingers")
    raw = "提示词：老渔夫的肖像，饱经风霜的皮肤。\n负面提示词：模糊，多余的手指"
    assert parse_answer(raw, QUALITY_BOOST, "zh") == ("老渔夫的肖像，饱经风霜的皮肤。", "模糊，多余的手指")
    raw = "**Prompt:** A bowl of ramen.\n\n**Negative prompt:** soggy noodles"
    assert parse_answer(raw, QUALITY_BOOST, "en") == ("A bowl of ramen.", "soggy noodles")


def test_quality_boost_without_a_negative_gets_a_default_one():
    assert parse_answer("A bowl of ramen, steam rising.", QUALITY_BOOST, "zh") == (
        "A bowl of ramen, steam rising.", DEFAULT_NEGATIVE["zh"])
