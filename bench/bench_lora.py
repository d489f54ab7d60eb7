"""LoRA apply / remove time on the full-size bf16 Z-Image transformer, through ComfyUI (issue 10).

What a user waits for when a LoRA is applied: ZImageLoraLoader (reads the file, maps its keys, builds
ComfyUI's adapters: `node_s`), then ComfyUI patching the resident model's weights on the GPU when the
sampler loads the patched clone (`apply_s`). Removing it is ComfyUI loading the plain model again
(`remove_s`), which must restore every weight bit for bit (`exact`). One LoRA file in the common kohya /
musubi layout: rank 32 on every block's q, k, v (split, landing on the fused qkv rows), out, w1, w2, w3
(34 blocks, 238 modules), with alpha. Random full-size weights built on the GPU (no 12 GB file written);
the patch arithmetic does not depend on the values.

Device (see bench/README.md; prepare `.device` and `.whl` here with bench/prepare_device.sh):
    run(command="bash bench/run_lora_device.sh", carry=[".device", ".whl"], timeout_s=600)
CPU smoke test (tiny model, seconds):
    .venv/bin/python bench/bench_lora.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_lora(torch, config, rank: int, device) -> dict:
    """kohya / musubi keys (`lora_unet_layers_0_attention_to_q.lora_down.weight`, `.alpha`), bf16."""
    dim, ffn = config.dim, config.ffn_hidden
    shapes = {"attention_to_q": (dim, dim), "attention_to_k": (dim, dim), "attention_to_v": (dim, dim),
              "attention_to_out_0": (dim, dim), "feed_forward_w1": (ffn, dim), "feed_forward_w2": (dim, ffn),
              "feed_forward_w3": (ffn, dim)}
    blocks = ([f"layers_{i}" for i in range(config.n_layers)]
              + [f"{k}_{i}" for k in ("noise_refiner", "context_refiner") for i in range(config.n_refiner_layers)])
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for b in blocks:
        for name, (rows, cols) in shapes.items():
            p = f"lora_unet_{b}_{name}"
            sd[f"{p}.lora_down.weight"] = (torch.randn(rank, cols, generator=g, device=device) / math.sqrt(cols)
                                           ).to(torch.bfloat16).cpu()
            sd[f"{p}.lora_up.weight"] = (torch.randn(rows, rank, generator=g, device=device) * 0.01
                                         ).to(torch.bfloat16).cpu()
            sd[f"{p}.alpha"] = torch.tensor(float(rank) / 2)
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weight-dtype", default="bf16", choices=["bf16", "fp8_e4m3fn_fast"])
    ap.add_argument("--comfyui-dir", help="ComfyUI source (default .device/comfy_src, else .comfyui/ComfyUI)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/zbench_lora_out"))
    ap.add_argument("--profile", action="store_true",
                    help="print where ComfyUI's load of the patched clone spends its time (cProfile, last rep)")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from bench_lowvram import _default_comfy_dir, _ensure_av

    cuda = torch.cuda.is_available() and not args.smoke
    work = Path(tempfile.mkdtemp(prefix="zbench-lora-"))
    _ensure_av(work / "stubs")
    comfy_dir = Path(args.comfyui_dir) if args.comfyui_dir else _default_comfy_dir()
    sys.path.insert(0, str(comfy_dir))
    from scripts.comfy_headless import HeadlessComfyUI

    models = work / "models"
    (models / "loras").mkdir(parents=True)
    HeadlessComfyUI(models, work / "comfy", comfyui_dir=comfy_dir, cpu=not cuda).start()
    import comfy.model_management as mm
    import comfy.ops
    import nodes
    from safetensors.torch import save_file

    core_model = next(m for n, m in sys.modules.items() if n.endswith("nodes.core_model") and
                      hasattr(m, "as_core_model"))
    from zimage_core.transformer import TransformerConfig

    config = (TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                axes_dims=(8, 12, 12)) if args.smoke else TransformerConfig())
    device = mm.get_torch_device()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = core_model.ZImageDiffusionModel(config, operations=comfy.ops.disable_weight_init, dtype=dtype,
                                            device=device)
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(1)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    model.eval().requires_grad_(False)
    if args.weight_dtype == "fp8_e4m3fn_fast":
        model.quantize_fp8()
    base = core_model.as_core_model(model, dtype, None, device, mm.unet_offload_device())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.3f} B params, {args.weight_dtype}, on {device} ({time.perf_counter() - t0:.1f} s)")

    lora_name = "zbench_lora_kohya.safetensors"
    lora_sd = _random_lora(torch, config, args.rank, device)
    save_file(lora_sd, str(models / "loras" / lora_name))
    lora_mb = sum(v.numel() * v.element_size() for v in lora_sd.values()) / 2**20
    print(f"LoRA: {len(lora_sd)} keys, rank {args.rank}, {lora_mb:.0f} MiB")

    # Time inside ComfyUI's per-weight patching (cast to float32, adapters, store back), apart from the
    # rest of load_models_gpu (memory bookkeeping, garbage collection).
    import comfy.model_patcher

    patch_time = [0.0]
    original = comfy.model_patcher.ModelPatcher.patch_weight_to_device

    def timed(self, key, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, key, *a, **k)
        finally:
            _sync(torch, device)
            patch_time[0] += time.perf_counter() - t

    comfy.model_patcher.ModelPatcher.patch_weight_to_device = timed
    mm.load_models_gpu([base], force_full_load=True)
    _sync(torch, device)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = nodes.NODE_CLASS_MAPPINGS["ZImageLoraLoader"]
    runs = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = loader().load(base, lora_name, 1.0)  # a fresh node: the file is read every time
        node_s = time.perf_counter() - t0
        patched = out["result"][0]
        _sync(torch, device)
        patch_time[0] = 0.0
        profiler = None
        if args.profile and len(runs) == args.reps - 1:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        mm.load_models_gpu([patched], force_full_load=True)
        _sync(torch, device)
        apply_s = time.perf_counter() - t0
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        weights_s = patch_time[0]
        changed = sum(not torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
        t0 = time.perf_counter()
        mm.load_models_gpu([base], force_full_load=True)
        _sync(torch, device)
        remove_s = time.perf_counter() - t0
        exact = all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
        runs.append({"node_s": node_s, "apply_s": apply_s, "patch_weights_s": weights_s, "total_s": node_s + apply_s,
                     "remove_s": remove_s,
                     "weights_changed": changed, "exact_after_remove": exact})
        print(json.dumps(runs[-1]))
        del patched, out
    summary = {k: statistics.median(r[k] for r in runs)
               for k in ("node_s", "apply_s", "patch_weights_s", "total_s", "remove_s")}
    summary.update(exact_after_remove=all(r["exact_after_remove"] for r in runs),
                   weights_changed=runs[0]["weights_changed"], rank=args.rank, lora_keys=len(lora_sd),
                   lora_mib=round(lora_mb), weight_dtype=args.weight_dtype, params=n_params,
                   device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                   runs=runs)
    print(f"\napply one LoRA (node + patch): {summary['total_s']:.3f} s (node {summary['node_s']:.3f} s, "
          f"load with patches {summary['apply_s']:.3f} s, of which patching weights {summary['patch_weights_s']:.3f} s); remove {summary['remove_s']:.3f} s, exact: "
          f"{summary['exact_after_remove']}; {summary['weights_changed']} weights changed")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench_lora_{args.weight_dtype}.json").write_text(json.dumps(summary, indent=1))
    if not summary["exact_after_remove"]:
        raise SystemExit("removing the LoRA did not restore the weights exactly")


if __name__ == "__main__":
    main()
