"""Load the Qwen3 text encoder from ComfyUI single files or a diffusers folder (see model.py for the
formats and what is loaded)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.dequant import GGUF_FORMAT, quant_layers, stored_dtype
from ..checkpoint.gguf import GGUFCheckpoint, describe_architecture, hf_name_from_llama_cpp
from ..checkpoint.io import Checkpoint, open_checkpoint
from ..checkpoint.materialise import LayerLoader, read_joined, set_param
from ..checks import (
    checkpoint_errors,
    numbered_blocks,
    real_number,
    release_on_error,
    whole_number,
)
from ..checks import compute_dtype as checked_dtype
from ..errors import CheckpointError
from .model import MAX_CAPTION_TOKENS, RMS_NORM_EPS, ROPE_THETA, ZImageTextEncoder
from .ops import manual_cast
from .tokenizer import QwenTokenizer, load_tokenizer

log = logging.getLogger(__name__)

WHAT = ("a Qwen3-4B text encoder (qwen_3_4b.safetensors with keys like "
        "model.layers.0.self_attn.q_norm.weight, or a diffusers text_encoder/ folder)")
FIX = ("Z-Image-Turbo uses Qwen3-4B: choose qwen_3_4b.safetensors (or qwen_3_4b_fp8_mixed) from "
       "models/text_encoders, or the text_encoder/ folder of Tongyi-MAI/Z-Image-Turbo.")
# Generous bounds on the Qwen3 shapes a file may declare (Qwen3-4B in brackets); each sizes the model
# that is built. Qwen3 models up to 235B stay inside them.
MAX_LAYERS = 128  # [36]
_SHAPE_LIMITS = {
    "vocab_size": (1, 1 << 20),  # [151936]
    "hidden_size": (1, 16384),  # [2560]
    "head_dim": (2, 1024),  # [128]
    "num_attention_heads": (1, 256),  # [32]
    "num_key_value_heads": (1, 256),  # [8]
    "intermediate_size": (1, 131072),  # [9728]
}


@release_on_error
def load_text_encoder(path: str | os.PathLike, *, tokenizer: QwenTokenizer | str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str = "cpu", mmap: bool = True,
                      check_interrupt: Callable[[], None] | None = None,
                      operations: Any = None, compute_dtype: torch.dtype | None = None,
                      layer_loader: LayerLoader | None = None) -> ZImageTextEncoder:
    """Load a Qwen3 text encoder for Z-Image from local files.

    `tokenizer`: a loaded `QwenTokenizer`, a tokenizer path, or None to search (see `load_tokenizer`,
    starting beside `path`). `dtype`: the weights' storage dtype; None keeps the stored dtype (fp8 storage
    -> bfloat16). `compute_dtype`: the dtype the encoder computes in (None: the storage dtype). When it
    differs from the storage dtype each layer casts its weight per call (manual cast, as ComfyUI's CLIP
    computes a bf16 file in float32): the layers are `ops.manual_cast`'s unless `operations` are given,
    which must then cast too (e.g. `comfy.ops.manual_cast`).
    Weights are assigned one tensor at a time onto a meta-initialised model (no second copy in RAM),
    each in memory of its own (never a view of the file). `mmap=False` reads with plain file reads
    (ComfyUI's --disable-mmap). `check_interrupt` is called before each tensor is read; whatever it
    raises propagates and the partly loaded model is freed.
    `operations`: a namespace whose `Linear` / `Embedding` subclass torch's (e.g. ComfyUI's `comfy.ops`);
    the model's layers take those classes, so a host that casts or streams such layers can split it.
    `layer_loader`: layers of `operations` that keep a GGUF file's block-quantised weights as they are (see
    `LayerLoader`, format "gguf"); without it they are dequantised into `dtype`.
    """
    dtype = checked_dtype(dtype, "load_text_encoder: dtype")
    compute_dtype = checked_dtype(compute_dtype, "load_text_encoder: compute_dtype")
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "text_encoder").is_dir():
        path = path / "text_encoder"  # the root of a diffusers layout
    with open_checkpoint(path, WHAT, mmap=mmap) as opened:
        ckpt = _from_gguf(opened) if isinstance(opened, GGUFCheckpoint) else opened
        prefix = _find_prefix(ckpt)
        config = _infer_config(ckpt, prefix)
        if not isinstance(tokenizer, QwenTokenizer):
            tokenizer = load_tokenizer(tokenizer, search_near=path) if tokenizer is not None \
                else load_tokenizer(search_near=path)
        if dtype is None:
            stored = ckpt.dtype(prefix + "embed_tokens.weight")
            if ckpt.block_quant:  # GGUF: the float tensors' dtype (the largest one's)
                floats = [i for k, i in ckpt.infos.items() if k not in ckpt.block_quant]
                stored = max(floats, key=lambda i: i.end - i.begin).dtype if floats else torch.bfloat16
            dtype = stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        model = _build(ckpt, prefix, config, dtype, torch.device(device), check_interrupt,
                       operations if layer_loader is not None else None, layer_loader)
    if operations is None and compute_dtype not in (None, dtype):
        operations = manual_cast
    if operations is not None and layer_loader is None:
        _use_operations(model, operations)
    return ZImageTextEncoder(model, tokenizer, path=str(path), compute_dtype=compute_dtype)


# Other Qwen3 sizes, by (hidden size, layers), named when a file is one of them: Z-Image needs Qwen3-4B's
# 2560-wide features. (Other shapes load as Qwen3 models, as from safetensors; the sampler checks the width.)
_OTHER_QWEN3 = {(1024, 28): "Qwen3-0.6B", (2048, 28): "Qwen3-1.7B", (4096, 36): "Qwen3-8B",
                (5120, 40): "Qwen3-14B", (5120, 64): "Qwen3-32B"}


def _from_gguf(ckpt: GGUFCheckpoint) -> GGUFCheckpoint:
    """A llama.cpp Qwen3 GGUF with Hugging Face key names (`blk.0.attn_q.weight` ->
    `model.layers.0.self_attn.q_proj.weight`), its RoPE theta and RMSNorm eps from the metadata; another
    architecture (or another Qwen3 size) is refused by its metadata."""
    if ckpt.architecture != "qwen3":
        fix = ("This is a diffusion model: load it with the Z-Image model loader." if ckpt.architecture == "lumina2"
               else FIX + " GGUF text encoders must be Qwen3-4B GGUFs (general.architecture 'qwen3').")
        raise CheckpointError(ckpt.path, f"{WHAT} (GGUF architecture 'qwen3')", describe_architecture(ckpt), fix)
    hidden, layers = ckpt.fields.get("qwen3.embedding_length"), ckpt.fields.get("qwen3.block_count")
    if (hidden, layers) in _OTHER_QWEN3:
        raise CheckpointError(ckpt.path, WHAT, f"{_OTHER_QWEN3[(hidden, layers)]} (hidden size {hidden}, {layers} "
                              "layers)", "Z-Image needs Qwen3-4B (hidden size 2560): choose a Qwen3-4B GGUF.")
    out = ckpt.renamed(hf_name_from_llama_cpp)
    out.config = {k: v for k, v in (("rope_theta", ckpt.fields.get("qwen3.rope.freq_base")),
                                     ("rms_norm_eps", ckpt.fields.get("qwen3.attention.layer_norm_rms_epsilon")))
                  if v is not None}
    with checkpoint_errors(ckpt.path, WHAT, FIX):
        n = numbered_blocks(out.infos, "model.layers.", "layers", max_count=MAX_LAYERS) if layers is not None else None
    if n is not None and n != layers:
        raise CheckpointError(ckpt.path, f"{WHAT} with qwen3.block_count = {layers} layers", f"{n} layers of tensors",
                              "The download is incomplete or damaged: download the file again.")
    return out


def _find_prefix(ckpt: Checkpoint) -> str:
    """The key prefix before `layers.N...` (e.g. "model." for ComfyUI files, "" for Qwen3Model saves)."""
    for key in ckpt:
        m = re.match(r"^(.*?)layers\.0\.self_attn\.q_proj\.weight$", key)
        if m and f"{m.group(1)}embed_tokens.weight" in ckpt.infos:
            prefix = m.group(1)
            if f"{prefix}layers.0.self_attn.q_norm.weight" not in ckpt.infos:
                bias = f"{prefix}layers.0.self_attn.k_proj.bias" in ckpt.infos
                raise CheckpointError(ckpt.path, WHAT,
                                      "a Qwen2/Qwen2.5 or Llama-style text encoder (no q_norm weights"
                                      + (", q/k/v biases" if bias else "") + "), not Qwen3", FIX)
            return prefix
    raise CheckpointError(ckpt.path, WHAT, _identify(ckpt), FIX)


def _identify(ckpt: Checkpoint) -> str:
    keys = list(ckpt.infos)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"text_model\.encoder\.layers\.") or has(r"^(clip_[lg]\.)?transformer\.text_model\."):
        return "a CLIP text encoder (keys text_model.encoder.layers...), used by SD/SDXL/Flux"
    if has(r"encoder\.block\.\d+\.layer\."):
        return "a T5 text encoder (keys encoder.block...)"
    if has(r"(^|\.)(cap_embedder|noise_refiner|context_refiner)\.") or has(r"layers\.0\.attention\.qkv\."):
        return ("a Z-Image diffusion transformer (keys cap_embedder/noise_refiner...); load it with the "
                "diffusion model loader instead")
    if has(r"(^|\.)(decoder\.(conv_in|up|up_blocks|mid)|encoder\.down(_blocks)?)\."):
        return "a VAE (keys encoder.down.../decoder.up...); load it with the VAE loader instead"
    if has(r"(double_blocks|single_blocks|input_blocks|joint_blocks|transformer_blocks)\."):
        return "a diffusion model, not a text encoder"
    sample = ", ".join(keys[:4])
    return f"{len(keys)} tensors with unrelated names (e.g. {sample})"


def _infer_config(ckpt: Checkpoint, prefix: str):
    def shape(name: str, ndim: int) -> tuple[int, ...]:
        key = prefix + name
        if key not in ckpt.infos:
            raise CheckpointError(ckpt.path, WHAT, f"no tensor {key!r} (incomplete checkpoint)", FIX)
        if len(ckpt.shape(key)) != ndim:
            raise CheckpointError(ckpt.path, f"{WHAT}; {key} with {ndim} dimension(s)",
                                  f"shape {tuple(ckpt.shape(key))}", FIX)
        return ckpt.shape(key)

    with checkpoint_errors(ckpt.path, WHAT, FIX):
        # Checked on key names alone, before anything is built: "layers.9999999.x" must not size a model.
        n_layers = numbered_blocks(ckpt.infos, prefix + "layers.", "layers", max_count=MAX_LAYERS)
    if n_layers < 2:
        raise CheckpointError(ckpt.path, f"{WHAT} with at least 2 decoder layers", f"{n_layers} layer(s)", FIX)
    vocab, hidden = shape("embed_tokens.weight", 2)
    (head_dim,) = shape("layers.0.self_attn.q_norm.weight", 1)
    q_out, k_out = shape("layers.0.self_attn.q_proj.weight", 2)[0], shape("layers.0.self_attn.k_proj.weight", 2)[0]
    intermediate = shape("layers.0.mlp.gate_proj.weight", 2)[0]
    if (head_dim <= 0 or q_out % head_dim or k_out % head_dim
            or shape("layers.0.self_attn.o_proj.weight", 2) != (hidden, q_out)):
        raise CheckpointError(ckpt.path, WHAT, f"inconsistent attention shapes (q_proj {q_out} rows, k_proj "
                              f"{k_out} rows, head_dim {head_dim} from q_norm)", FIX)
    sizes = {"vocab_size": vocab, "hidden_size": hidden, "head_dim": head_dim,
             "num_attention_heads": q_out // head_dim, "num_key_value_heads": k_out // head_dim,
             "intermediate_size": intermediate}
    with checkpoint_errors(ckpt.path, WHAT, FIX):
        for name, (lo, hi) in _SHAPE_LIMITS.items():
            whole_number(sizes[name], name, lo, hi)
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise CheckpointError(ckpt.path, f"{WHAT} (attention heads a multiple of key/value heads)",
                              f"{sizes['num_attention_heads']} heads and {sizes['num_key_value_heads']} "
                              "key/value heads", FIX)
    theta, eps = _rope_settings(ckpt)
    from transformers import Qwen3Config  # after the checks: a bad file fails without this import

    # Build one layer fewer than the file has: hidden_states[-2] is the second-to-last layer's output.
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers - 1,
        num_attention_heads=q_out // head_dim, num_key_value_heads=k_out // head_dim, head_dim=head_dim,
        rope_theta=theta, rms_norm_eps=eps, tie_word_embeddings=True,
        max_position_embeddings=max(40960, MAX_CAPTION_TOKENS), attention_bias=False, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    return config


class _PlacedRMSNorm(nn.Module):
    """Qwen3's RMSNorm (same math) reading its weight on the input's device: a host that splits the model
    between devices may leave these small weights elsewhere."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight.to(hidden_states.device) * x.to(input_dtype)


_PLACED_NORMS: dict[type, type] = {}


def _use_operations(model: nn.Module, operations: Any) -> None:
    """Give transformers' plain Linear/Embedding layers the host's subclasses of them (same parameters,
    same math: the subclasses only add casting hooks), and RMSNorms that follow their input's device."""
    for module in model.modules():
        if type(module).__name__ == "Qwen3RMSNorm":
            norm = type(module)
            if norm not in _PLACED_NORMS:
                _PLACED_NORMS[norm] = type("PlacedQwen3RMSNorm", (_PlacedRMSNorm, norm), {})
            module.__class__ = _PLACED_NORMS[norm]
        for base in (nn.Linear, nn.Embedding):
            cls = getattr(operations, base.__name__, None)
            if type(module) is base and isinstance(cls, type) and issubclass(cls, base):
                module.__class__ = cls
                if base is nn.Embedding and "bias" not in module.__dict__ and "bias" not in module._parameters:
                    module.bias = None  # cast ops treat every layer as weight + optional bias


def _rope_settings(ckpt: Checkpoint) -> tuple[float, float]:
    """RoPE theta and RMSNorm eps: Qwen3's, or what a diffusers folder's config.json says (checked)."""
    cfg = ckpt.config or {}
    path = Path(ckpt.path) / "config.json"
    rope = cfg.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise CheckpointError(path, "a Qwen3 config.json (rope_parameters an object)",
                              f"rope_parameters = {str(rope)[:80]}", FIX)
    theta = (rope or {}).get("rope_theta", cfg.get("rope_theta", ROPE_THETA))
    with checkpoint_errors(path, "a Qwen3 config.json", FIX):
        return (real_number(theta, "rope_theta", 0.0, 1e12, lo_open=True),
                real_number(cfg.get("rms_norm_eps", RMS_NORM_EPS), "rms_norm_eps", 0.0, 1.0, lo_open=True))


def _build(ckpt: Checkpoint, prefix: str, config, dtype: torch.dtype, device: torch.device,
           check_interrupt: Callable[[], None] | None = None, operations: Any = None,
           layer_loader: LayerLoader | None = None) -> nn.Module:
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    with torch.device("meta"):
        model = Qwen3Model(config)
    model.norm = nn.Identity()  # hidden_states[-2] is taken before the final norm
    params = list(model.named_parameters())
    missing = [prefix + name for name, _ in params if prefix + name not in ckpt.infos]
    if missing:
        raise CheckpointError(ckpt.path, WHAT, f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}",
                              "The file is incomplete or not a Qwen3 model. " + FIX)
    if operations is not None:
        _use_operations(model, operations)  # before loading: layers that keep quantised weights read them
    assign(ckpt, {prefix + name: (model, name) for name, _ in params}, dtype, device, check_interrupt, layer_loader)
    # RoPE frequencies are computed, not stored: build them for real outside the meta context.
    model.rotary_emb = Qwen3RotaryEmbedding(config=config).to(device)
    model.eval()
    return model


def assign(ckpt: Checkpoint, targets: dict[str, tuple[nn.Module, str]], dtype: torch.dtype, device: torch.device,
           check_interrupt: Callable[[], None] | None = None, layer_loader: LayerLoader | None = None) -> None:
    """Set each target parameter (module, dotted name) from the file's tensor `key`. Shapes and stored
    formats of every tensor are known from the header: all are checked before any is read. A GGUF
    block-quantised weight of a layer that `layer_loader` handles is given to that layer as it is stored."""
    layers = quant_layers(ckpt)
    stored: dict[str, torch.dtype] = {}
    for key, (module, name) in targets.items():
        shape = tuple(module.get_parameter(name).shape)
        if tuple(ckpt.shape(key)) != shape:
            raise CheckpointError(ckpt.path, f"{WHAT}; tensor {key} of shape {shape}",
                                  f"shape {tuple(ckpt.shape(key))}", FIX)
        stored[key] = stored_dtype(ckpt, key, layers, WHAT, FIX)
    for key, (module, name) in targets.items():
        if check_interrupt is not None:
            check_interrupt()
        owner_name, _, param = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if (layer_loader is not None and param == "weight" and key in ckpt.block_quant
                and layer_loader.handles(owner)):
            raw = ckpt.owned(ckpt.view(key).to(device))
            with checkpoint_errors(ckpt.path, WHAT, FIX):
                layer_loader.load(owner, owner_name, {"weight": raw},
                                  {"format": GGUF_FORMAT, "type": ckpt.block_quant[key]}, device)
            continue
        set_param(ckpt, module, name, read_joined(ckpt, (key,), stored, device), dtype=dtype, device=device)
