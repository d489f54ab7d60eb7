"""Qwen3 text encoder: prompt -> caption features for the Z-Image DiT.

Matches diffusers' `ZImagePipeline._encode_prompt`: the prompt is wrapped in Qwen3's chat template
(`apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`, which adds no think
block), run through transformers' `Qwen3Model`, and `hidden_states[-2]` (the output of the
second-to-last decoder layer, before the final norm) is returned per prompt with padding removed.
Every template token goes to the DiT.

Differences from diffusers, on purpose:
- No cut at 512 tokens (like ComfyUI). Captions are cut at `max_tokens` (default 1504, see
  `MAX_CAPTION_TOKENS`) with a logged warning, keeping the template's closing tokens.
- The last decoder layer and the final norm are never loaded or run: their output is not used.

Weights: ComfyUI's `qwen_3_4b*.safetensors` (HF `Qwen3ForCausalLM` names, bf16/fp16/fp32 or fp8 with
optional per-tensor scales) or a diffusers `text_encoder/` folder (sharded or not, with or without
the `model.` prefix). The config is inferred from tensor shapes; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import (
    checkpoint_errors,
    compute_dtype,
    numbered_blocks,
    real_number,
    release_on_error,
    require_float,
    whole_number,
)
from .errors import CheckpointError
from .safetensors_io import Checkpoint, open_checkpoint
from .tokenizer import QwenTokenizer, check_text, load_tokenizer

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = "<|im_start|>user\n"
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# The DiT's caption RoPE axis has 1536 positions (axes_lens[0]); captions are padded to a multiple
# of 32 and numbered from 1, and image tokens take position padded_len + 1, so padded_len <= 1504.
MAX_CAPTION_TOKENS = 1504
_TEMPLATE_TOKENS = 8  # <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6

WHAT = ("a Qwen3-4B text encoder (qwen_3_4b.safetensors with keys like "
        "model.layers.0.self_attn.q_norm.weight, or a diffusers text_encoder/ folder)")
FIX = ("Z-Image-Turbo uses Qwen3-4B: choose qwen_3_4b.safetensors (or qwen_3_4b_fp8_mixed) from "
       "models/text_encoders, or the text_encoder/ folder of Tongyi-MAI/Z-Image-Turbo.")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
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


def chat_prompt(prompt: str) -> str:
    """The text the tokenizer sees: Qwen3's chat template for one user turn plus the generation prompt."""
    return f"{TEMPLATE_PREFIX}{prompt}{TEMPLATE_SUFFIX}"


class ZImageTextEncoder:
    """Qwen3 features for Z-Image captions. `encode(prompts)` -> one (L_i, hidden) tensor per prompt.

    `model` is a transformers `Qwen3Model` holding only the layers that produce `hidden_states[-2]`
    (the last layer and the final norm are dropped; its `norm` is an Identity). An empty prompt is
    allowed: the template alone gives 8 tokens, as diffusers does for its empty negative prompt.
    """

    def __init__(self, model: nn.Module, tokenizer: QwenTokenizer, *, path: str = "",
                 max_tokens: int = MAX_CAPTION_TOKENS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.max_tokens = max_tokens
        self._suffix_ids = tokenizer.encode(TEMPLATE_SUFFIX)
        # CUDA graphs per padded length: a 4B model on a short prompt is launch-bound (~1 ms of
        # Python per layer); a replayed graph runs it at memory speed. Set False to disable.
        self.use_cuda_graphs = True
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool = None
        self._graph_ptrs: list[int] | None = None
        self._streamer = None  # BlockStreamer in low-VRAM mode (see stream_weights)
        self._emb_host: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        if self._streamer is not None:
            return self._streamer.device
        return self.model.embed_tokens.weight.device

    def stream_weights(self, device: torch.device | str) -> None:
        """Low-VRAM mode ("offloaded after encoding"): the weights stay in pinned CPU memory; each
        `encode` copies the embedding table to the GPU and streams the decoder layers through two GPU
        slots (copies overlapped with compute), then frees every GPU copy, so the text encoder holds
        no GPU memory between prompts. Undo with `stop_streaming()`."""
        from .acceleration import BlockStreamer
        if self._streamer is not None:
            return
        self.release_graphs()
        device = torch.device(device)
        emb = self.model.embed_tokens.weight
        pin = device.type == "cuda"
        self._emb_host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=pin).copy_(emb.data)
        emb.data = self._emb_host
        self.model.rotary_emb.to(device)
        self._streamer = BlockStreamer(self.model.layers, device, resident=0, wrap=False)

    def stop_streaming(self, device: torch.device | str | None = None) -> None:
        """Leave low-VRAM mode: all weights go to `device` (default: the streaming device)."""
        if self._streamer is None:
            return
        target = torch.device(device) if device is not None else self._streamer.device
        self._streamer.remove(target)
        self.model.embed_tokens.weight.data = self._emb_host.to(target)
        self.model.rotary_emb.to(target)
        self._streamer = None
        self._emb_host = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ZImageTextEncoder:
        """Move and/or cast the weights; RoPE buffers stay float32 (casting them would change results)."""
        dtype = compute_dtype(dtype, "ZImageTextEncoder.to: dtype")
        self.release_graphs()
        if dtype is not None:
            for p in self.model.parameters():
                p.data = p.data.to(dtype)
        if device is not None:
            self.release_graphs()
            self.model.to(device)
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids per prompt, template included, cut to `max_tokens` (warning) if longer.

        Prompts must be strings of at most `tokenizer.MAX_TEXT_CHARS` characters of valid Unicode text:
        a lone UTF-16 surrogate (e.g. "\\ud800", which JSON can carry) raises ValueError naming the
        prompt's index and the character's position; it is not replaced, so what is encoded is
        always exactly what was written. Non-strings raise TypeError.
        """
        return self._token_ids(prompts, warn=True)

    def count_tokens(self, prompts: str | Sequence[str]) -> list[int]:
        """Tokens each prompt will be encoded as (chat template included, capped at `max_tokens`).

        Tokenization only, no model: cheap enough to size a memory request before `encode`. Raises
        like `tokenize` for prompts it cannot take.
        """
        return [len(ids) for ids in self._token_ids(prompts, warn=False)]

    def _token_ids(self, prompts: str | Sequence[str], *, warn: bool) -> list[list[int]]:
        prompts = _as_prompt_list(prompts)
        if self.max_tokens < _TEMPLATE_TOKENS + 1:
            raise ValueError(f"max_tokens must leave room for the prompt: at least {_TEMPLATE_TOKENS + 1} "
                             f"(the chat template alone is {_TEMPLATE_TOKENS} tokens), got {self.max_tokens}")
        out = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(chat_prompt(prompt), label=f"prompt {i}")
            if len(ids) > self.max_tokens and warn:
                n = len(self._suffix_ids)
                # The template's end is its own segment (special tokens split first), so it is
                # always these ids; keep it so the DiT still sees a closed user turn.
                log.warning("Z-Image prompt %d is %d tokens with the chat template; cut to %d tokens "
                            "(the Z-Image caption limit). The end of the prompt is ignored.",
                            i, len(ids), self.max_tokens)
            if len(ids) > self.max_tokens:
                n = len(self._suffix_ids)
                ids = ids[: self.max_tokens - n] + ids[-n:]
            out.append(ids)
        return out

    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """Caption features per prompt: (L_i, hidden) in the model's dtype, on its device."""
        return self.encode_ids(self.tokenize(prompts))

    @torch.no_grad()
    def encode_ids(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Caption features for token ids from `tokenize` (template included): (L_i, hidden) each."""
        if not ids or any(not x for x in ids):
            raise ValueError("encode_ids: expected one non-empty list of token ids per prompt (from tokenize).")
        lengths = [len(x) for x in ids]
        longest = max(lengths)
        device = self.device
        input_ids = torch.full((len(ids), longest), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        # Right padding + causal attention: real tokens never see pads. Without pads the plain
        # causal path is used (no mask tensor).
        attention_mask = None if min(lengths) == longest else mask.to(device)
        if len(ids) == 1 and device.type == "cuda" and self.use_cuda_graphs:
            out = self._encode_graphed(input_ids[0])
            if out is not None:
                return [out]
        if self._streamer is not None:
            emb = self.model.embed_tokens.weight
            emb.data = self._emb_host.to(device, non_blocking=True)
            try:
                hidden = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
            finally:
                emb.data = self._emb_host
                self._streamer.release()
        else:
            hidden = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
        if len(ids) == 1:
            return [hidden[0]]
        return [hidden[row, :n].clone() for row, n in enumerate(lengths)]

    GRAPH_BUCKET = 64

    def _encode_graphed(self, ids: torch.Tensor) -> torch.Tensor | None:
        """One prompt through a CUDA graph captured for its length rounded up to GRAPH_BUCKET.

        The ids are right-padded with pad tokens; attention is causal, so real tokens never see
        the pads and their features equal an unpadded run (up to matmul rounding). Returns None
        (caller runs eagerly) if capture fails, e.g. with weights being streamed or a model that
        syncs with the host.
        """
        n = int(ids.numel())
        bucket = -(-n // self.GRAPH_BUCKET) * self.GRAPH_BUCKET
        # Graphs hold raw weight addresses: if anything moved the weights (model management,
        # offloading), recapture instead of replaying stale pointers.
        ptrs = [p.data_ptr() for p in self.model.parameters()]
        if ptrs != self._graph_ptrs:
            self.release_graphs()
            if not all(p.is_cuda for p in self.model.parameters()):
                return None
            self._graph_ptrs = ptrs
        entry = self._graphs.get(bucket)
        if entry is None:
            try:
                entry = self._capture(bucket)
            except Exception as exc:  # noqa: BLE001 - any capture problem: fall back to eager
                log.info("Text encoder CUDA graph capture failed (%s); running eagerly.", exc)
                self.use_cuda_graphs = False
                torch.cuda.synchronize(self.device)
                return None
            self._graphs[bucket] = entry
        graph, static_ids, static_out = entry
        static_ids.fill_(self.tokenizer.pad_id)
        static_ids[0, :n].copy_(ids, non_blocking=True)
        graph.replay()
        return static_out[0, :n].clone()

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        device = self.device
        static_ids = torch.full((1, length), self.tokenizer.pad_id, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS handles and workspaces exist before capture
                self.model(input_ids=static_ids, attention_mask=None, use_cache=False)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = self.model(input_ids=static_ids, attention_mask=None, use_cache=False).last_hidden_state
        return graph, static_ids, static_out

    def release_graphs(self) -> None:
        """Free the captured graphs (e.g. before moving the model off the GPU)."""
        self._graphs.clear()
        self._graph_pool = None
        self._graph_ptrs = None

    def __repr__(self) -> str:
        c = self.model.config
        return (f"ZImageTextEncoder({self.path!r}, hidden={c.hidden_size}, "
                f"layers run={c.num_hidden_layers} of {c.num_hidden_layers + 1}, "
                f"dtype={self.dtype}, device={self.device})")


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)):
        prompts = list(prompts)
    else:
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {type(prompts).__name__}.")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad or not prompts:
        raise TypeError(f"prompts must be a non-empty list of strings; got {len(prompts)} item(s)"
                        + (f" including {', '.join(sorted(set(bad)))}" if bad else ""))
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"prompt {i}")
    return prompts


@release_on_error
def load_text_encoder(path: str | os.PathLike, *, tokenizer: QwenTokenizer | str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str = "cpu", mmap: bool = True,
                      check_interrupt: Callable[[], None] | None = None,
                      operations: Any = None) -> ZImageTextEncoder:
    """Load a Qwen3 text encoder for Z-Image from local files.

    `tokenizer`: a loaded `QwenTokenizer`, a tokenizer path, or None to search (see `load_tokenizer`,
    starting beside `path`). `dtype`: None keeps the stored dtype (fp8 storage -> bfloat16).
    Weights are assigned one tensor at a time onto a meta-initialised model (no second copy in RAM),
    each in memory of its own (never a view of the file). `mmap=False` reads with plain file reads
    (ComfyUI's --disable-mmap). `check_interrupt` is called before each tensor is read; whatever it
    raises propagates and the partly loaded model is freed.
    `operations`: a namespace whose `Linear` / `Embedding` subclass torch's (e.g. ComfyUI's `comfy.ops`);
    the model's layers take those classes, so a host that casts or streams such layers can split it.
    """
    dtype = compute_dtype(dtype, "load_text_encoder: dtype")
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "text_encoder").is_dir():
        path = path / "text_encoder"  # the root of a diffusers layout
    with open_checkpoint(path, WHAT, mmap=mmap) as ckpt:
        prefix = _find_prefix(ckpt)
        config = _infer_config(ckpt, prefix)
        if not isinstance(tokenizer, QwenTokenizer):
            tokenizer = load_tokenizer(tokenizer, search_near=path) if tokenizer is not None \
                else load_tokenizer(search_near=path)
        if dtype is None:
            stored = ckpt.dtype(prefix + "embed_tokens.weight")
            dtype = stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        model = _build(ckpt, prefix, config, dtype, torch.device(device), check_interrupt)
    if operations is not None:
        _use_operations(model, operations)
    return ZImageTextEncoder(model, tokenizer, path=str(path))


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
           check_interrupt: Callable[[], None] | None = None) -> nn.Module:
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    with torch.device("meta"):
        model = Qwen3Model(config)
    model.norm = nn.Identity()  # hidden_states[-2] is taken before the final norm
    quant_layers = _quant_layers(ckpt)
    params = list(model.named_parameters())
    missing = [prefix + name for name, _ in params if prefix + name not in ckpt.infos]
    if missing:
        raise CheckpointError(ckpt.path, WHAT, f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}",
                              "The file is incomplete or not a Qwen3 model. " + FIX)
    # Shapes and types of every tensor are known from the header: check them all before reading any.
    for name, param in params:
        key = prefix + name
        if tuple(ckpt.shape(key)) != tuple(param.shape):
            raise CheckpointError(ckpt.path, f"{WHAT}; tensor {key} of shape {tuple(param.shape)}",
                                  f"shape {tuple(ckpt.shape(key))}", FIX)
        _stored_format(ckpt, key, quant_layers)
    for name, _param in params:
        if check_interrupt is not None:
            check_interrupt()
        key = prefix + name
        tensor = _dequantize(ckpt, key, quant_layers, device)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[attr] = nn.Parameter(ckpt.owned(tensor.to(device=device, dtype=dtype)),
                                                requires_grad=False)
    # RoPE frequencies are computed, not stored: build them for real outside the meta context.
    model.rotary_emb = Qwen3RotaryEmbedding(config=config).to(device)
    model.eval()
    return model


def _quant_layers(ckpt: Checkpoint) -> dict[str, str]:
    """ComfyUI "mixed" quantization metadata: layer name -> format, if the file has it."""
    raw = ckpt.metadata.get("_quantization_metadata")
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers", {})
        return {k: (v.get("format") if isinstance(v, dict) else v) for k, v in layers.items()}
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return {}


def _stored_format(ckpt: Checkpoint, key: str, quant_layers: dict[str, str]) -> torch.dtype:
    """The dtype a tensor's bytes hold: its header dtype, or fp8 for a uint8/int8 container that the
    quantization metadata describes. Anything not floating point is refused."""
    dtype = ckpt.dtype(key)
    layer = key[: -len(".weight")] if key.endswith(".weight") else None
    if dtype in (torch.uint8, torch.int8) and layer is not None:
        fmt = quant_layers.get(layer) or _comfy_quant_format(ckpt, layer)
        if fmt not in _FP8_FORMATS:
            raise CheckpointError(ckpt.path, f"{WHAT} in bf16/fp16/fp32 or fp8",
                                  f"tensor {key} stored as {dtype} with quantization format {str(fmt)[:40]!r}",
                                  "This quantization format is not supported; use the bf16 or fp8 file.")
        return _FP8_FORMATS[fmt]
    require_float(ckpt.path, key, dtype, WHAT, FIX)
    if dtype in _FP8 and layer is not None:
        for scale_key in (f"{layer}.weight_scale", f"{layer}.scale_weight"):
            if scale_key in ckpt.infos:
                require_float(ckpt.path, scale_key, ckpt.dtype(scale_key), WHAT, FIX)
    return dtype


def _dequantize(ckpt: Checkpoint, key: str, quant_layers: dict[str, str], device: torch.device) -> torch.Tensor:
    """Read one tensor; fp8 weights become float32 times their per-tensor scale, if one is stored.

    The result may still be the file's memory (a plain tensor): the caller passes it through `owned`.
    """
    stored = _stored_format(ckpt, key, quant_layers)
    tensor = ckpt.view(key)
    layer = key[: -len(".weight")] if key.endswith(".weight") else None
    if tensor.dtype != stored:
        tensor = tensor.view(stored)  # fp8 bytes in a uint8/int8 container
    if tensor.dtype not in _FP8:
        return tensor
    tensor = tensor.to(device).to(torch.float32)
    for scale_key in (f"{layer}.weight_scale", f"{layer}.scale_weight"):  # ComfyUI mixed / scaled_fp8
        if layer is not None and scale_key in ckpt.infos:
            scale = ckpt.view(scale_key).to(device=device, dtype=torch.float32)
            if scale.numel() == 1:
                tensor = tensor * scale.reshape(())
            elif scale.numel() == tensor.shape[0]:
                tensor = tensor * scale.reshape(-1, *([1] * (tensor.dim() - 1)))
            else:
                raise CheckpointError(ckpt.path, f"a per-tensor or per-row fp8 scale for {key}",
                                      f"{scale_key} of shape {tuple(scale.shape)}",
                                      "This quantization layout is not supported; use the bf16 file.")
            break
    return tensor


def _comfy_quant_format(ckpt: Checkpoint, layer: str) -> str | None:
    # Newer ComfyUI stores per-layer quantization info as a uint8 JSON tensor "<layer>.comfy_quant".
    key = f"{layer}.comfy_quant"
    if key not in ckpt.infos:
        return None
    if ckpt.dtype(key) != torch.uint8 or len(ckpt.shape(key)) != 1 or ckpt.shape(key)[0] > 1 << 16:
        return None  # a small JSON text, or not ComfyUI's marker
    try:
        return json.loads(bytes(ckpt[key].tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
