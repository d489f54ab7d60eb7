"""Tiny random Qwen3 causal LMs whose greedy text is not degenerate, and transformers' reference generation.

tests/text_fixtures.py's weights (std 0.05) make a random LM repeat one token forever, which would let
a broken KV cache or position pass unnoticed; with matrices at std 0.15 every step's argmax changes.
"""

from __future__ import annotations

import torch

from tests.text_fixtures import tiny_causal_lm

STOP_IDS = [151645, 151643]  # Qwen3's generation_config eos_token_id: <|im_end|>, <|endoftext|>
PAD_ID = 151643


def lively_causal_lm(seed: int = 0, *, tied: bool = True):
    """A random tiny Qwen3ForCausalLM (tests/text_fixtures.TINY) that writes varied tokens.

    `tied=False`: an untied output head with its own random values."""
    from transformers import Qwen3ForCausalLM

    lm = tiny_causal_lm(seed)
    if not tied:
        config = lm.config
        config.tie_word_embeddings = False
        untied = Qwen3ForCausalLM(config).eval()
        untied.model.load_state_dict(lm.model.state_dict())
        lm = untied
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                if name == "lm_head.weight" and tied:
                    continue
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return lm


def hf_greedy(lm, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] | None = None) -> list[int]:
    """transformers' greedy `generate`: the new token ids (the stop token included, as it returns them)."""
    out = lm.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=list(stop_ids if stop_ids is not None else STOP_IDS), pad_token_id=PAD_ID,
                      temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()
