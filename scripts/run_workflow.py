"""Main job: run a shipped workflow (default: text-to-image) headless in a real ComfyUI; print the PNG path.

    ./scripts/run_workflow.sh                      # setup (idempotent) + this script
    ./scripts/run_workflow.sh --models-dir ~/ComfyUI/models --prompt "a lighthouse at dusk"

The workflow file is executed as users run it: converted from the UI format to ComfyUI's API format and
queued into ComfyUI's own executor, with this pack loaded by ComfyUI's custom-node loader. If the model
files the workflow names are not in --models-dir, small random-weight demo models are synthesised (in
the real file formats) and used instead; the picture is then noise, and the script says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.comfy_headless import HeadlessComfyUI, load_workflow  # noqa: E402

DEFAULT_WORKFLOW = ROOT / "workflows" / "z_image_turbo_text_to_image.json"
LOADERS = {  # node type → (widget input, ComfyUI folder)
    "ZImageModelLoader": ("model_name", "diffusion_models"),
    "ZImageTextEncoderLoader": ("text_encoder_name", "text_encoders"),
    "ZImageVAELoader": ("vae_name", "vae"),
}


def missing_models(prompt: dict, models_dir: Path) -> list[str]:
    missing = []
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            name, folder = LOADERS[node["class_type"]]
            if not (models_dir / folder / node["inputs"][name]).is_file():
                missing.append(f"{folder}/{node['inputs'][name]}")
    return missing


def apply_overrides(prompt: dict, args: argparse.Namespace) -> None:
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "ZImageTextEncode" and args.prompt:
            inputs["text"] = args.prompt
        if kind == "ZImageEmptyLatent":
            if args.width or args.height:
                inputs["preset"] = "custom"
            inputs["width"] = args.width or inputs["width"]
            inputs["height"] = args.height or inputs["height"]
        if kind in ("ZImageTurboSampler", "ZImageImg2ImgSampler"):
            if args.seed is not None:
                inputs["seed"] = args.seed
            if args.steps:
                inputs["steps"] = args.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow JSON")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".comfyui" / "ComfyUI" / "models",
                        help="a ComfyUI models folder (with diffusion_models/, text_encoders/, vae/)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "output")
    parser.add_argument("--prompt", help="replace the workflow's prompt text")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    args = parser.parse_args(argv)

    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    models_dir = args.models_dir.resolve()
    comfy = HeadlessComfyUI(models_dir, tempfile.mkdtemp(prefix="zimage-run-"),
                            output_dir=args.output_dir.resolve(), cpu=cpu)
    # The real weights decide whether this is a demo run; check before starting ComfyUI.
    workflow = load_workflow(args.workflow)
    demo = False
    # ComfyUI warns about optional extras it cannot import (e.g. audio nodes without torchaudio); those
    # do not concern this job, so only errors are shown while it boots.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.ERROR)
    comfy.start()
    logging.getLogger().setLevel(logging.WARNING)
    prompt = comfy.to_api(workflow)
    missing = missing_models(prompt, models_dir)
    if missing:
        from zimage_core.demo_weights import write_demo_models

        demo_dir = ROOT / "demo_models"
        names = write_demo_models(demo_dir)
        print(f"NOTE: model files not found in {models_dir}: {', '.join(missing)}.")
        print("      Using small RANDOM demo weights instead (synthesised into "
              f"{demo_dir}); the picture will be noise, not a real image.")
        print("      For real images put the Z-Image-Turbo files there (see README) or pass --models-dir.")
        import folder_paths

        for folder in names:
            folder_paths.add_model_folder_path(folder, str(demo_dir / folder), is_default=True)
        for node in prompt.values():
            if node["class_type"] in LOADERS:
                name, folder = LOADERS[node["class_type"]]
                node["inputs"][name] = names[folder]
        demo = True
    apply_overrides(prompt, args)
    print(f"Running {args.workflow.name} in ComfyUI ({'CPU' if cpu else 'GPU'}) ...")
    start = time.perf_counter()
    result = comfy.run(prompt)
    if not result.ok:
        print(f"ERROR: the workflow failed: {result.error_message}", file=sys.stderr)
        return 1
    images = result.images(comfy.output_dir)
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    for path in images:
        print(f"Saved: {path}")
    if demo:
        print("(Random demo weights: the image is noise by design.)")
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
