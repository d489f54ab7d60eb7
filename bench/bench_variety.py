"""Seed variety (ZImageSeedVariety): mean pairwise latent distance over 8 seeds, with and without.

Runs the real nodes in an in-process ComfyUI (scripts/comfy_headless.py; the pack loaded by ComfyUI's
loader): ZImageTurboSampler on one prompt for seeds 0..7, plain and behind ZImageSeedVariety at a few
strengths. For each setting it prints the mean over the 28 seed pairs of the RMS distance between final
latents (ComfyUI's raw LATENT, normalised as the transformer sees it), and the mean RMS change of each
seed's latent against the plain run (how much the node moved it). CPU is fine.

  .venv/bin/python bench/bench_variety.py                      # demo (random) weights, written to a temp dir
  .venv/bin/python bench/bench_variety.py --models-dir DIR --model z_image_turbo_bf16.safetensors \\
      --text-encoder qwen_3_4b.safetensors --size 1024            # real weights (GPU advised)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.comfy_headless import HeadlessComfyUI  # noqa: E402
from zimage_core.constants import LATENT_SCALE, LATENT_SHIFT  # noqa: E402
from zimage_core.demo_weights import DEMO_FILES, write_demo_models  # noqa: E402

SETTINGS = [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (1.0, 0.25), (1.0, 0.5)]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--model", default=DEMO_FILES["diffusion_models"])
    ap.add_argument("--text-encoder", default=DEMO_FILES["text_encoders"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zimage-bench-variety-") as tmp:
        models = args.models_dir
        if models is None:
            models = Path(tmp) / "models"
            write_demo_models(models)
        HeadlessComfyUI(models, Path(tmp) / "work").start()
        import importlib

        import comfy.utils
        import torch

        comfy.utils.PROGRESS_BAR_ENABLED = False
        nodes = importlib.import_module("nodes").NODE_CLASS_MAPPINGS
        model = nodes["ZImageModelLoader"]().load(args.model, "default")[0]
        clip = nodes["ZImageTextEncoderLoader"]().load(args.text_encoder)[0]
        (cond,) = nodes["ZImageTextEncode"]().encode(clip, PROMPT)
        latent = nodes["ZImageEmptyLatent"]().generate(args.size, args.size, "custom", 1)[0]

        def run(m, seed: int) -> torch.Tensor:
            out = nodes["ZImageTurboSampler"]().sample(m, cond, latent, seed, 8, 3.0, 0.0)[0]["samples"]
            return ((out.float() - LATENT_SHIFT) * LATENT_SCALE).flatten()  # the transformer's (normalised) space

        def rms(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).pow(2).mean().sqrt())

        plain = [run(model, s) for s in range(args.seeds)]
        results = []
        for strength, end in SETTINGS:
            t0 = time.perf_counter()
            m = nodes["ZImageSeedVariety"]().patch(model, strength, end)[0]
            lat = [run(m, s) for s in range(args.seeds)]
            pairs = [rms(a, b) for a, b in itertools.combinations(lat, 2)]
            results.append({"strength": strength, "end": end,
                            "mean_pairwise_distance": sum(pairs) / len(pairs),
                            "mean_change_vs_plain": sum(rms(a, b) for a, b in zip(lat, plain, strict=True)) / len(lat),
                            "bit_identical_to_plain": all(torch.equal(a, b) for a, b in zip(lat, plain, strict=True)),
                            "seconds": time.perf_counter() - t0})
            print(json.dumps(results[-1]), flush=True)
        pairs = [rms(a, b) for a, b in itertools.combinations(plain, 2)]
        report = {"model": args.model, "size": args.size, "seeds": args.seeds, "prompt": PROMPT,
                  "device": str(model.load_device), "plain_mean_pairwise_distance": sum(pairs) / len(pairs),
                  "with_variety": results}
        print(json.dumps(report, indent=1))
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
