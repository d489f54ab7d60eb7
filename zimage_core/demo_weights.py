"""Tiny random-weight Z-Image models in the real file formats, for demos and tests without downloads.

`write_demo_models(models_dir)` writes into a ComfyUI-style models folder:

    diffusion_models/zimage_demo_random_dit.safetensors    ComfyUI single file, `model.diffusion_model.` prefix, bf16
    text_encoders/zimage_demo_random_qwen3.safetensors     HF Qwen3ForCausalLM names (tied lm_head omitted), bf16
    vae/zimage_demo_random_ae.safetensors                  BFL ae.safetensors names, fp32
    model_patches/zimage_demo_random_controlnet_lite.safetensors   Fun ControlNet Union lite layout, bf16
    loras/zimage_demo_random_lora.safetensors              ComfyUI LoRA names (fused qkv, alpha), fp32

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

DEMO_VERSION = "2"  # 2: the demo transformer has Omni (SigLIP) layers
DEMO_FILES = {
    "diffusion_models": "zimage_demo_random_dit.safetensors",
    "text_encoders": "zimage_demo_random_qwen3.safetensors",
    "vae": "zimage_demo_random_ae.safetensors",
    # Fun ControlNet Union lite layout (3 control layers, inpaint channels) at the demo width.
    "model_patches": "zimage_demo_random_controlnet_lite.safetensors",
    # A LoRA over every transformer block, in the key names both ComfyUI's LoraLoader and ours read.
    "loras": "zimage_demo_random_lora.safetensors",
}
# The demo transformer and text encoder as GGUF (Q8_0, ComfyUI-GGUF's and llama.cpp's layouts), for workflows
# that name GGUF files.
DEMO_GGUF_FILES = {
    "diffusion_models": "zimage_demo_random_dit-Q8_0.gguf",
    "text_encoders": "zimage_demo_random_qwen3-Q8_0.gguf",
}
QWEN3_VOCAB = 151936
TEXT_HIDDEN = 32

# With Omni's SigLIP layers at the real feature width, so reference-image workflows run on the demo files.
DEMO_TRANSFORMER = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=TEXT_HIDDEN, axes_dims=(8, 12, 12), siglip_feat_dim=1152)
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
        out[name] = random_value(name, r).contiguous()
    return out


def random_value(name: str, r: torch.Tensor) -> torch.Tensor:
    """The value rule of the random weights: standard-normal draws `r` (the tensor's shape, any device)
    → the tensor named `name`. Public so the benchmarks draw full-size weights on the GPU by the same rule."""
    if name.endswith("pad_token"):
        return 0.5 * r
    if r.ndim >= 2:  # Linear / Conv weights
        return r / math.sqrt(math.prod(r.shape[1:]))
    if name.endswith("weight"):  # 1-D weights are norm scales
        return 1.0 + 0.1 * r
    return 0.02 * r


def demo_transformer_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI key names (no prefix), float32."""
    with torch.device("meta"):
        model = ZImageTransformer(DEMO_TRANSFORMER)
    state = model.state_dict()
    # The SigLIP layers draw from their own stream, so the text-to-image weights are those of demo version 1.
    siglip = {k: v for k, v in state.items() if k.startswith("siglip_")}
    return {**_randomize({k: v for k, v in state.items() if k not in siglip}, seed), **_randomize(siglip, seed + 100)}


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


def _save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, what: str,
          metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp),
              metadata={"format": "pt", "zimage_demo": DEMO_VERSION,
                        "description": f"RANDOM demo weights ({what}); images made with them are noise",
                        **(metadata or {})})
    os.replace(tmp, path)


def write_demo_models(models_dir: str | os.PathLike, *, prefix: str = "model.diffusion_model.") -> dict[str, str]:
    """Write the demo files (DEMO_FILES) into `models_dir/<folder>/` (each skipped when already there).

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
    lora = root / "loras" / DEMO_FILES["loras"]
    if not _is_current(lora):
        write_random_lora(lora, DEMO_TRANSFORMER, scale=0.5, seed=3)
    return dict(DEMO_FILES)


def write_demo_gguf_models(models_dir: str | os.PathLike) -> dict[str, str]:
    """Write the GGUF demo files (DEMO_GGUF_FILES: the demo transformer and text encoder, Q8_0) into
    `models_dir/<folder>/`, each skipped when already there. Returns {ComfyUI folder name: file name}."""
    from .checkpoint.gguf import GGUFCheckpoint, llama_cpp_name_from_hf, open_gguf, write_gguf

    root = Path(models_dir)
    note = {"zimage.demo_version": DEMO_VERSION, "general.description": "RANDOM demo weights; images are noise"}

    def current(path: Path) -> bool:
        try:
            ckpt: GGUFCheckpoint = open_gguf(path, "a demo file")
        except Exception:  # noqa: BLE001 - any unreadable file is rewritten
            return False
        return ckpt.fields.get("zimage.demo_version") == DEMO_VERSION

    dit = root / "diffusion_models" / DEMO_GGUF_FILES["diffusion_models"]
    if not current(dit):
        write_gguf(dit, demo_transformer_state_dict(), "lumina2", note)
    te = root / "text_encoders" / DEMO_GGUF_FILES["text_encoders"]
    if not current(te):
        state = demo_text_encoder_state_dict()
        hidden, layers = state["model.embed_tokens.weight"].shape[1], 1 + max(
            int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
        write_gguf(te, {llama_cpp_name_from_hf(k): v for k, v in state.items()}, "qwen3",
                   {**note, "qwen3.embedding_length": hidden, "qwen3.block_count": layers})
    return dict(DEMO_GGUF_FILES)


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


LORA_DIALECTS = ("comfyui", "diffusers", "ai-toolkit", "peft", "peft-base", "kohya", "kohya-fused", "diffsynth",
                 "lycoris")
LORA_FORMS = ("lora", "loha", "lokr")
# diffusers' spelling of the block modules a LoRA touches (split q/k/v; to_out.0).
_DIFFUSERS_NAMES = {"attention.out": "attention.to_out.0"}
_QKV = ("to_q", "to_k", "to_v")


def _lora_blocks(config: TransformerConfig) -> list[str]:
    return ([f"layers.{i}" for i in range(config.n_layers)]
            + [f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in range(config.n_refiner_layers)])


def _lora_name(dialect: str, module: str) -> tuple[str, str, str, bool]:
    """(key prefix, down suffix, up suffix, stores alpha) of `module` (diffusers or ComfyUI name) in a dialect."""
    flat = module.replace(".", "_")
    return {
        "comfyui": (f"diffusion_model.{module}", ".lora_down.weight", ".lora_up.weight", True),
        "diffusers": (f"diffusion_model.{module}", ".lora_A.weight", ".lora_B.weight", False),
        "ai-toolkit": (f"diffusion_model.{module}", ".lora_A.weight", ".lora_B.weight", False),
        "peft": (f"transformer.{module}", ".lora_A.weight", ".lora_B.weight", False),
        "peft-base": (f"base_model.model.{module}", ".lora_A.weight", ".lora_B.weight", False),
        "kohya": (f"lora_unet_{flat}", ".lora_down.weight", ".lora_up.weight", True),
        "kohya-fused": (f"lora_unet_{flat}", ".lora_down.weight", ".lora_up.weight", True),
        "diffsynth": (module, ".lora_A.default.weight", ".lora_B.default.weight", False),
        "lycoris": (f"lycoris_{flat}", ".lora_down.weight", ".lora_up.weight", True),
    }[dialect]


def random_lora_state_dict(config: TransformerConfig, *, rank: int = 4, seed: int = 0, scale: float = 0.05,
                           dialect: str = "comfyui", form: str = "lora",
                           alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA over every block's attention and feed-forward matmuls, in a trainer's real key names.

    form "lora": the SAME weight change in every dialect (same seed, rank, scale and alpha), so files of
    two dialects must patch the model identically:
    - "comfyui": `diffusion_model.<block>.attention.qkv.lora_down/lora_up.weight` + `.alpha` (fused qkv);
    - "kohya-fused": the same in kohya's spelling, `lora_unet_layers_0_attention_qkv.lora_down.weight` + alpha;
    - split q/k/v (the rows of the fused change, sharing one down projection), diffusers' module names:
      "diffusers" / "ai-toolkit" `diffusion_model.…to_q.lora_A/lora_B.weight`, "peft" `transformer.…`,
      "peft-base" `base_model.model.…`, "diffsynth" bare `layers.0.attention.to_q.lora_A.default.weight`,
      "kohya" / musubi `lora_unet_layers_0_attention_to_q.lora_down/up.weight` + alpha.
    `alpha` (default: the rank, i.e. scale 1) is stored where the dialect stores one and folded into the
    up weights where it does not.
    form "loha" (LyCORIS `hada_w1_a/b`, `hada_w2_a/b` + alpha) and "lokr" (`lokr_w1`, `lokr_w2_a/b` + alpha)
    are written per split q/k/v module with diffusers names, in dialect "lycoris" (`lycoris_layers_0_…`),
    "kohya" (`lora_unet_…`) or "diffusers" / "ai-toolkit" (`diffusion_model.…`); one seed gives the same
    change in each.
    """
    if dialect not in LORA_DIALECTS:
        raise ValueError(f"random_lora_state_dict: dialect must be one of {LORA_DIALECTS}, got {dialect!r}.")
    if form not in LORA_FORMS:
        raise ValueError(f"random_lora_state_dict: form must be one of {LORA_FORMS}, got {form!r}.")
    if form != "lora":
        return _random_lycoris(config, rank=rank, seed=seed, scale=scale, dialect=dialect, form=form, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_hidden
    targets = {"attention.qkv": (3 * dim, dim), "attention.out": (dim, dim), "feed_forward.w1": (ffn, dim),
               "feed_forward.w2": (dim, ffn), "feed_forward.w3": (ffn, dim)}
    alpha_value = float(rank if alpha is None else alpha)
    out: dict[str, torch.Tensor] = {}
    for block in _lora_blocks(config):
        for name, (rows, cols) in targets.items():
            down = torch.randn(rank, cols, generator=g) * scale / math.sqrt(cols) * math.sqrt(rank)
            up = torch.randn(rows, rank, generator=g) * scale
            fused = dialect in ("comfyui", "kohya-fused")
            stores_alpha = _lora_name(dialect, "x")[3]
            if not stores_alpha:
                up = up * (alpha_value / rank)
            if name == "attention.qkv" and not fused:
                pieces = [(f"{block}.attention.{p}", rows_of) for p, rows_of in zip(_QKV, up.split(dim), strict=True)]
            else:
                module = name if fused else _DIFFUSERS_NAMES.get(name, name)
                pieces = [(f"{block}.{module}", up)]
            for module, up_rows in pieces:
                prefix, down_suffix, up_suffix, _ = _lora_name(dialect, module)
                out[prefix + down_suffix], out[prefix + up_suffix] = down.clone(), up_rows.clone()
                if stores_alpha:
                    out[prefix + ".alpha"] = torch.tensor(alpha_value)
    return out


def _random_lycoris(config: TransformerConfig, *, rank: int, seed: int, scale: float, dialect: str, form: str,
                    alpha: float | None) -> dict[str, torch.Tensor]:
    if dialect not in ("lycoris", "kohya", "diffusers", "ai-toolkit"):
        raise ValueError(f"random_lora_state_dict: {form} files are written in dialect lycoris, kohya, diffusers "
                         f"or ai-toolkit, not {dialect!r}.")
    g = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_hidden
    targets = {**{f"attention.{p}": (dim, dim) for p in _QKV}, "attention.to_out.0": (dim, dim),
               "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn), "feed_forward.w3": (ffn, dim)}
    alpha_value = float(rank if alpha is None else alpha)
    out: dict[str, torch.Tensor] = {}
    for block in _lora_blocks(config):
        for name, (rows, cols) in targets.items():
            module = f"{block}.{name}"
            prefix = {"lycoris": f"lycoris_{module.replace('.', '_')}", "kohya": f"lora_unet_{module.replace('.', '_')}"
                      }.get(dialect, f"diffusion_model.{module}")
            if form == "loha":
                # (w1_a w1_b) ⊙ (w2_a w2_b): each factor ~ scale, so the change ~ scale².
                s = math.sqrt(scale)
                out[f"{prefix}.hada_w1_a"] = torch.randn(rows, rank, generator=g) * s
                out[f"{prefix}.hada_w1_b"] = torch.randn(rank, cols, generator=g) * s / math.sqrt(cols)
                out[f"{prefix}.hada_w2_a"] = torch.randn(rows, rank, generator=g) * s
                out[f"{prefix}.hada_w2_b"] = torch.randn(rank, cols, generator=g) * s / math.sqrt(cols)
            else:
                # kron(w1, w2_a w2_b), each side split near-square as LyCORIS / ai-toolkit do (factor -1):
                # w1 is a small full matrix, w2 is low rank.
                (m_out, k_out), (m_in, k_in) = _kron_split(rows), _kron_split(cols)
                out[f"{prefix}.lokr_w1"] = torch.randn(m_out, m_in, generator=g)
                out[f"{prefix}.lokr_w2_a"] = torch.randn(k_out, rank, generator=g) * scale
                out[f"{prefix}.lokr_w2_b"] = torch.randn(rank, k_in, generator=g) * scale / math.sqrt(cols)
            out[f"{prefix}.alpha"] = torch.tensor(alpha_value)
    return out


def _kron_split(n: int) -> tuple[int, int]:
    """n = a·b with a <= b as close as possible (LyCORIS' factorization with factor -1)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


TEXT_ENCODER_LORA_DIALECTS = ("comfyui", "kohya", "diffusers")


def random_text_encoder_lora_state_dict(shapes: dict[str, tuple[int, int]], *, rank: int = 4, seed: int = 0,
                                        scale: float = 0.05, dialect: str = "comfyui",
                                        alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA over a Qwen3 text encoder's linear layers, in one of three dialects that describe the
    same change. `shapes`: HF module name (`layers.N.self_attn.q_proj`, …) → weight shape (out, in).
    - "comfyui": `text_encoders.qwen3_4b.transformer.model.<name>.lora_up/lora_down.weight` + alpha;
    - "kohya": `lora_te_model_<name with _>.lora_up/lora_down.weight` + alpha;
    - "diffusers": `text_encoder.model.<name>.lora_A/lora_B.weight` (alpha folded into lora_B).
    """
    if dialect not in TEXT_ENCODER_LORA_DIALECTS:
        raise ValueError(f"random_text_encoder_lora_state_dict: dialect must be one of "
                         f"{TEXT_ENCODER_LORA_DIALECTS}, got {dialect!r}.")
    g = torch.Generator().manual_seed(seed)
    alpha_value = float(rank if alpha is None else alpha)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        rows, cols = shapes[name]
        down = torch.randn(rank, cols, generator=g) * scale / math.sqrt(cols) * math.sqrt(rank)
        up = torch.randn(rows, rank, generator=g) * scale
        if dialect == "diffusers":
            out[f"text_encoder.model.{name}.lora_A.weight"] = down
            out[f"text_encoder.model.{name}.lora_B.weight"] = up * (alpha_value / rank)
            continue
        prefix = (f"text_encoders.qwen3_4b.transformer.model.{name}" if dialect == "comfyui"
                  else f"lora_te_model_{name.replace('.', '_')}")
        out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = down, up
        out[f"{prefix}.alpha"] = torch.tensor(alpha_value)
    return out


def demo_text_encoder_lora_targets() -> dict[str, tuple[int, int]]:
    """The demo Qwen3's linear layers (every decoder layer in the file, the last one included)."""
    state = demo_text_encoder_state_dict()
    return {k[len("model."):-len(".weight")]: tuple(v.shape) for k, v in state.items()
            if ".layers." in k and v.ndim == 2}


def write_random_lora(path: str | os.PathLike, config: TransformerConfig, **kwargs) -> Path:
    """`random_lora_state_dict(config, **kwargs)` saved as a safetensors LoRA file (fp32)."""
    path = Path(path)
    _save(random_lora_state_dict(config, **kwargs), path, torch.float32, "Z-Image LoRA")
    return path


def write_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], *,
               metadata: dict[str, str] | None = None) -> Path:
    """A LoRA state dict (e.g. from `random_lora_state_dict`) saved as a safetensors file (fp32), with extra
    safetensors metadata (e.g. diffusers' "lora_adapter_metadata", PEFT's config as JSON)."""
    path = Path(path)
    _save(state, path, torch.float32, "Z-Image LoRA", metadata)
    return path
