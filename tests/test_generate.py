"""The text encoder as a causal LM (zimage_core.text_encoder.generate / lm_tail) against transformers.

Reference: `Qwen3ForCausalLM.generate` (greedy) on the same random weights and the same chat template
(the template itself checked against Qwen3's own Jinja template). Our side loads the weights the way
users have them: `load_text_encoder` (35 of 36 layers, no final norm) + `load_lm_tail` from the file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lm_fixtures import STOP_IDS, hf_greedy, lively_causal_lm
from tests.text_fixtures import (
    qtc_tokenizer_json,
    save_comfy_file,
    save_comfy_fp8_file,
    save_diffusers_layout,
)
from zimage_core.errors import CheckpointError
from zimage_core.text_encoder import (
    STOP_TOKEN_IDS,
    CausalLM,
    Sampling,
    chat_text,
    load_lm_tail,
    load_text_encoder,
    load_tokenizer,
    manual_cast,
)

IDEA = "a red fox in the snow at golden hour"
NEW = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qtc_tokenizer_json())


@pytest.fixture(scope="module")
def lm():
    return lively_causal_lm(0)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    # A short instruction keeps the prefill cheap (the enhancer's own instructions: test_prompt_enhancer.py).
    return tokenizer.encode(chat_text(IDEA, "Describe this picture in detail."))


@pytest.fixture(scope="module")
def comfy_file(lm, tmp_path_factory):
    return save_comfy_file(lm, tmp_path_factory.mktemp("lm") / "qwen.safetensors")  # lm_head: a copy of the embedding


@pytest.fixture(scope="module")
def model(comfy_file, tokenizer) -> CausalLM:
    return ours(comfy_file, tokenizer)


@pytest.fixture(scope="module")
def ref(lm, prompt) -> list[int]:
    ref = hf_greedy(lm, prompt, NEW)
    assert len(ref) == NEW and len(set(ref)) > NEW // 2, "the reference text stops or repeats: a weak test"
    return ref


def ours(path, tokenizer, **kw) -> CausalLM:
    encoder = load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32)
    tail = load_lm_tail(path, len(encoder.model.layers), dtype=torch.float32, **kw)
    return CausalLM.from_encoder(encoder, tail)


def test_stop_tokens_are_qwen3s():
    assert list(STOP_TOKEN_IDS) == STOP_IDS


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_chat_text_is_qwen3s_template(system):
    from tests.text_fixtures import hf_tokenizer

    hf = hf_tokenizer()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": IDEA}]
    for thinking in (False, True):
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert chat_text(IDEA, system, thinking=thinking) == ref


def test_greedy_generation_matches_transformers(model, prompt, ref):
    assert model.head_weight is None, "a tied head must be the embedding, not a second copy"
    got = model.generate(prompt, NEW)
    assert got.token_ids == ref
    assert got.prompt_tokens == len(prompt) and not got.stopped
    # The fixed-size cache with a position mask (the step CUDA graphs replay) gives the same tokens.
    assert model.generate(prompt, NEW, static_cache=True).token_ids == ref


def test_diffusers_folder(tmp_path, lm, tokenizer, prompt, ref):
    path = save_diffusers_layout(lm, tmp_path / "Z-Image") / "text_encoder"  # Qwen3Model names, no lm_head
    assert ours(path, tokenizer).generate(prompt, NEW).token_ids == ref


def test_stop_token_ends_generation_as_in_transformers(lm, model, prompt, ref):
    stop = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])
    expected = hf_greedy(lm, prompt, NEW, stop_ids=[stop])
    got = model.generate(prompt, NEW, stop_ids=[stop])
    assert got.token_ids == expected and got.stopped and got.token_ids[-1] == stop and len(expected) < NEW


def test_untied_output_head_is_loaded(tmp_path, tokenizer, prompt):
    lm = lively_causal_lm(1, tied=False)
    path = save_comfy_file(lm, tmp_path / "untied.safetensors")
    model = ours(path, tokenizer)
    assert model.head_weight is not None
    assert torch.equal(model.head_weight, lm.lm_head.weight)
    assert model.generate(prompt, 24).token_ids == hf_greedy(lm, prompt, 24)


def test_fp8_file(tmp_path, lm, tokenizer, prompt):
    """ComfyUI's fp8 "mixed" file: the tail is dequantized like the encoder (checked against weights
    rounded to fp8 here), and generation matches transformers on those rounded weights."""
    from transformers import Qwen3ForCausalLM

    path = save_comfy_fp8_file(lm, tmp_path / "qwen_fp8.safetensors")
    raw = load_file(str(path))
    rounded = Qwen3ForCausalLM(lm.config).eval()
    sd = {}
    for key in lm.state_dict():
        value = raw[key].float()
        if raw[key].dtype == torch.float8_e4m3fn:
            value = value * raw[key[: -len("weight")] + "weight_scale"].float()
        sd[key] = value
    rounded.load_state_dict(sd)
    rounded.tie_weights()
    model = ours(path, tokenizer)
    last = lm.config.num_hidden_layers - 1
    assert torch.equal(model.layers[-1].attn.q_proj.weight, sd[f"model.layers.{last}.self_attn.q_proj.weight"])
    assert model.generate(prompt, 24).token_ids == hf_greedy(rounded, prompt, 24)


def test_bf16_file_generated_in_fp32_by_manual_cast(tmp_path, lm, tokenizer, prompt):
    """bf16 weights stay bf16 and generation computes in float32 (each layer casts per call): transformers'
    float32 tokens on the same bf16-rounded weights."""
    from transformers import Qwen3ForCausalLM

    path = save_comfy_file(lm, tmp_path / "qwen_bf16.safetensors", torch.bfloat16)
    rounded = Qwen3ForCausalLM(lm.config).eval()
    rounded.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    rounded.tie_weights()
    encoder = load_text_encoder(path, tokenizer=tokenizer, compute_dtype=torch.float32)
    tail = load_lm_tail(path, len(encoder.model.layers), dtype=None, operations=manual_cast)
    model = CausalLM.from_encoder(encoder, tail, compute_dtype=torch.float32)
    assert model.generate(prompt, 24).token_ids == hf_greedy(rounded, prompt, 24)
    weights = [*encoder.model.parameters(), *tail.parameters()]
    assert {p.dtype for p in weights} == {torch.bfloat16}


def test_file_without_final_norm(tmp_path, comfy_file, tokenizer):
    """A file cut down to what the encoder reads still encodes; generation says what is missing."""
    sd = {k: v for k, v in load_file(str(comfy_file)).items() if k != "model.norm.weight"}
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    encoder = load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32)
    assert encoder.encode([IDEA])[0].shape[0] > 0
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*prompt enhancer"):
        load_lm_tail(path, len(encoder.model.layers))


def test_seeded_sampling(model, prompt, ref):
    hot = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = model.generate(prompt, 12, hot, stop_ids=()).token_ids
    assert model.generate(prompt, 12, hot, stop_ids=()).token_ids == a
    others = [model.generate(prompt, 12, Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=s),
                             stop_ids=()).token_ids for s in (8, 9)]
    assert any(o != a for o in others), "the seed does not change sampled text"
    # A cut to the single most likely token is greedy decoding, whatever the seed and temperature.
    assert model.generate(prompt, 12, Sampling(temperature=1.5, top_k=1, seed=3), stop_ids=()).token_ids == ref[:12]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"seed": -1}, "seed"),
])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_bad_generate_arguments(model, prompt):
    with pytest.raises(ValueError, match="no tokens"):
        model.generate([], 4)
    with pytest.raises(ValueError, match="token ids"):
        model.generate([10**7], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, 10**6)


def test_memory_estimate_counts_the_cache(model, lm):
    cfg = lm.config
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * 1024
    assert model.memory_required(1024) > cache
    assert model.memory_required(2048) - model.memory_required(1024) >= cache  # the cache grows with the text
