"""Through the ComfyUI node layer on a GPU: our sampler / VAE nodes vs zimage_core called directly.

Runs the real node classes (ModelPatcher + load_models_gpu, progress bar, interrupt checks, LATENT
conversion) with ComfyUI's runtime imported from the carried copy, on full-size random bf16 weights
built on the GPU (no 20 GB of files to write). Prints one JSON object; `--out` also saves it.
Usage (device): python3 bench/bench_nodes.py --size 1024 --out $OUT/bench_nodes.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
import fixtures as F  # noqa: E402  (shapes and the random-weight rule, from zimage_core)

from bench import import_comfy  # noqa: E402  (puts ComfyUI on sys.path)


def _pack():
    spec = importlib.util.spec_from_file_location("ComfyUI_ZImage", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_ZImage"] = pack
    spec.loader.exec_module(pack)
    return pack


def _random_(module: torch.nn.Module, seed: int = 0) -> None:
    """zimage_core's random-weight rule (bench/fixtures.py), drawn on the parameters' device."""
    with torch.no_grad():
        gen = None
        for name, p in module.named_parameters():
            gen = gen or torch.Generator(device=p.device).manual_seed(seed)
            p.copy_(F.random_tensor(name, tuple(p.shape), gen, dtype=p.dtype))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> tuple[float, float]:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    first = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return first, sorted(times)[len(times) // 2]


class _CoreCall:
    """zimage_core's Denoiser call on a ZImageDiffusionModel (whose forward speaks ComfyUI's convention)."""

    def __init__(self, dit) -> None:
        self.dit, self.device, self.dtype = dit, dit.device, dit.dtype

    def __call__(self, x, sigma, cap_feats):
        from zimage_core import ZImageTransformer
        return ZImageTransformer.forward(self.dit, x, sigma, cap_feats)


def core_dit_eager(core_sample, use_graphs):
    """core_sample() with graphs off (the reference latents), graphs back on afterwards."""
    use_graphs(False)
    try:
        return core_sample()
    finally:
        use_graphs(True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script runs)")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE decode timings")
    ap.add_argument("--no-compile", action="store_true", help="skip ZImageCompileModel / ZImageCompileVAE")
    args = ap.parse_args()
    import_comfy()
    import comfy.model_management as mm
    import comfy.ops

    pack = _pack()
    core_model = sys.modules["ComfyUI_ZImage.nodes.core_model"]
    core_vae = sys.modules["ComfyUI_ZImage.nodes.core_vae"]
    node_classes = pack.NODE_CLASS_MAPPINGS
    from zimage_core import (
        FluxVAE,
        TransformerConfig,
        denormalize_latents,
        make_noise,
        sample_text_to_image,
    )

    dev, dt = mm.get_torch_device(), torch.bfloat16
    cfg = TransformerConfig.full()
    if args.smoke:
        cfg = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                cap_feat_dim=F.TEXT_WIDTH, axes_dims=[8, 12, 12])
    dit = core_model.ZImageDiffusionModel(cfg, operations=comfy.ops.disable_weight_init, dtype=dt,
                                          device=dev).eval().requires_grad_(False)
    _random_(dit)
    # The core MODEL / VAE our loaders return, around random weights.
    model = core_model.as_core_model(dit, dt, None, dev, mm.unet_offload_device())
    vae_net = FluxVAE(operations=comfy.ops.disable_weight_init, dtype=dt, device=dev).eval().requires_grad_(False)
    _random_(vae_net)
    vae = core_vae.ZImageCoreVAE(vae_net, dev, mm.vae_offload_device(), dt, "random")

    shape = F.latent_shape(args.size)
    caps = torch.randn(27, F.TEXT_WIDTH, generator=torch.Generator().manual_seed(1)).to(dt)
    cond = [[caps[None], {}]]
    latent = {"samples": torch.zeros(shape)}
    sampler = node_classes["ZImageTurboSampler"]()
    decoder = node_classes["ZImageVAEDecode"]()
    res: dict = {"device": str(dev) if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size}

    def node_sample():
        return sampler.sample(model, cond, latent, 0, 8, 3.0, 0.0)[0]

    def core_sample():
        out = sample_text_to_image(core_dit, [caps.to(dev)], make_noise(shape, 0).to(dev))
        return out.cpu()

    # zimage_core's own call convention on the same weights (ZImageTransformer.forward, not NextDiT's).
    core_dit = _CoreCall(dit)
    res["graphs_default_on"] = dit.cuda_graphs is not None  # the loaders turn them on for CUDA load devices
    graphs_on = dit.cuda_graphs

    def use_graphs(on: bool) -> None:
        if on:
            dit.use_cuda_graphs()
        else:
            dit.cuda_graphs = None

    raw = node_sample()
    # eager = no CUDA graphs (the figures of issue 12); graph = whole-step graphs (the nodes free them at the end
    # of each sampling run, so every node run captures again; the core call keeps its graph between runs)
    for graphs in (False, True):
        use_graphs(graphs)
        tag = "graph" if graphs else "eager"
        for name, fn in ((f"node_8step_{tag}", node_sample), (f"core_8step_{tag}", core_sample)):
            res[name + "_first_ms"], res[name + "_ms"] = _timed(fn, args.reps)
    # graphs kept between sampling runs (ZIMAGE_CUDA_GRAPHS=keep): no capture per run
    use_graphs(True)
    graphs_mod = sys.modules[type(dit.cuda_graphs).__module__]
    graphs_mod.KEEP = True
    try:
        res["node_8step_graph_keep_first_ms"], res["node_8step_graph_keep_ms"] = _timed(node_sample, args.reps)
    finally:
        graphs_mod.KEEP = False
        dit.cuda_graphs.clear()
    use_graphs(False)
    res["node_vs_core_latent_maxabs"] = float((node_sample()["samples"] - denormalize_latents(core_sample())).abs().max())
    use_graphs(True)
    res["node_graph_vs_core_eager_latent_maxabs"] = float(
        (node_sample()["samples"] - denormalize_latents(core_dit_eager(core_sample, use_graphs))).abs().max())
    res["node_graph_over_core_eager"] = res["node_8step_graph_ms"] / res["core_8step_eager_ms"]
    res["node_eager_over_core_eager"] = res["node_8step_eager_ms"] / res["core_8step_eager_ms"]
    res["node_graph_over_core_graph"] = res["node_8step_graph_ms"] / res["core_8step_graph_ms"]
    if torch.cuda.is_available():  # where the host waits for the GPU inside one node run (sync debug mode)
        import warnings
        use_graphs(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                node_sample()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                key = f"{Path(w.filename).name}:{w.lineno}"
                where[key] = where.get(key, 0) + 1
        res["node_run_syncs"] = dict(sorted(where.items(), key=lambda kv: -kv[1])[:12])
    dit.cuda_graphs = graphs_on
    if not args.no_vae:
        res["vae_decode_node_nchw_first_ms"], res["vae_decode_node_nchw_ms"] = _timed(lambda: decoder.decode(vae, raw), 5)
    if not args.no_compile:
        (cmodel,) = node_classes["ZImageCompileModel"]().compile(model)

        def compiled_sample():
            return sampler.sample(cmodel, cond, latent, 0, 8, 3.0, 0.0)[0]
        res["node_8step_compiled_first_ms"], res["node_8step_compiled_ms"] = _timed(compiled_sample, args.reps)
        if not args.no_vae:
            (vae,) = node_classes["ZImageCompileVAE"]().compile(vae)
            res["vae_decode_node_fused_first_ms"], res["vae_decode_node_fused_ms"] = _timed(
                lambda: decoder.decode(vae, raw), 5)
    if torch.cuda.is_available():
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
