"""ZImagePromptEnhancer in a real ComfyUI: the shipped "idea -> enhanced prompt -> image" workflow, the
text shown on the node (ui.text), both ways to give it the model, errors, Cancel, shared weights.

Generation itself is checked against transformers in test_generate.py (fp32). Here the node runs on
ComfyUI's CPU device in bf16 (the CLIP's dtype there), so its text is compared with zimage_core's
generation on the same file in bf16: that checks the node's wiring (template, mode, sampling, model
management, decoding), not the math again.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from tests.comfy_harness import (
    ENHANCED_PROMPT,
    comfy,
    comfy_module,
    demo_models,
    demo_prompt,
    fresh_run,
    nodes_of,
    run_ok,
    saved_images,
)
from zimage_core.demo_weights import DEMO_FILES
from zimage_core.prompt_enhancer import enhance_prompt
from zimage_core.text_encoder import CausalLM, Sampling, load_lm_tail, load_text_encoder

NEW = 16
TE_FILE = DEMO_FILES["text_encoders"]


def enhancer_prompt(**overrides) -> dict:
    """The shipped workflow on demo weights, 64x64, a short greedy answer."""
    settings = {"ZImagePromptEnhancer__max_new_tokens": NEW, "ZImagePromptEnhancer__temperature": 0.0}
    settings.update(overrides)
    return demo_prompt(ENHANCED_PROMPT, width=64, height=64, seed=5, **settings)


def enhancer_id(prompt: dict) -> str:
    (node_id,) = nodes_of(prompt, "ZImagePromptEnhancer")
    return node_id


def expected(idea: str, mode: str, max_new_tokens: int = NEW):
    """zimage_core's enhancer on the demo text encoder file, in the node's dtype and device (CPU, bf16)."""
    path = demo_models() / "text_encoders" / TE_FILE
    encoder = load_text_encoder(path, dtype=torch.bfloat16)
    lm = CausalLM.from_encoder(encoder, load_lm_tail(path, len(encoder.model.layers), dtype=torch.bfloat16))
    return enhance_prompt(lm, encoder.tokenizer, idea, mode, max_new_tokens=max_new_tokens, sampling=Sampling())


def enhancer_module():
    cls = comfy_module("nodes").NODE_CLASS_MAPPINGS["ZImagePromptEnhancer"]
    return sys.modules[cls.__module__]


def test_workflow_idea_to_enhanced_prompt_to_image():
    prompt = enhancer_prompt()
    node = enhancer_id(prompt)
    idea = prompt[node]["inputs"]["text"]
    result = fresh_run(prompt)
    (shown,) = result.outputs[node]["text"]
    assert shown == expected(idea, "enhance").prompt and shown.strip()
    assert "negative_prompt" not in result.outputs[node]
    (image,) = saved_images(result)
    # The enhanced text is what was encoded: the same image comes from typing it into ZImageTextEncode.
    typed = copy.deepcopy(prompt)
    (encode,) = nodes_of(typed, "ZImageTextEncode")
    typed[encode]["inputs"]["text"] = shown
    del typed[node]
    (image_typed,) = saved_images(run_ok(typed))
    assert (image == image_typed).all()


@pytest.mark.parametrize("mode, idea", [
    ("quality boost", "portrait of an old fisherman"),
    ("translate to English", "一只橘猫坐在下雨的窗台上，窗外是霓虹灯"),
])
def test_modes(mode, idea):
    prompt = enhancer_prompt(ZImagePromptEnhancer__mode=mode, ZImagePromptEnhancer__text=idea)
    node = enhancer_id(prompt)
    outputs = run_ok(prompt).outputs[node]
    want = expected(idea, mode)
    assert outputs["text"] == [want.prompt]
    if mode == "quality boost":
        assert outputs["negative_prompt"] == [want.negative] and want.negative
    else:
        assert "negative_prompt" not in outputs


def test_a_vanishing_temperature_is_greedy_not_an_error():
    """temperature 1e-300 (in the widget's range) divided the logits to ±inf: "invalid multinomial distribution".
    In the limit sampling is greedy, so the answer is temperature 0's."""
    idea = "a lighthouse at dusk"
    prompt = enhancer_prompt(ZImagePromptEnhancer__text=idea, ZImagePromptEnhancer__temperature=1e-300,
                             ZImagePromptEnhancer__seed=11)
    outputs = run_ok(prompt).outputs[enhancer_id(prompt)]
    assert outputs["text"] == [expected(idea, "enhance").prompt]


def test_memory_estimate_counts_the_ideas_length(monkeypatch):
    """The device memory asked of ComfyUI covers the whole chat (instruction + idea) plus the answer: a long idea
    asks for more, at least what the LM's own estimate says for the tokens it actually processed."""
    mm = comfy_module("comfy.model_management")
    asked = []
    real = mm.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        asked.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    module = enhancer_module()
    monkeypatch.setattr(module.mm, "load_models_gpu", spy)
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    clip = nodes["ZImageTextEncoderLoader"]().load(TE_FILE)[0]
    sizes = {}
    for label, idea in (("short", "a red fox"), ("long", "a red fox in the snow at dawn, " * 500)):
        asked.clear()
        out = nodes["ZImagePromptEnhancer"]().enhance(idea, "enhance", 0, NEW, 0.0, clip=clip)
        assert out["result"][0]
        sizes[label] = asked[0]
    encoder = module._encoder_of(clip)
    lm = CausalLM.from_encoder(encoder, module._tail_of(clip, encoder).model)
    from zimage_core.prompt_enhancer import prompt_ids

    long_tokens = len(prompt_ids(encoder.tokenizer, "a red fox in the snow at dawn, " * 500, "enhance")[0])
    assert long_tokens > 4000
    assert sizes["long"] > sizes["short"]
    assert sizes["long"] >= lm.memory_required(long_tokens + NEW)


def test_text_encoder_file_by_name_instead_of_clip():
    prompt = enhancer_prompt()
    node = enhancer_id(prompt)
    with_clip = run_ok(prompt).outputs[node]["text"]
    by_name = copy.deepcopy(prompt)
    del by_name[node]["inputs"]["clip"]
    by_name[node]["inputs"]["text_encoder_name"] = TE_FILE
    assert run_ok(by_name).outputs[node]["text"] == with_clip


def test_generation_shares_the_clips_weights():
    run_ok(enhancer_prompt())
    mm = comfy_module("comfy.model_management")
    tails = list(enhancer_module()._tails.items())
    assert tails
    for encoder, tail in tails:
        lm = CausalLM.from_encoder(encoder, tail.model)
        shared = [la.layer for la in lm.layers[: len(encoder.model.layers)]]
        assert all(a is b for a, b in zip(shared, encoder.model.layers, strict=True))
        assert len(tail.model.layers) == 1 and lm.head_weight is None  # only the skipped layer + the norm
        tail_params = sum(p.numel() for p in tail.model.parameters())
        assert tail_params < 0.5 * sum(p.numel() for p in encoder.model.parameters())
    loaded = [m.model for m in mm.current_loaded_models]  # ModelPatchers
    assert any(m is tail for m in loaded for _, tail in tails), "the LM tail is not under ComfyUI's model management"


@pytest.mark.parametrize("change, message", [
    ({"text": "   "}, "idea is empty"),
    ({"clip": None}, "Connect the CLIP"),
])
def test_errors_name_the_fix(change, message):
    prompt = enhancer_prompt()
    node = enhancer_id(prompt)
    for key, value in change.items():
        if value is None:
            del prompt[node]["inputs"][key]
        else:
            prompt[node]["inputs"][key] = value
    comfy().executor.reset()
    result = comfy().run(prompt)
    assert not result.ok and message in result.error_message


def test_unknown_text_encoder_file_is_refused_when_queued():
    prompt = enhancer_prompt(ZImagePromptEnhancer__text_encoder_name="nope.safetensors")
    result = comfy().run(prompt)
    assert not result.ok and "nope.safetensors" in result.error_message and "models/text_encoders" in result.error_message


def test_cancel_stops_generation_and_next_job_runs():
    utils, nodes = comfy_module("comfy.utils"), comfy_module("nodes")
    steps = []

    def hook(value, total, preview, node_id=None):
        steps.append(value)
        nodes.interrupt_processing(True)  # Cancel as soon as the first token is reported

    prompt = enhancer_prompt(ZImagePromptEnhancer__max_new_tokens=64)
    utils.set_progress_bar_global_hook(hook)
    try:
        comfy().executor.reset()
        result = comfy().run(prompt)
    finally:
        utils.set_progress_bar_global_hook(None)
        nodes.interrupt_processing(False)
    assert not result.ok and "execution_interrupted" in [e for e, _ in result.messages]
    assert len(steps) <= 2, "generation went on after Cancel"
    run_ok(enhancer_prompt())
