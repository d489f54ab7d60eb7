"""GGUF files in the real ComfyUI: a random transformer written as GGUF (ComfyUI-GGUF's layout: the
safetensors keys without the model.diffusion_model. prefix, architecture "lumina2") in a Q8_0 file and a
Q4_K_M-like mix, loaded by ZImageModelLoader and sampled by ComfyUI's KSampler, gives the latent of the same
weights dequantised by the `gguf` package (numpy reference) and saved as fp32 safetensors; a LoRA on top
(ComfyUI's LoraLoaderModelOnly) too; a Qwen3 text encoder GGUF (llama.cpp names) encodes as its dequantised
safetensors twin. fp32 on the CPU.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.comfy_harness import comfy, comfy_module
from tests.gguf_fixtures import q4_k_m_like, q8_0_mix, write_gguf
from tests.text_fixtures import tiny_causal_lm
from tests.transformer_fixtures import make_diffusers_model, to_comfy
from zimage_core.demo_weights import random_lora_state_dict, write_lora
from zimage_core.transformer import TransformerConfig

# Rows of 256 values (cap_feat_dim, dim, FFN 1024) so the K-quants apply, as in the real model.
SHAPE = dict(dim=384, n_heads=3, n_kv_heads=3, cap_feat_dim=256, axes_dims=[32, 48, 48])
CONFIG = TransformerConfig(dim=384, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=256,
                           axes_dims=(32, 48, 48), axes_lens=(256, 64, 64))
MIXES = {"Q8_0": q8_0_mix, "Q4_K_M": q4_k_m_like}
LORA = "zimage_gguf_test_lora.safetensors"


def _name(mix: str, ext: str) -> str:
    return f"zimage_gguf_test_{mix}.{ext}"


@pytest.fixture(scope="module")
def files():
    c = comfy()
    folder = c.models_dir / "diffusion_models"
    model = make_diffusers_model(seed=5, **SHAPE)
    sd = to_comfy({k: v.detach() for k, v in model.state_dict().items()}, prefix="", stray_norm_final=False)
    paths = []
    for mix, pick in MIXES.items():
        types = {k: pick(k, tuple(v.shape)) for k, v in sd.items()}
        ref = write_gguf(folder / _name(mix, "gguf"), {k: v.numpy() for k, v in sd.items()}, types, seed=3)
        # The reference: the same weights dequantised by the gguf package, ComfyUI's safetensors layout.
        save_file({"model.diffusion_model." + k: torch.from_numpy(v) for k, v in ref.items()},
                  str(folder / _name(mix, "safetensors")))
        paths += [folder / _name(mix, "gguf"), folder / _name(mix, "safetensors")]
    paths.append(write_lora(c.models_dir / "loras" / LORA,
                            random_lora_state_dict(CONFIG, rank=4, alpha=2.0, scale=0.3, seed=2)))
    yield comfy_module("nodes")
    comfy_module("comfy.model_management").unload_all_models()
    gc.collect()
    for p in paths:
        p.unlink(missing_ok=True)


def _cond() -> list:
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(1, 9, 256, generator=g), {"pooled_output": None,
                                                    "attention_mask": torch.ones(1, 9, dtype=torch.long)}]]


def _ksampler(nodes, model) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    cond = _cond()
    out = nodes.KSampler().sample(model, 7, 3, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]
    return out["samples"]


def _load(nodes, name: str):
    return nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(name, "default")[0]


def _lora(nodes, model, loader: str = "LoraLoaderModelOnly"):
    if loader == "ZImageLoraLoader":
        return nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]().load(model, LORA, 0.8)["result"][0]
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, 0.8)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_loader_lists_gguf_files(files):
    nodes = files
    choices = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert _name("Q8_0", "gguf") in choices and _name("Q4_K_M", "gguf") in choices


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_gguf_transformer_samples_as_its_dequantised_weights(files, mix):
    nodes = files
    model = _load(nodes, _name(mix, "gguf"))
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.uint8 and qkv.gguf_type in ("Q8_0", "Q5_K")  # kept quantised in memory
    reference = _load(nodes, _name(mix, "safetensors"))
    got, expected = _ksampler(nodes, model), _ksampler(nodes, reference)
    assert torch.isfinite(got).all() and expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-5, f"{mix}: max diff {(got - expected).abs().max():.2e}"


@pytest.mark.parametrize("loader", ["LoraLoaderModelOnly", "ZImageLoraLoader"])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_lora_on_gguf_equals_lora_on_dequantised(files, mix, loader):
    nodes = files
    plain = _ksampler(nodes, _load(nodes, _name(mix, "safetensors")))
    expected = _ksampler(nodes, _lora(nodes, _load(nodes, _name(mix, "safetensors")), loader))
    assert _rel(expected, plain) > 1e-3  # the LoRA changes the result ...
    got = _ksampler(nodes, _lora(nodes, _load(nodes, _name(mix, "gguf")), loader))
    assert (got - expected).abs().max() <= 1e-5, f"{mix}: max diff {(got - expected).abs().max():.2e}"  # ... alike


def test_gguf_with_lora_unpatched_after_use(files):
    """A LoRA'd clone sampled, then the plain model: the plain one has no patches left on its layers."""
    nodes = files
    base = _load(nodes, _name("Q8_0", "gguf"))
    plain = _ksampler(nodes, base)
    _ksampler(nodes, _lora(nodes, base))
    comfy_module("comfy.model_management").unload_all_models()
    assert torch.equal(_ksampler(nodes, base), plain)


# llama.cpp's names of the Qwen3 tensors (written here independently of the product's mapping).
_LLAMA = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    parts = key.split(".")  # model.layers.N.<module>.weight
    return f"blk.{parts[2]}.{_LLAMA['.'.join(parts[3:-1])]}.{parts[-1]}"


def _qwen3_twins(stem, lm, quant, fields: dict, seed: int):
    """`lm` (a tiny Qwen3) written as a llama.cpp-named GGUF file (types from `quant(name, shape)`) and as the
    safetensors file of the same weights dequantised by the gguf package. Returns both paths, the HF state
    dict and the types."""
    sd = {k: v.detach().float().numpy() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    llama = {_llama_name(k): v for k, v in sd.items()}
    types = {k: quant(k, v.shape) for k, v in llama.items()}
    gguf_path, st_path = stem.with_suffix(".gguf"), stem.with_suffix(".safetensors")
    ref = write_gguf(gguf_path, llama, types, arch="qwen3", fields=fields, seed=seed)
    inverse = {_llama_name(k): k for k in sd}
    save_file({inverse[k]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ref.items()}, str(st_path))
    return gguf_path, st_path, sd, types


def test_qwen3_gguf_text_encoder_encodes_as_its_dequantised_weights(files):
    nodes = files
    c = comfy()
    folder = c.models_dir / "text_encoders"
    lm = tiny_causal_lm(seed=3)
    cfg = lm.config
    fields = {"qwen3.block_count": cfg.num_hidden_layers, "qwen3.embedding_length": cfg.hidden_size,
              "qwen3.rope.freq_base": 1e6, "qwen3.attention.layer_norm_rms_epsilon": 1e-6}
    gguf_path, st_path, _, types = _qwen3_twins(folder / "zimage_gguf_test_qwen3", lm, q4_k_m_like, fields, seed=4)
    try:
        assert {"Q8_0", "Q6_K"} <= set(types.values())
        loader = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]()
        choices = loader.INPUT_TYPES()["required"]["text_encoder_name"][0]
        assert gguf_path.name in choices
        encode = nodes.CLIPTextEncode()
        clip = loader.load(gguf_path.name)[0]
        layer = clip.cond_stage_model.transformer.layers[0]
        assert layer.mlp.down_proj.weight.dtype == torch.uint8 and layer.mlp.down_proj.gguf_type == "Q6_K"
        got = encode.encode(clip, "a red fox in the snow")[0][0][0]
        expected = encode.encode(loader.load(st_path.name)[0], "a red fox in the snow")[0][0][0]
        assert got.shape == expected.shape and expected.abs().max() > 0.1
        assert (got - expected).abs().max() <= 1e-5
    finally:
        comfy_module("comfy.model_management").unload_all_models()
        gc.collect()
        gguf_path.unlink(missing_ok=True)
        st_path.unlink(missing_ok=True)


def test_text_encoder_lora_on_gguf_equals_lora_on_dequantised(files):
    """A Qwen3 LoRA (ZImageLoraLoader's clip part) on the GGUF text encoder encodes as on its dequantised twin."""
    from zimage_core.demo_weights import random_text_encoder_lora_state_dict

    nodes = files
    c = comfy()
    folder = c.models_dir / "text_encoders"
    lm = tiny_causal_lm(seed=6)
    fields = {"qwen3.block_count": lm.config.num_hidden_layers, "qwen3.embedding_length": lm.config.hidden_size}
    gguf_path, st_path, sd, _ = _qwen3_twins(folder / "zimage_gguf_test_qwen3_lora", lm, q8_0_mix, fields, seed=5)
    targets = {k[len("model."):-len(".weight")]: tuple(v.shape) for k, v in sd.items()
               if ".layers." in k and v.ndim == 2}
    lora = write_lora(c.models_dir / "loras" / "zimage_gguf_test_te_lora.safetensors",
                      random_text_encoder_lora_state_dict(targets, dialect="kohya", rank=4, alpha=2.0, scale=0.4,
                                                          seed=8))
    try:
        base = _load(nodes, _name("Q8_0", "gguf"))
        loader, lora_node = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"](), nodes.NODE_CLASS_MAPPINGS[
            "ZImageLoraLoader"]()
        out = {}
        for name, path in (("gguf", gguf_path), ("st", st_path)):
            clip = loader.load(path.name)[0]
            patched = lora_node.load(base, lora.name, 1.0, clip=clip, strength_clip=1.0)["result"][1]
            tokens = clip.tokenize("a lighthouse at dusk")
            out[name] = (patched.encode_from_tokens(tokens).float(), clip.encode_from_tokens(tokens).float())
        (got, got_plain), (expected, plain) = out["gguf"], out["st"]
        assert _rel(expected, plain) > 1e-2  # the LoRA changes the features ...
        assert (got - expected).abs().max() <= 1e-5  # ... on the GGUF encoder as on its dequantised twin
        assert (got_plain - plain).abs().max() <= 1e-5  # and the GGUF encoder is unpatched again afterwards
    finally:
        comfy_module("comfy.model_management").unload_all_models()
        gc.collect()
        for p in (gguf_path, st_path, lora):
            p.unlink(missing_ok=True)
