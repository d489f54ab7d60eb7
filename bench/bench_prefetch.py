"""One transformer step under ComfyUI's partial loading, with and without our prefetching of the weights it
leaves in host memory (nodes/memory.py `prefetch_context`), on full-size random bf16 weights.

For each weight budget: ComfyUI's own `ModelPatcher.patch_model(lowvram_model_memory=...)` loads the model
(what `load_models_gpu` does on a small card), then a 1024² step is timed with prefetching on and off and
compared with the fully loaded model's output (bitwise: the same bytes reach the same kernels).
Usage (device, with .device carried): python3 bench/bench_prefetch.py --out $OUT/bench_prefetch.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
import fixtures as F  # noqa: E402  (shapes from zimage_core)
from bench_nodes import _pack, _random_  # noqa: E402

from bench import import_comfy  # noqa: E402  (puts ComfyUI on sys.path)

GiB = 2**30


def _step_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budgets", default="9.5,7,4.5", help="GiB of weights ComfyUI may load (besides 'full')")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    import_comfy()
    import comfy.model_management as mm
    import comfy.ops

    _pack()
    core_model = sys.modules["ComfyUI_ZImage.nodes.core_model"]
    from zimage_core import TransformerConfig

    dev, dt, cpu = mm.get_torch_device(), torch.bfloat16, torch.device("cpu")
    dm = core_model.ZImageDiffusionModel(TransformerConfig.full(), operations=comfy.ops.disable_weight_init,
                                         dtype=dt, device=dev).eval().requires_grad_(False)
    _random_(dm)
    dm.to(cpu)
    patcher = core_model.as_core_model(dm, dt, None, dev, cpu)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(F.latent_shape(args.size), generator=g).to(dev, dt)
    t = torch.tensor([0.7], device=dev)
    ctx = torch.randn(1, 96, F.TEXT_WIDTH, generator=g).to(dev, dt)

    def step() -> torch.Tensor:
        return dm(x, t, ctx, ctx.shape[1], transformer_options={})

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
                 "model_gib": patcher.model_size() / GiB, "runs": []}
    ref = None
    for budget in ["full", *args.budgets.split(",")]:
        mem = 0 if budget == "full" else int(float(budget) * GiB)
        patcher.patch_model(device_to=dev, lowvram_model_memory=mem)
        try:
            blocks = dm.blocks()
            host = [sum(p.numel() * p.element_size() for p in b.parameters() if p.device.type == "cpu")
                    for b in blocks]
            run = {"budget_gib": budget, "loaded_gib": patcher.model.model_loaded_weight_memory / GiB,
                   "blocks_host_gib": sum(host) / GiB, "host_mib_per_block": Counter(round(b / 2**20) for b in host)}
            torch.cuda.reset_peak_memory_stats()
            for on in (True, False):
                core_model.ZImageDiffusionModel.prefetch_offloaded = on
                key = "prefetch" if on else "comfyui_cast"
                with torch.no_grad():
                    out = step().float().cpu()
                    run[key + "_ms"] = _step_ms(step, args.reps)
                if ref is None:
                    ref = out
                run[key + "_equal_full_load"] = bool(torch.equal(out, ref))
                if budget == "full":
                    break
            run["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        finally:
            core_model.ZImageDiffusionModel.prefetch_offloaded = True
            patcher.unpatch_model(device_to=cpu)
        print(json.dumps(run), flush=True)
        res["runs"].append(run)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
