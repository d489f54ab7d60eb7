"""ZImagePromptEnhancer in a real ComfyUI: the shipped "idea -> enhanced prompt -> image" workflow, the
text shown on the node (ui.text), both ways to give it the model, errors, Cancel, shared weights.

Reference for what the node generates: transformers' Qwen3ForCausalLM in float32 on the demo file's weights,
with the chat template rendered by transformers' tokenizer from Qwen3's own Jinja template. The node computes
in bf16 on ComfyUI's CPU device (the file's dtype), so each token it writes must be transformers' argmax given
the node's own prefix, or within bf16's reach of it (a near-tie bf16 rounding can flip). The node's tokens are
read off `CausalLM.generate` as the node calls it (a spy that returns what it returns).
"""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
from safetensors.torch import load_file

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
from tests.text_fixtures import hf_tokenizer
from zimage_core.demo_weights import DEMO_FILES
from zimage_core.prompt_enhancer.instructions import INSTRUCTIONS
from zimage_core.text_encoder import CausalLM

NEW = 16
TE_FILE = DEMO_FILES["text_encoders"]
EXACT_SHARE = 0.85  # near-ties are the exception (1 in 16 tokens here): the rest must be the argmax exactly


def enhancer_prompt(**overrides) -> dict:
    """The shipped workflow on demo weights, 64x64, a short greedy answer."""
    settings = {"ZImagePromptEnhancer__max_new_tokens": NEW, "ZImagePromptEnhancer__temperature": 0.0}
    settings.update(overrides)
    return demo_prompt(ENHANCED_PROMPT, width=64, height=64, seed=5, **settings)


def enhancer_id(prompt: dict) -> str:
    (node_id,) = nodes_of(prompt, "ZImagePromptEnhancer")
    return node_id


def enhancer_module():
    cls = comfy_module("nodes").NODE_CLASS_MAPPINGS["ZImagePromptEnhancer"]
    return sys.modules[cls.__module__]


@pytest.fixture
def generations(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) of every generation the node runs during the test."""
    cls = enhancer_module().CausalLM
    real = cls.generate
    calls = []

    def spy(self, prompt_ids, *args, **kwargs):
        result = real(self, prompt_ids, *args, **kwargs)
        calls.append(([int(i) for i in prompt_ids], list(result.token_ids)))
        return result

    monkeypatch.setattr(cls, "generate", spy)
    return calls


@functools.cache
def reference_lms():
    """transformers' Qwen3ForCausalLM on the demo file's weights, in float32 and (for the near-tie bound) bf16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sd = {k: v.float() for k, v in load_file(str(demo_models() / "text_encoders" / TE_FILE)).items()}
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[2] for k in sd if k.startswith("model.layers.")}),
        num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim, head_dim=head_dim,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)  # Qwen3's
    models = []
    for dtype in (torch.float32, torch.bfloat16):
        lm = Qwen3ForCausalLM(config).eval()
        missing, unexpected = lm.load_state_dict(sd, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        lm.tie_weights()
        models.append(lm.to(dtype))
    return tuple(models)


def reference_prompt_ids(idea: str, mode: str, language: str) -> list[int]:
    """The chat the node must send: our instruction as the system turn, the idea as the user turn, no thinking,
    rendered by transformers from Qwen3's chat template."""
    messages = [{"role": "system", "content": INSTRUCTIONS[mode][language]}, {"role": "user", "content": idea}]
    return hf_tokenizer().apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              enable_thinking=False, return_dict=False)


def check_against_reference(prompt_ids: list[int], tokens: list[int]) -> None:
    """Every generated token is transformers' float32 argmax given the prefix before it (the prompt and the
    node's earlier tokens), or a near-tie: short of it by no more than twice what bf16 moves a logit there
    (transformers in bf16 vs float32 on the same prefix)."""
    fp32, bf16 = reference_lms()
    full = torch.tensor([prompt_ids + tokens])
    rows = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tokens))  # logits predicting each new token
    with torch.no_grad():
        logits = fp32(full).logits[0, rows].double()
        logits16 = bf16(full).logits[0, rows].double()
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    short = logits.max(-1).values - chosen
    bound = 2 * (logits16 - logits).abs().amax(-1)
    bad = [(i, tokens[i], float(short[i]), float(bound[i])) for i in range(len(tokens)) if short[i] > bound[i]]
    assert not bad, f"tokens that are not the reference's argmax (position, token, short by, bound): {bad}"
    exact = float((short == 0).double().mean())
    assert exact >= EXACT_SHARE, f"only {exact:.0%} of the tokens are the reference's argmax"


def check_generation(generations, idea: str, mode: str, language: str, shown: str) -> None:
    """The node's one generation: the reference chat, tokens as the reference writes them, and the text shown is
    those tokens decoded by transformers' tokenizer (the stop token dropped)."""
    (call,) = generations
    prompt_ids, tokens = call
    assert prompt_ids == reference_prompt_ids(idea, mode, language)
    assert 0 < len(tokens) <= NEW
    check_against_reference(prompt_ids, tokens)
    text = tokens[:-1] if tokens[-1] in hf_tokenizer().convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) \
        else tokens
    assert shown == hf_tokenizer().decode(text).strip()


def test_workflow_idea_to_enhanced_prompt_to_image(generations):
    prompt = enhancer_prompt()
    node = enhancer_id(prompt)
    idea = prompt[node]["inputs"]["text"]
    result = fresh_run(prompt)
    (shown,) = result.outputs[node]["text"]
    assert shown.strip()
    check_generation(generations, idea, "enhance", "en", shown)
    assert "negative_prompt" not in result.outputs[node]
    (image,) = saved_images(result)
    # The enhanced text is what was encoded: the same image comes from typing it into ZImageTextEncode.
    typed = copy.deepcopy(prompt)
    (encode,) = nodes_of(typed, "ZImageTextEncode")
    typed[encode]["inputs"]["text"] = shown
    del typed[node]
    (image_typed,) = saved_images(run_ok(typed))
    assert (image == image_typed).all()


@pytest.mark.parametrize("mode, idea, language", [
    ("quality boost", "portrait of an old fisherman", "en"),
    ("translate to English", "一只橘猫坐在下雨的窗台上，窗外是霓虹灯", "zh"),
])
def test_modes(generations, mode, idea, language):
    prompt = enhancer_prompt(ZImagePromptEnhancer__mode=mode, ZImagePromptEnhancer__text=idea)
    node = enhancer_id(prompt)
    outputs = run_ok(prompt).outputs[node]
    (shown,) = outputs["text"]
    check_generation(generations, idea, mode, language, shown)
    if mode == "quality boost":
        # The random model writes no "Negative prompt:" part, so the node gives its default one.
        (negative,) = outputs["negative_prompt"]
        assert negative.strip() and negative not in shown
    else:
        assert "negative_prompt" not in outputs


def test_a_vanishing_temperature_is_greedy_not_an_error(generations):
    """temperature 1e-300 (in the widget's range) divided the logits to ±inf: "invalid multinomial distribution".
    In the limit sampling is greedy: every token is transformers' fp32 argmax (bf16 near-ties allowed)."""
    idea = "a lighthouse at dusk"
    prompt = enhancer_prompt(ZImagePromptEnhancer__text=idea, ZImagePromptEnhancer__temperature=1e-300,
                             ZImagePromptEnhancer__seed=11)
    (shown,) = run_ok(prompt).outputs[enhancer_id(prompt)]["text"]
    check_generation(generations, idea, "enhance", "en", shown)


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
