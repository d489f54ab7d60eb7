"""Tiny random-weight Z-Image models in the real file formats, for demos and tests without downloads.

`write_demo_models(models_dir)` writes into a ComfyUI-style models folder:

    diffusion_models/zimage_demo_random_dit.safetensors    ComfyUI single file, `model.diffusion_model.` prefix, bf16
    text_encoders/zimage_demo_random_qwen3.safetensors     HF Qwen3ForCausalLM names (tied lm_head omitted), bf16
    vae/zimage_demo_random_ae.safetensors                  BFL ae.safetensors names, fp32

The shapes are scaled down (DiT dim 64, Qwen3 hidden 32, VAE 32 channels) but keep everything the
loaders and the real tokenizer rely on: Qwen3's full vocabulary (151,936 rows, so the real tokenizer's
ids are valid), 16 latent channels, 2×2 patches, the DiT's caption width equal to the encoder's
hidden size, head_dim split into even RoPE axes as the loader infers them. Values come from a seeded
generator, so the files are identical on every machine. Pictures made with them are noise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .transformer.model import TransformerConfig, ZImageTransformer
from .vae.model import FluxAEConfig

DEMO_VERSION = "1"
DEMO_FILES = {
    "diffusion_models": "zimage_demo_random_dit.safetensors",
    "text_encoders": "zimage_demo_random_qwen3.safetensors",
    "vae": "zimage_demo_random_ae.safetensors",
    # Fun ControlNet Union lite layout (3 control layers, inpaint channels) at the demo width.
    "model_patches": "zimage_demo_random_controlnet_lite.safetensors",
}
QWEN3_VOCAB = 151936
TEXT_HIDDEN = 32

DEMO_TRANSFORMER = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=TEXT_HIDDEN, axes_dims=(8, 12, 12))
DEMO_VAE = FluxAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def _randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values: weights ~ N(0, 1/fan_in), norm scales ~ 1, biases and pad tokens small.

    Scaled like a trained network's so activations stay finite through every layer.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        shape = tuple(state[name].shape)
        r = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("pad_token"):
            value = 0.5 * r
        elif len(shape) >= 2:  # Linear / Conv weights
            value = r / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):  # 1-D weights are norm scales
            value = 1.0 + 0.1 * r
        else:
            value = 0.02 * r
        out[name] = value.contiguous()
    return out


def demo_transformer_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI key names (no prefix), float32."""
    with torch.device("meta"):
        model = ZImageTransformer(DEMO_TRANSFORMER)
    return _randomize(model.state_dict(), seed)


def demo_text_encoder_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """HF Qwen3ForCausalLM key names (`model.…`), float32; lm_head is tied to the embedding, so omitted."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return _randomize(state, seed)


def demo_vae_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """BFL ae.safetensors key names, float32."""
    from .vae.flux_vae import FluxVAE

    with torch.device("meta"):
        model = FluxVAE(DEMO_VAE)
    return _randomize(model.state_dict(), seed)


def _is_current(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("zimage_demo") == DEMO_VERSION
    except Exception:  # noqa: BLE001 - any unreadable file is rewritten
        return False


def _save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp),
              metadata={"format": "pt", "zimage_demo": DEMO_VERSION,
                        "description": f"RANDOM demo weights ({what}); images made with them are noise"})
    os.replace(tmp, path)


def write_demo_models(models_dir: str | os.PathLike, *, prefix: str = "model.diffusion_model.") -> dict[str, str]:
    """Write the three demo files into `models_dir/<folder>/` (skipped when already there).

    Returns {ComfyUI folder name: file name}.
    """
    root = Path(models_dir)
    dit = root / "diffusion_models" / DEMO_FILES["diffusion_models"]
    if not _is_current(dit):
        state = {prefix + k: v for k, v in demo_transformer_state_dict().items()}
        _save(state, dit, torch.bfloat16, "Z-Image transformer")
    te = root / "text_encoders" / DEMO_FILES["text_encoders"]
    if not _is_current(te):
        _save(demo_text_encoder_state_dict(), te, torch.bfloat16, "Qwen3 text encoder")
    vae = root / "vae" / DEMO_FILES["vae"]
    if not _is_current(vae):
        _save(demo_vae_state_dict(), vae, torch.float32, "FLUX VAE")
    control = root / "model_patches" / DEMO_FILES["model_patches"]
    if not _is_current(control):
        from .controlnet.loading import write_random_controlnet

        write_random_controlnet(control, "lite", dim=DEMO_TRANSFORMER.dim, n_heads=DEMO_TRANSFORMER.n_heads,
                                seed=4, metadata={"zimage_demo": DEMO_VERSION, "description":
                                                  "RANDOM demo weights (Fun ControlNet lite); images are noise"})
    return dict(DEMO_FILES)


def write_random_transformer(path: str | os.PathLike, config: TransformerConfig, *, seed: int = 0,
                             prefix: str = "model.diffusion_model.", dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight transformer of any shape as a ComfyUI single file (e.g. the full-width, shallow
    model that ComfyUI's own Z-Image detection accepts, for parity tests against ComfyUI's native path)."""
    with torch.device("meta"):
        model = ZImageTransformer(config)
    state = _randomize(model.state_dict(), seed)
    path = Path(path)
    _save({prefix + k: v for k, v in state.items()}, path, dtype, "Z-Image transformer")
    return path


LORA_DIALECTS = ("comfyui", "diffusers")


def random_lora_state_dict(config: TransformerConfig, *, rank: int = 4, seed: int = 0, scale: float = 0.05,
                           dialect: str = "comfyui") -> dict[str, torch.Tensor]:
    """A random LoRA over every block's attention and feed-forward matmuls, in one of two key dialects
    that describe the SAME weight change:

    - "comfyui": `diffusion_model.<block>.attention.qkv.lora_down/lora_up.weight` + `.alpha` (fused qkv);
    - "diffusers": `diffusion_model.<block>.attention.to_q|to_k|to_v|to_out.0.lora_A/lora_B.weight` (split
      q/k/v: the rows of the fused update, sharing one down projection).
    """
    if dialect not in LORA_DIALECTS:
        raise ValueError(f"random_lora_state_dict: dialect must be one of {LORA_DIALECTS}, got {dialect!r}.")
    g = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_hidden
    targets = {"attention.qkv": (3 * dim, dim), "attention.out": (dim, dim), "feed_forward.w1": (ffn, dim),
               "feed_forward.w2": (dim, ffn), "feed_forward.w3": (ffn, dim)}
    blocks = ([f"layers.{i}" for i in range(config.n_layers)]
              + [f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in range(config.n_refiner_layers)])
    out: dict[str, torch.Tensor] = {}
    for block in blocks:
        for name, (rows, cols) in targets.items():
            down = torch.randn(rank, cols, generator=g) * scale / math.sqrt(cols) * math.sqrt(rank)
            up = torch.randn(rows, rank, generator=g) * scale
            base = f"diffusion_model.{block}.{name}"
            if dialect == "comfyui":
                out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"] = down, up
                out[f"{base}.alpha"] = torch.tensor(float(rank))
            elif name == "attention.qkv":
                for part, rows_of in zip(("to_q", "to_k", "to_v"), up.split(dim), strict=True):
                    split = f"diffusion_model.{block}.attention.{part}"
                    out[f"{split}.lora_A.weight"], out[f"{split}.lora_B.weight"] = down.clone(), rows_of.clone()
            else:
                name = "attention.to_out.0" if name == "attention.out" else name
                out[f"diffusion_model.{block}.{name}.lora_A.weight"] = down
                out[f"diffusion_model.{block}.{name}.lora_B.weight"] = up
    return out


def write_random_lora(path: str | os.PathLike, config: TransformerConfig, **kwargs) -> Path:
    """`random_lora_state_dict(config, **kwargs)` saved as a safetensors LoRA file (fp32)."""
    path = Path(path)
    _save(random_lora_state_dict(config, **kwargs), path, torch.float32, "Z-Image LoRA")
    return path
