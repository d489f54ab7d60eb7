"""GPU benchmark of the Fun ControlNet Union overhead per denoising step (issue 9).

Full-size random weights in bf16 built on the GPU: the Z-Image transformer (bench.py's shared DiT weights)
and a ControlNet per layout (2.1: 15 control layers, lite: 3, 1.0: 6). One weight copy serves both
implementations (diffusers gets row views of the fused q/k/v). For each layout and size it times one
transformer call (one denoising step, batch 1):

- `ours`: zimage_core's transformer with the ControlNet hooks (`ControlRun`), style "diffusers" (the
  ZImageControlNetPipeline computation) and style "comfyui" (ComfyUI's ZImageFunControlnet computation);
- `diffusers`: ZImageControlNetModel(...) then ZImageTransformer2DModel(..., controlnet_block_samples);
- `comfy`: not measured: ComfyUI 0.3.75 (the version carried to the device) has no ZImage_Control /
  ZImageFunControlnet (they came in 0.3.76+), and its NextDiT has no noise_refiner/double_block patches.

Overhead = (controlled step − plain step) / plain step, against the control layers' share of the step's
FLOPs (counted analytically, 2 per MAC, matmuls + attention), target: overhead <= share × 1.1.

    python3 bench/bench_controlnet.py                         # 1024², layouts 2.1,lite,1.0, ~1-2 min on an H200
    ZBENCH_TINY=1 ZBENCH_DEVICE=cpu .venv/bin/python bench/bench_controlnet.py --sizes 64 --reps 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures as F  # noqa: E402  (shapes from zimage_core)

import bench as B  # noqa: E402  (bench.py: shared DiT weights, timing helpers)

CAP_LEN = 48  # a typical prompt's token count (padded to 64)


def control_flops(layout: str, size: int, cap_len: int, style: str) -> float:
    """FLOPs of the control tower for one step (2 per MAC): patch embed, refiner blocks, control blocks with
    before/after projections, and for the diffusers style of 2.x the re-run main refiner block."""
    from zimage_core.controlnet.model import INPAINT_CHANNELS

    d, ffn = B.DIT_CONFIG.dim, B.DIT_CONFIG.ffn_hidden
    n_img = F.image_tokens(size)
    n_pad = F.padded(n_img)
    n_cap = F.padded(cap_len)
    n_layers = {"2.1": 15, "lite": 3, "1.0": 6, "2.0": 15}[layout]
    in_ch = F.LATENT_CHANNELS if layout == "1.0" else INPAINT_CHANNELS
    img = n_pad if style == "diffusers" else n_img
    main = img + n_cap if style == "diffusers" else n_img
    block = 2 * (d * 3 * d + d * d + 3 * d * ffn)  # per token
    proj = 2 * d * d
    f = 2 * img * 4 * in_ch * d
    f += 2 * (img * block + 4 * d * img * img) + 2 * img * proj + img * proj  # refiner (2 blocks, projections)
    if layout == "2.0":
        f += n_layers * (img * block + 4 * d * img * img + img * proj)
    if style == "diffusers" and layout != "1.0":
        f += n_pad * block + 4 * d * n_pad * n_pad  # the private noise-refiner block re-run
    f += n_layers * (main * block + 4 * d * main * main + main * proj) + main * proj
    return float(f)


def make_control_weights(layout: str, seed: int = 3) -> tuple[Any, dict[str, torch.Tensor]]:
    """(our ControlNetConfig, our-named weights on the GPU), in the published layout's shapes."""
    from zimage_core.controlnet import ZImageControlNet
    from zimage_core.controlnet.loading import _places  # noqa: PLC2701 - the loader's hint placement
    from zimage_core.controlnet.model import INPAINT_CHANNELS, ControlNetConfig

    n = {"2.1": 15, "lite": 3, "1.0": 6}[layout]
    cfg = ControlNetConfig(dim=B.DIT["dim"], n_heads=B.DIT["n_heads"],
                           in_channels=F.LATENT_CHANNELS if layout == "1.0" else INPAINT_CHANNELS,
                           refiner="plain" if layout == "1.0" else "control", layer_places=_places(n),
                           refiner_places=() if layout == "1.0" else (0, 1))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZImageControlNet(cfg).state_dict().items()}
    gen = torch.Generator(device=B.DEV).manual_seed(seed)
    return cfg, {k: B._rand_like_param(k, s, gen) for k, s in shapes.items()}


def diffusers_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from zimage_core.controlnet.loading import file_keys

    out = {}
    for k, v in sd.items():
        keys = file_keys(k)
        for key, part in zip(keys, v.chunk(len(keys), 0), strict=True):
            out[key] = part
    return out


def bench_layout(layout: str, ours: Any, ref: Any, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor],
                 plain: dict[str, list[float]], reps: int) -> None:
    from diffusers import ZImageControlNetModel

    from zimage_core.controlnet import ControlRun, ZImageControlNet
    from zimage_core.controlnet.model import ControlHooks

    size = x.shape[-1] * 8
    main_flops = B.step_flops(size, 1, CAP_LEN)
    cfg, sd = make_control_weights(layout)
    with torch.device("meta"):
        net = ZImageControlNet(cfg, dtype=B.DT)
    B.load_assign(net, sd, f"ours ControlNet {layout}")
    net.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    control = torch.randn(1, cfg.in_channels, *x.shape[-2:], generator=g).to(B.DEV, B.DT)
    timings: dict[str, list[float]] = {}
    outs: dict[str, torch.Tensor] = {}
    for style in ("diffusers", "comfyui"):
        run = ControlRun(net, control, 0.8, style=style, axes_dims=ours.config.axes_dims,
                         rope_theta=ours.config.rope_theta)
        hooks = ControlHooks(ours, [run])

        def step(hooks: Any = hooks) -> torch.Tensor:
            return ours(x, sigma, caps, hooks=hooks)

        with torch.no_grad():
            timings[f"ours ({style})"] = B.time_ms(step, reps)
            outs[style] = step().float()
    dcfg = {"control_layers_places": list(cfg.layer_places),
            "control_refiner_layers_places": list(cfg.refiner_places) or None,
            "control_in_dim": cfg.in_channels,
            "add_control_noise_refiner": None if layout == "1.0" else "control_noise_refiner",
            "dim": B.DIT["dim"], "n_heads": B.DIT["n_heads"], "n_kv_heads": B.DIT["n_heads"]}
    with torch.device("meta"):
        dnet = ZImageControlNetModel(**dcfg)
    B.load_assign(dnet, diffusers_names(sd), f"diffusers ControlNet {layout}")
    dnet = ZImageControlNetModel.from_transformer(dnet.eval().requires_grad_(False), ref)
    xs = list(x.unsqueeze(2).unbind(0))
    controls = list(control.unsqueeze(2).unbind(0))

    def dstep() -> torch.Tensor:
        samples = dnet(xs, 1.0 - sigma, caps, controls, conditioning_scale=0.8)
        out = ref(xs, 1.0 - sigma, caps, controlnet_block_samples=samples, return_dict=False)[0]
        return -torch.stack([o.float() for o in out], 0).squeeze(2)

    with torch.no_grad():
        timings["diffusers"] = B.time_ms(dstep, reps)
        d_out = dstep()
    parity = float((outs["diffusers"] - d_out).norm() / d_out.norm())
    for impl, t in timings.items():
        base = plain["ours" if impl.startswith("ours") else "diffusers"]
        style = "comfyui" if "comfyui" in impl else "diffusers"
        share = control_flops(layout, size, CAP_LEN, style) / main_flops
        over = (statistics.median(t) - statistics.median(base)) / statistics.median(base)
        B.record(impl, f"cn {layout}", size, 1, t, overhead=over, flop_share=share, target=share * 1.1,
                 within_target=bool(over <= share * 1.1))
    B.record("ours vs diffusers", f"cn {layout} parity", size, 1, None, rel_err_bf16=parity)


def bench_size(size: int, layouts: list[str], ours: Any, ref: Any, diffusers_dit: Any, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(F.latent_shape(size), generator=g).to(B.DEV, B.DT)
    caps = [torch.randn(CAP_LEN, B.DIT["cap_feat_dim"], generator=g).to(B.DEV, B.DT) * 3]
    sigma = torch.full((1,), 0.75, device=B.DEV)
    with torch.no_grad():
        plain = {"ours": B.time_ms(lambda: ours(x, sigma, caps), reps),
                 "diffusers": B.time_ms(lambda: diffusers_dit(x, sigma, caps), reps)}
    for impl, t in plain.items():
        B.record(impl, "plain step", size, 1, t)
    for layout in layouts:
        bench_layout(layout, ours, ref, x, sigma, caps, plain, reps)
        gc.collect()
        if B.DEV != "cpu":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="2.1,lite,1.0")
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/zbench_out"))
    args = ap.parse_args()
    zi = B.Impls(argparse.Namespace(impls=["ours", "diffusers"], compile=[]))
    ours = zi.new_ours()
    diffusers_dit = zi.get_dit("diffusers")
    for size in [int(s) for s in args.sizes.split(",")]:
        bench_size(size, args.layouts.split(","), ours, zi._mods["diffusers"], diffusers_dit, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_controlnet.json").write_text(json.dumps({"results": B.RESULTS, "notes": [
        "comfy: not measured, ComfyUI 0.3.75 has no ZImage_Control/ZImageFunControlnet"]}, indent=1))
    B.log(f"wrote {out / 'bench_controlnet.json'}")


if __name__ == "__main__":
    main()
