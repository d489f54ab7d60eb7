"""GPU benchmark of the prompt enhancer's text generation (issue 11): tokens/s of Qwen3-4B in bf16 at
batch 1 on the text encoder's weights (zimage_core.text_encoder.generate), against transformers'
`Qwen3ForCausalLM.generate` on the same weights.

Full-size random weights are made directly on the GPU (zimage_core's rule through bench/fixtures.py:
N(0, 1/fan_in) matrices, norm scales near 1; speed does not depend on the values). The encoder is built as `load_text_encoder` builds it
(35 of 36 layers, no final norm) and the LM tail (layer 36 + final norm) as `load_lm_tail` does, on
the same tensors, so nothing is copied. Random weights never say "stop", so every run generates
exactly `--new-tokens` tokens (stop tokens off).

Variants (zimage_core): `graph` (the default path on CUDA: static cache, CUDA-graph decode step),
`static` (the same step without the graph), `eager` (cache grown per step, no graph). Reference:
`hf` (transformers, dynamic cache, greedy). For each: prefill ms, decode tokens/s (tokens after the
first / decode time), whole call s, median of `--reps`; the first call (graph capture) separately.
Greedy tokens of each variant are compared with `static` (same math as `graph`: expected identical)
and with `hf` (bf16 rounding differs: the common prefix length is reported).

    python3 bench/bench_enhancer.py                      # on the GPU machine: ~1-2 min
    ZBENCH_TINY=1 ZBENCH_DEVICE=cpu .venv/bin/python bench/bench_enhancer.py --new-tokens 16 --reps 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEV = os.environ.get("ZBENCH_DEVICE", "cuda")
TINY = os.environ.get("ZBENCH_TINY") == "1"
DT = torch.bfloat16
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures as F  # noqa: E402  (shapes and the random-weight rule, from zimage_core)

QWEN3_4B = F.qwen3_4b_config()
if TINY:
    QWEN3_4B.update(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
IDEA = "一只橘猫坐在下雨的窗台上，窗外是霓虹灯闪烁的夜晚街道"


def log(*a) -> None:
    print(*a, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def random_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """HF Qwen3ForCausalLM `model.` names (without the prefix) with random values on DEV."""
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3Model(Qwen3Config(**QWEN3_4B)).state_dict().items()}
    return F.random_state_dict(shapes, seed=seed, device=DEV, dtype=DT)


def assign(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    res = model.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left or res.unexpected_keys:
        raise RuntimeError(f"weights not assigned: {left[:4]} unexpected {res.unexpected_keys[:4]}")


def build(sd: dict[str, torch.Tensor]):
    """(our CausalLM, transformers Qwen3ForCausalLM), sharing every weight tensor."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

    from zimage_core.text_encoder.generate import CausalLM
    from zimage_core.text_encoder.lm_tail import LMTail

    n = QWEN3_4B["num_hidden_layers"]
    # As load_text_encoder builds it: n - 1 layers, no final norm.
    cfg = Qwen3Config(**{**QWEN3_4B, "num_hidden_layers": n - 1})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        enc = Qwen3Model(cfg)
    enc.norm = torch.nn.Identity()
    with torch.device(DEV):
        enc.rotary_emb = type(enc.rotary_emb)(config=cfg)
    assign(enc, {k: v for k, v in sd.items() if not k.startswith(f"layers.{n - 1}.") and k != "norm.weight"})
    full = Qwen3Config(**QWEN3_4B)
    full._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = Qwen3DecoderLayer(full, n - 1)
        norm = Qwen3RMSNorm(full.hidden_size, eps=full.rms_norm_eps)
    assign(layer, {k[len(f"layers.{n - 1}."):]: v for k, v in sd.items() if k.startswith(f"layers.{n - 1}.")})
    assign(norm, {"weight": sd["norm.weight"]})
    tail = LMTail(torch.nn.ModuleList([layer]), norm, None, first_layer=n - 1)

    class _Enc:  # what CausalLM.from_encoder reads of a ZImageTextEncoder
        model = enc
        _streamer = None
    ours = CausalLM.from_encoder(_Enc(), tail)

    with torch.device("meta"):
        hf = Qwen3ForCausalLM(full)
    with torch.device(DEV):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=full)
    assign(hf.model, sd)
    hf.lm_head.weight = hf.model.embed_tokens.weight  # tied, as Qwen3-4B
    hf.eval().requires_grad_(False)
    return ours, hf


def prompt_ids() -> list[int]:
    """The enhancer's real chat for IDEA (ComfyUI's bundled tokenizer), or as many synthetic ids."""
    from zimage_core.prompt_enhancer import prompt_ids as enhancer_ids
    from zimage_core.text_encoder.tokenizer import load_tokenizer

    for cand in (REPO / ".device" / "comfy_src", REPO / ".comfyui" / "ComfyUI"):
        tok_dir = cand / "comfy" / "text_encoders" / "qwen25_tokenizer"
        if tok_dir.is_dir():
            ids, _ = enhancer_ids(load_tokenizer(tok_dir), IDEA, "enhance")
            return ids
    try:
        ids, _ = enhancer_ids(load_tokenizer(), IDEA, "enhance")
        return ids
    except Exception as e:  # noqa: BLE001
        log(f"no tokenizer ({e}); using 420 synthetic prompt ids")
        return [(i * 7919) % 150000 for i in range(420)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="graph,static,eager,hf")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/zbench_out"))
    args = ap.parse_args()
    from zimage_core.text_encoder.generate import Sampling

    env = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__}
    import transformers
    env["transformers"] = transformers.__version__
    log(env)
    t0 = time.perf_counter()
    sd = random_weights()
    ours, hf = build(sd)
    sync()
    log(f"weights: {sum(t.numel() for t in sd.values()) / 1e9:.2f} B params, built in {time.perf_counter() - t0:.1f} s")
    ids = prompt_ids()
    log(f"prompt: {len(ids)} tokens, generating {args.new_tokens}")
    greedy = Sampling()
    results, tokens = [], {}
    for variant in args.variants.split(","):
        runs = []
        for _rep in range(args.reps + 1):  # the first call includes graph capture / warm-up
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            if variant == "hf":
                x = torch.tensor([ids], device=DEV)
                tp = time.perf_counter()
                hf(input_ids=x, logits_to_keep=1)  # prefill alone, for the prefill figure
                sync()
                prefill = time.perf_counter() - tp
                t = time.perf_counter()
                out = hf.generate(x, do_sample=False, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=151643, eos_token_id=None)
                sync()
                total = time.perf_counter() - t
                toks = out[0, len(ids):].tolist()
                # generate's own prefill is as long as the separate one: decode = total - prefill
                run = dict(prefill_ms=prefill * 1e3, tokens_per_s=(len(toks) - 1) / max(total - prefill, 1e-9),
                           total_s=total, graph=False)
            else:
                ours.use_cuda_graphs = variant == "graph"
                g = ours.generate(ids, args.new_tokens, greedy, stop_ids=(), device=DEV,
                                  static_cache=variant != "eager")
                sync()
                total = time.perf_counter() - t
                toks = g.token_ids
                run = dict(prefill_ms=g.prefill_s * 1e3, tokens_per_s=g.tokens_per_s, total_s=total,
                           graph=g.cuda_graph)
            if DEV == "cuda":
                run["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
            runs.append(run)
            tokens[variant] = toks
        first, timed = runs[0], runs[1:] or runs
        row = {"variant": variant, "new_tokens": len(tokens[variant]), "graph": timed[-1]["graph"],
               "first_call_s": first["total_s"]}
        for key in ("prefill_ms", "tokens_per_s", "total_s", "peak_alloc_gib"):
            if key in timed[0]:
                row[key] = statistics.median(r[key] for r in timed)
        results.append(row)
        log(json.dumps(row))
    for variant in tokens:
        for ref in ("static", "hf"):
            if ref in tokens and ref != variant:
                log(f"greedy tokens {variant} vs {ref}: same first {common_prefix(tokens[variant], tokens[ref])} "
                    f"of {len(tokens[ref])}")
    agreement = {f"{v}_vs_{r}": common_prefix(tokens[v], tokens[r]) for v in tokens for r in ("static", "hf")
                 if r in tokens and r != v}
    log("\n| variant | prefill ms | decode tokens/s | whole call s | first call s | peak GiB |")
    log("|---|---|---|---|---|---|")
    for r in results:
        log(f"| {r['variant']}{' (CUDA graph)' if r['graph'] else ''} | {r['prefill_ms']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['total_s']:.2f} | {r['first_call_s']:.2f} | "
            f"{r.get('peak_alloc_gib', float('nan')):.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_enhancer.json").write_text(json.dumps(
        {"env": env, "prompt_tokens": len(ids), "results": results, "agreement": agreement}, indent=1))
    log(f"wrote {out / 'bench_enhancer.json'}")


if __name__ == "__main__":
    main()
