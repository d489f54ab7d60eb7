"""The part of Qwen3 that the Z-Image text encoder does not load, and text generation needs.

Z-Image reads `hidden_states[-2]`, so `load_text_encoder` builds every decoder layer but the last and
no final norm. A causal LM needs them: `load_lm_tail` reads exactly those tensors (the last layer,
`norm.weight`, and `lm_head.weight` only when it differs from the embedding) from the same file, in
the same formats (bf16/fp16/fp32, fp8 with scales, ComfyUI file or diffusers folder). For Qwen3-4B
that is ~0.2 GB in bf16; the ~7.3 GB the encoder holds are shared, not copied.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.dequant import quant_layers, stored_dtype
from ..checkpoint.io import Checkpoint, open_checkpoint
from ..checks import compute_dtype
from ..errors import CheckpointError
from .loading import FIX, WHAT, _find_prefix, _infer_config, _use_operations, assign

_TIE_SAMPLE_ROWS = 64  # rows of lm_head compared with the embedding to tell a tied head from an untied one


class LMTail(nn.Module):
    """Decoder layers `first_layer`.. of the checkpoint (normally just the last), the final norm, and an
    output head for checkpoints whose head is not the input embedding (else None: tied)."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, lm_head: nn.Module | None, *, first_layer: int) -> None:
        super().__init__()
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.first_layer = first_layer


def load_lm_tail(path: str | os.PathLike, encoder_layers: int, *, dtype: torch.dtype | None = torch.bfloat16,
                 device: torch.device | str = "cpu", operations: Any = None, mmap: bool = True,
                 check_interrupt: Callable[[], None] | None = None) -> LMTail:
    """What generation needs beyond a text encoder of `encoder_layers` layers loaded from `path`.

    Raises CheckpointError naming the file when it lacks a tensor generation needs (e.g. a file cut
    down to what the encoder reads, without `model.norm.weight`): encoding still works with such a
    file, generation cannot. `dtype`, `device`, `operations`, `mmap`, `check_interrupt`: as
    `load_text_encoder` (None keeps a float dtype as stored, fp8 -> bfloat16).
    """
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

    dtype = compute_dtype(dtype, "load_lm_tail: dtype")
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    device = torch.device(device)
    with open_checkpoint(path, WHAT, mmap=mmap) as ckpt:
        prefix = _find_prefix(ckpt)
        config = _infer_config(ckpt, prefix)
        n_layers = config.num_hidden_layers + 1  # the encoder's config has one layer fewer than the file
        if not 0 < encoder_layers < n_layers:
            raise ValueError(f"load_lm_tail: encoder_layers must be between 1 and {n_layers - 1} for {path} "
                             f"({n_layers} decoder layers), got {encoder_layers}")
        config = _with_layers(config, n_layers)
        if dtype is None:
            stored = ckpt.dtype(prefix + "embed_tokens.weight")
            dtype = stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        with torch.device("meta"):
            layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(encoder_layers, n_layers))
            norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_key = _untied_head(ckpt, prefix)
        lm_head = None
        if head_key is not None:
            with torch.device("meta"):
                lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        tail = LMTail(layers, norm, lm_head, first_layer=encoder_layers)
        names = {f"layers.{encoder_layers + i}.{n}": _owner(layer, n)
                 for i, layer in enumerate(layers) for n, _ in layer.named_parameters()}
        names["norm.weight"] = (norm, "weight")
        keys = {prefix + name: target for name, target in names.items()}
        if head_key is not None:
            keys[head_key] = (lm_head, "weight")
        missing = [k for k in keys if k not in ckpt.infos]
        if missing:
            raise CheckpointError(
                ckpt.path, f"{WHAT} with every decoder layer and the final norm (text generation needs them)",
                f"no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                "The text encoder itself still works with this file (Z-Image reads the second-to-last layer); the "
                "prompt enhancer needs the complete model: use qwen_3_4b.safetensors from Comfy-Org/z_image_turbo "
                "(split_files/text_encoders) or the text_encoder/ folder of Tongyi-MAI/Z-Image-Turbo.")
        assign(ckpt, keys, dtype, device, check_interrupt)
    if operations is not None:
        _use_operations(tail, operations)
    return tail.eval()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _untied_head(ckpt: Checkpoint, prefix: str) -> str | None:
    """The key of an output head that is NOT the input embedding, or None (absent, or equal to it)."""
    base = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
    key = base + "lm_head.weight"
    if key not in ckpt.infos:
        return None
    emb_key = prefix + "embed_tokens.weight"
    if tuple(ckpt.shape(key)) != tuple(ckpt.shape(emb_key)):
        raise CheckpointError(ckpt.path, f"{WHAT}; {key} of the embedding's shape {tuple(ckpt.shape(emb_key))}",
                              f"shape {tuple(ckpt.shape(key))}", FIX)
    layers = quant_layers(ckpt)
    if stored_dtype(ckpt, key, layers, WHAT, FIX) != stored_dtype(ckpt, emb_key, layers, WHAT, FIX):
        return key
    # Saved tied heads are byte copies of the embedding: compare a spread of rows (cheap, no full read).
    n = ckpt.shape(key)[0]
    rows = sorted({round(i * (n - 1) / (_TIE_SAMPLE_ROWS - 1)) for i in range(_TIE_SAMPLE_ROWS)})
    return None if _rows(ckpt, key, rows) == _rows(ckpt, emb_key, rows) else key


def _rows(ckpt: Checkpoint, key: str, rows: list[int]) -> list[bytes]:
    """The bytes of some rows of a 2-D tensor, read directly (a view would map and read all of it)."""
    info = ckpt.infos[key]
    row_bytes = (info.end - info.begin) // info.shape[0]
    with open(info.file, "rb") as f:
        out = []
        for r in rows:
            f.seek(info.begin + r * row_bytes)
            out.append(f.read(row_bytes))
    return out


def _with_layers(config, n_layers: int):
    """A copy of a Qwen3 config with `n_layers` decoder layers (per-layer attention types extended)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = n_layers
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = list(types) + [types[-1]] * (n_layers - len(types))
    return config


