"""Text generation with Z-Image's Qwen3-4B text encoder: the same weights, used as a causal LM.

Qwen3-4B ties its output head to its input embedding, so the text-encoder file holds a complete
instruction-tuned LLM. `CausalLM` runs it on the modules the encoder already holds (embedding,
decoder layers, RoPE) plus what the encoder never loads (the last decoder layer and the final norm,
see `lm_tail.load_lm_tail`): no second copy of the weights.

Generation: one prefill pass over the prompt fills a key/value cache, then one token per step.
Decoding on CUDA replays a CUDA graph of the whole step (a 4B model at batch 1 is otherwise bound by
~1,800 kernel launches per token); elsewhere, or if capture fails, the step runs eagerly. Greedy
decoding (temperature 0) or seeded sampling (temperature, top-k, top-p) drawn on the CPU from a
seeded generator, so a seed gives the same text on any device for the same logits.

The attention math follows transformers' `Qwen3Attention` (per-head q/k RMSNorm, rotate-half RoPE,
grouped key/value heads, SDPA) and is checked against `Qwen3ForCausalLM.generate` (tests).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import ENDOFTEXT, IM_END, IM_START, QWEN3_ADDED_TOKENS

log = logging.getLogger(__name__)

# Qwen3's generation_config: a turn ends with <|im_end|>; <|endoftext|> ends a document.
STOP_TOKEN_IDS = (QWEN3_ADDED_TOKENS[IM_END], QWEN3_ADDED_TOKENS[ENDOFTEXT])
MAX_CONTEXT = 16384  # prompt + generated tokens; Qwen3-4B is trained to 32k, the cache grows with it
_CACHE_BUCKET = 256  # static caches (and their CUDA graphs) come in lengths that are multiples of this


def chat_text(user: str, system: str | None = None, *, thinking: bool = False) -> str:
    """Qwen3's chat template for an optional system turn and one user turn, with the generation prompt.

    `thinking=False` renders what Qwen3's template renders for `enable_thinking=False`: an empty
    think block after the assistant header, so the model answers directly.
    """
    text = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    text += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    return text if thinking else text + "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (argmax, seed unused). Otherwise the
    logits / temperature are cut to the `top_k` most likely tokens (0: no cut) and to the smallest set
    whose probability reaches `top_p` (1: no cut), and a token is drawn with `seed`.
    Qwen3's recommendation for non-thinking chat: temperature 0.7, top_p 0.8, top_k 20."""

    temperature: float = 0.0
    top_k: int = 20
    top_p: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be a number between 0 and 100 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 = no cut), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be a whole number between 0 and 2**64 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


@dataclass
class Generation:
    """What `CausalLM.generate` returns. `token_ids`: the generated tokens, ending with the stop token
    if one ended the text (as transformers' `generate` returns them); `stopped`: ended by a stop token
    rather than by `max_new_tokens`."""

    token_ids: list[int]
    stopped: bool
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    cuda_graph: bool

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: tokens after the first (the prefill yields the first) per second."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


class _Layer:
    """One decoder layer's modules and attention shape, read from its weights (not a config)."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        self.layer, self.attn = layer, attn
        self.head_dim = int(attn.q_norm.weight.shape[0])
        self.n_heads = int(attn.q_proj.weight.shape[0]) // self.head_dim
        self.n_kv = int(attn.k_proj.weight.shape[0]) // self.head_dim
        self.scale = self.head_dim ** -0.5


class _KVCache:
    def __init__(self, layers: Sequence[_Layer], length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.length = length
        self.k = [torch.zeros(1, la.n_kv, length, la.head_dim, device=device, dtype=dtype) for la in layers]
        self.v = [torch.zeros_like(k) for k in self.k]


class CausalLM:
    """Qwen3 as a causal LM over existing modules: `embed` (also the output head, tied), `layers`
    (Qwen3 decoder layers), the final `norm` and the model's `rotary_emb`. `head_weight` replaces the
    tied head for a checkpoint whose lm_head differs from its embedding.

    Modules are called, not their weights read, so a host's cast/offload layers (ComfyUI's ops) work;
    only the head's weight is used directly (moved to the compute device if it is elsewhere).
    `compute_dtype`: the dtype generation computes in (activations, key/value cache); None: the
    embedding's dtype. When it differs from the weights' dtype the Linear layers must cast per call
    (`ops.manual_cast`, ComfyUI's `comfy.ops.manual_cast`).
    """

    def __init__(self, embed: nn.Module, layers: Sequence[nn.Module], norm: nn.Module, rotary_emb: nn.Module,
                 *, head_weight: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None) -> None:
        self.embed = embed
        self.layers = [_Layer(layer) for layer in layers]
        self.norm = norm
        self.rotary_emb = rotary_emb
        self.head_weight = head_weight
        self.compute_dtype = compute_dtype
        self.use_cuda_graphs = True

    @classmethod
    def from_encoder(cls, encoder, tail, *, compute_dtype: torch.dtype | None = None) -> CausalLM:
        """The LM of a `ZImageTextEncoder` (its 35 layers) completed by `tail` (`LMTail`: the layers the
        encoder does not hold and the final norm). `compute_dtype`: as the constructor's."""
        if getattr(encoder, "_streamer", None) is not None:
            raise RuntimeError("CausalLM.from_encoder: the encoder streams its weights (low-VRAM mode); "
                               "call encoder.stop_streaming() first.")
        model = encoder.model
        return cls(model.embed_tokens, list(model.layers) + list(tail.layers), tail.norm, model.rotary_emb,
                   head_weight=tail.lm_head.weight if tail.lm_head is not None else None,
                   compute_dtype=compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype generation computes in: `compute_dtype`, else the embedding's."""
        return self.compute_dtype if self.compute_dtype is not None else self.embed.weight.dtype

    def memory_required(self, total_tokens: int) -> int:
        """Bytes of device memory a generation of `total_tokens` (prompt + new) needs beside the weights:
        the key/value cache, the prefill's activations, and the logits."""
        length = -(-total_tokens // _CACHE_BUCKET) * _CACHE_BUCKET
        size = torch.finfo(self.dtype).bits // 8
        kv = sum(2 * la.n_kv * la.head_dim for la in self.layers) * length * size
        first = self.layers[0]
        width = first.layer.mlp.gate_proj.weight.shape[0]
        hidden = self.embed.weight.shape[1]
        acts = total_tokens * (3 * width + 6 * hidden + 2 * first.n_heads * first.head_dim) * size
        return kv + acts + 4 * self.vocab_size * 4

    @property
    def vocab_size(self) -> int:
        return int(self._head().shape[0])

    def _head(self) -> torch.Tensor:
        return self.head_weight if self.head_weight is not None else self.embed.weight

    # ------------------------------------------------------------------ the model
    def _rope(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..length-1, as Qwen3's rotary embedding computes them for `dtype` inputs."""
        inv = self.rotary_emb.inv_freq
        pos = torch.arange(length, device=inv.device).unsqueeze(0)
        cos, sin = self.rotary_emb(torch.empty(0, device=inv.device, dtype=dtype), pos)
        return cos[0].to(device), sin[0].to(device)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: _KVCache, keys: int | None,
                 mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Hidden state after the final norm for the last of `ids` (1, T) at positions `pos` (T,).

        Each layer writes its keys/values at `pos` into `cache`. `keys=None`: the prefill of an empty
        cache (causal attention among the T tokens). Otherwise attention covers the first `keys` cache
        entries under `mask` ((1, keys) bool, True = attend; None = all of them), for T = 1.
        """
        t = ids.shape[1]
        x = self.embed(ids).to(self.dtype)  # the rows in the compute dtype (no copy when they are in it)
        c = cos.index_select(0, pos).unsqueeze(0).unsqueeze(0)  # (1, 1, T, head_dim)
        s = sin.index_select(0, pos).unsqueeze(0).unsqueeze(0)
        for i, la in enumerate(self.layers):
            layer, attn, hd = la.layer, la.attn, la.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(1, t, la.n_heads, hd)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(1, t, la.n_kv, hd)).transpose(1, 2)
            v = attn.v_proj(h).view(1, t, la.n_kv, hd).transpose(1, 2)
            q = q * c + _rotate_half(q) * s
            k = k * c + _rotate_half(k) * s
            cache.k[i].index_copy_(2, pos, k.to(cache.k[i].dtype))
            cache.v[i].index_copy_(2, pos, v.to(cache.v[i].dtype))
            rep = la.n_heads // la.n_kv
            if keys is None:
                # Prefill: key/value heads repeated for their query heads (transformers' repeat_kv
                # order: query head h reads key/value head h // rep), causal.
                o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                   is_causal=t > 1, scale=la.scale)
            else:
                # One new token: the query heads sharing a key/value head become rows of one query
                # block against that head's cached keys, so the cache is never copied.
                qg, kc, vc = q.reshape(1, la.n_kv, rep, hd), cache.k[i][:, :, :keys], cache.v[i][:, :, :keys]
                if mask is None:
                    o = F.scaled_dot_product_attention(qg, kc, vc, scale=la.scale)
                else:
                    # The masked fixed-size step (CUDA graphs): plain matmuls and a float32 softmax, as
                    # transformers' eager attention, so no fused kernel's mask support decides capture.
                    scores = torch.matmul(qg, kc.transpose(-1, -2)) * la.scale
                    scores = scores.float().masked_fill(~mask, float("-inf"))
                    o = torch.matmul(torch.softmax(scores, dim=-1).to(vc.dtype), vc)
            o = o.reshape(1, la.n_heads, t, hd).transpose(1, 2).reshape(1, t, la.n_heads * hd)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x[:, -1:])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self._head()
        if w.device != hidden.device or w.dtype != hidden.dtype:
            w = w.to(hidden.device, hidden.dtype)  # an offloaded embedding (a host's low-VRAM mode)
        # transformers computes the head in the model's dtype and scores in float32.
        return F.linear(hidden[:, -1], w).float()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY, *,
                 stop_ids: Sequence[int] = STOP_TOKEN_IDS, device: torch.device | str | None = None,
                 static_cache: bool | None = None,
                 callback: Callable[[int, int], None] | None = None) -> Generation:
        """Generate up to `max_new_tokens` tokens after `prompt_ids` (a full chat text's ids).

        `device`: where to compute (default: the embedding's device). `static_cache`: attend over a
        fixed-size cache with a mask (the CUDA-graph step; default on CUDA) instead of the cache's
        filled part. `callback(i, token_id)` is called after each token; whatever it raises (e.g. a
        host's cancel) stops generation and propagates.
        """
        ids = [int(i) for i in prompt_ids]
        vocab = self.vocab_size
        if not ids:
            raise ValueError("generate: the prompt has no tokens.")
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"generate: token ids must be in [0, {vocab}).")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens > MAX_CONTEXT:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) is more "
                             f"than {MAX_CONTEXT} tokens; shorten the text or lower max_new_tokens.")
        device = torch.device(device) if device is not None else self.embed.weight.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = self.dtype
        if static_cache is None:
            static_cache = device.type == "cuda"
        stops = {int(s) for s in stop_ids}
        total = len(ids) + max_new_tokens
        length = -(-total // _CACHE_BUCKET) * _CACHE_BUCKET if static_cache else total
        cache = _KVCache(self.layers, length, device, dtype)
        cos, sin = self._rope(length, device, dtype)
        gen = torch.Generator().manual_seed(sampling.seed) if not sampling.greedy else None

        t0 = time.perf_counter()
        n = len(ids)
        pos = torch.arange(n, device=device)
        hidden = self._forward(torch.tensor([ids], device=device), pos, cache, None, None, cos, sin)
        token = _choose(self._logits(hidden), sampling, gen)
        prefill_s = time.perf_counter() - t0

        out = [token]
        stopped = token in stops
        step = None
        t1 = time.perf_counter()
        if callback is not None:
            callback(0, token)
        try:
            while not stopped and len(out) < max_new_tokens:
                p = n + len(out) - 1  # position of the token being fed
                if step is None:
                    step = _DecodeStep(self, cache, cos, sin, static_cache, device)
                token = _choose(step(out[-1], p), sampling, gen)
                out.append(token)
                stopped = token in stops
                if callback is not None:
                    callback(len(out) - 1, token)
        finally:
            graphed = step is not None and step.graph is not None
            if step is not None:
                step.release()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return Generation(out, stopped, n, prefill_s, time.perf_counter() - t1, graphed)


class _DecodeStep:
    """One token through the model: eagerly, or by replaying a CUDA graph of the static-cache step."""

    def __init__(self, lm: CausalLM, cache: _KVCache, cos: torch.Tensor, sin: torch.Tensor,
                 static: bool, device: torch.device) -> None:
        self.lm, self.cache, self.cos, self.sin, self.static = lm, cache, cos, sin, static
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self._tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)
        self._arange = torch.arange(cache.length, device=device)
        self._capture_tried = not (static and device.type == "cuda" and lm.use_cuda_graphs
                                   and _all_on(lm, device))
        self._out: torch.Tensor | None = None

    def _static_logits(self) -> torch.Tensor:
        # The whole cache with a mask of the filled positions: fixed shapes, so it can be captured.
        mask = (self._arange <= self._pos).unsqueeze(0)  # (1, length)
        hidden = self.lm._forward(self._tok, self._pos, self.cache, self.cache.length, mask, self.cos, self.sin)
        return self.lm._logits(hidden)

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if not self.static:
            t = torch.tensor([[token]], device=self.device)
            p = torch.tensor([pos], device=self.device)
            return self.lm._logits(self.lm._forward(t, p, self.cache, pos + 1, None, self.cos, self.sin))
        self._tok.fill_(token)
        self._pos.fill_(pos)
        if not self._capture_tried:
            self._capture_tried = True
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self._out
        return self._static_logits()

    def _capture(self) -> None:
        device = self.device
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (cuBLAS handles, workspaces); rewrites the same cache entry
                    self._static_logits()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self._static_logits()
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture problem: decode eagerly instead
            log.info("Text generation: CUDA graph capture failed (%s); decoding eagerly.", exc)
            torch.cuda.synchronize(device)
            self.graph, self._out = None, None

    def release(self) -> None:
        self.graph, self._out = None, None


def _all_on(lm: CausalLM, device: torch.device) -> bool:
    """Every weight on `device`: a graph holds raw weight addresses, which a host's offloading moves."""
    mods = [lm.embed, lm.norm] + [la.layer for la in lm.layers]
    tensors = [p for m in mods for p in m.parameters()] + [lm._head()]
    return all(t.device == device for t in tensors)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _choose(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    """The next token from (1, vocab) float32 logits: argmax, or a draw on the CPU with `gen`."""
    if sampling.greedy:
        return int(torch.argmax(logits[0]))
    # In float64 with the best logit shifted to 0 before dividing: a tiny temperature (1e-300, which float32
    # rounds to 0) then sends the other scores to -inf (greedy in the limit, as it should) instead of every
    # score to ±inf or NaN ("invalid multinomial distribution").
    scores = logits[0].double()
    scores = (scores - scores.max()) / sampling.temperature
    if sampling.top_k:
        values, index = torch.topk(scores, min(sampling.top_k, scores.numel()))
    else:
        values, index = torch.sort(scores, descending=True)
    values, index = values.float().cpu(), index.cpu()
    probs = torch.softmax(values, dim=-1)
    if sampling.top_p < 1.0:
        # Keep the most likely tokens until their mass reaches top_p (always at least one).
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < sampling.top_p, probs, torch.zeros_like(probs))
    return int(index[torch.multinomial(probs, 1, generator=gen)])
