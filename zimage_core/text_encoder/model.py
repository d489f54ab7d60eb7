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

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..checks import (
    compute_dtype,
)
from .tokenizer import QwenTokenizer, check_text

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = "<|im_start|>user\n"
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# The DiT's caption RoPE axis has 1536 positions (axes_lens[0]); captions are padded to a multiple
# of 32 and numbered from 1, and image tokens take position padded_len + 1, so padded_len <= 1504.
MAX_CAPTION_TOKENS = 1504
_TEMPLATE_TOKENS = 8  # <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6



def chat_prompt(prompt: str) -> str:
    """The text the tokenizer sees: Qwen3's chat template for one user turn plus the generation prompt."""
    return f"{TEMPLATE_PREFIX}{prompt}{TEMPLATE_SUFFIX}"


class ZImageTextEncoder:
    """Qwen3 features for Z-Image captions. `encode(prompts)` -> one (L_i, hidden) tensor per prompt.

    `model` is a transformers `Qwen3Model` holding only the layers that produce `hidden_states[-2]`
    (the last layer and the final norm are dropped; its `norm` is an Identity). An empty prompt is
    allowed: the template alone gives 8 tokens, as diffusers does for its empty negative prompt.
    `compute_dtype`: the dtype the layers compute in (None: the weights' dtype); when it differs, the
    model's Linear layers must cast their weights per call (see `load_text_encoder`).
    """

    def __init__(self, model: nn.Module, tokenizer: QwenTokenizer, *, path: str = "",
                 max_tokens: int = MAX_CAPTION_TOKENS, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.max_tokens = max_tokens
        self.compute_dtype = compute_dtype
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
        """The weights' (storage) dtype."""
        return self.model.embed_tokens.weight.dtype

    @property
    def working_dtype(self) -> torch.dtype:
        """The dtype the layers compute in, and the features' dtype: `compute_dtype`, else the weights'."""
        return self.compute_dtype if self.compute_dtype is not None else self.dtype

    @property
    def device(self) -> torch.device:
        if self._streamer is not None:
            return self._streamer.device
        return self.model.embed_tokens.weight.device

    def stream_weights(self, device: torch.device | str) -> None:
        """Low-VRAM mode ("offloaded after encoding"): the weights stay in pinned CPU memory; each
        `encode` looks up the prompt's embeddings in host memory and streams the decoder layers through
        two GPU slots (copies overlapped with compute), then frees every GPU copy, so the text encoder
        holds no GPU memory between prompts. Undo with `stop_streaming()`."""
        from ..accel.streaming import BlockStreamer
        if self._streamer is not None:
            return
        self.release_graphs()
        device = torch.device(device)
        emb = self.model.embed_tokens.weight
        pin = device.type == "cuda"
        # Already pinned (an earlier stream left it so): no second 0.8 GB copy.
        self._emb_host = emb.data if emb.data.device.type == "cpu" and (emb.data.is_pinned() or not pin) else \
            torch.empty(emb.shape, dtype=emb.dtype, pin_memory=pin).copy_(emb.data)
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

    def tokenize(self, prompts: str | Sequence[str], template: str | None = None) -> list[list[int]]:
        """Token ids per prompt, template included, cut to `max_tokens` (warning) if longer.

        `template`: another template than the chat template, a format string with one `{}` for the prompt
        (ComfyUI's `llama_template`, e.g. "{}" for text taken as written, as TextEncodeZImageOmni asks).

        Prompts must be strings of at most `tokenizer.MAX_TEXT_CHARS` characters of valid Unicode text:
        a lone UTF-16 surrogate (e.g. "\\ud800", which JSON can carry) raises ValueError naming the
        prompt's index and the character's position; it is not replaced, so what is encoded is
        always exactly what was written. Non-strings raise TypeError.
        """
        return self._token_ids(prompts, warn=True, template=template)

    def count_tokens(self, prompts: str | Sequence[str]) -> list[int]:
        """Tokens each prompt will be encoded as (chat template included, capped at `max_tokens`).

        Tokenization only, no model: cheap enough to size a memory request before `encode`. Raises
        like `tokenize` for prompts it cannot take.
        """
        return [len(ids) for ids in self._token_ids(prompts, warn=False)]

    def _token_ids(self, prompts: str | Sequence[str], *, warn: bool, template: str | None = None) -> list[list[int]]:
        prompts = _as_prompt_list(prompts)
        if self.max_tokens < _TEMPLATE_TOKENS + 1:
            raise ValueError(f"max_tokens must leave room for the prompt: at least {_TEMPLATE_TOKENS + 1} "
                             f"(the chat template alone is {_TEMPLATE_TOKENS} tokens), got {self.max_tokens}")
        out = []
        for i, prompt in enumerate(prompts):
            text = chat_prompt(prompt) if template is None else template.replace("{}", prompt, 1)
            ids = self.tokenizer.encode(text, label=f"prompt {i}")
            if template is not None:
                ids = ids[: self.max_tokens]  # no chat template to keep closed
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
        """Caption features per prompt: (L_i, hidden) in `working_dtype`, on the model's device."""
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
            # The lookup reads a few rows of the 0.8 GB table: done in host memory, so only the rows
            # travel (a gather, exact on any device).
            embeds = nn.functional.embedding(input_ids, self._emb_host).to(device)
            try:
                hidden = self._run(embeds, attention_mask)
            finally:
                self._streamer.release()
        else:
            hidden = self._run(self.model.embed_tokens(input_ids.to(device)), attention_mask)
        if len(ids) == 1:
            return [hidden[0]]
        return [hidden[row, :n].clone() for row, n in enumerate(lengths)]

    def _run(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers on the token embeddings, in the compute dtype: the rows are cast to it (exact for a
        wider dtype), and every layer computes in its input's dtype."""
        return self.model(inputs_embeds=embeds.to(self.working_dtype), attention_mask=attention_mask,
                          use_cache=False).last_hidden_state

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
                self._run(self.model.embed_tokens(static_ids), None)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = self._run(self.model.embed_tokens(static_ids), None)
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
                f"dtype={self.dtype}, compute={self.working_dtype}, device={self.device})")


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
