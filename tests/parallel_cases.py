"""The cases of tests/test_parallel.py: tiny models and inputs built the same way in the test process (the
single-process references) and in its gloo worker processes (the sharded forwards).

The main model is diffusers' ZImageTransformer2DModel with random weights, converted to ours by the tests'
own converter (tests/transformer_fixtures.py); 6 heads of 32, so G = 2 and 3 divide the heads and G = 4
pads them to 8.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch

from tests.transformer_fixtures import make_diffusers_model, ragged_inputs, to_comfy

HEADS, DIM = 6, 192
CONFIG = dict(dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, n_layers=2, n_refiner_layers=1)
GROUPS = (2, 3, 4)  # world sizes tested; ranks 0..G-1 of one 4-process gloo world
LORA_RANK, LORA_SCALE = 4, 0.5


def diffusers_model():
    return make_diffusers_model(seed=0, **CONFIG)


def converted(ref) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under our names (the workers load these: no diffusers import there)."""
    return to_comfy(ref.state_dict(), prefix="", stray_norm_final=False)


def ours(sd: dict[str, torch.Tensor], lora: bool = False):
    from zimage_core.transformer import TransformerConfig, ZImageTransformer

    cfg = TransformerConfig(dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, n_layers=2, n_refiner_layers=1,
                            cap_feat_dim=32, axes_dims=(8, 12, 12))
    model = ZImageTransformer(cfg)
    if lora:
        sd = lora_patched(sd)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def lora_patched(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + scale · up @ down on every attention qkv/out and feed-forward weight (what a LoRA loader does)."""
    gen = torch.Generator().manual_seed(11)
    out = dict(sd)
    for key, w in sorted(sd.items()):  # key order: a saved file sorts them
        if key.endswith((".qkv.weight", ".out.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            down = torch.randn(LORA_RANK, w.shape[1], generator=gen) * 0.1
            up = torch.randn(w.shape[0], LORA_RANK, generator=gen) * 0.1
            out[key] = w + LORA_SCALE * (up @ down)
    return out


def controlnet(path: Path):
    from zimage_core.controlnet import load_controlnet, write_random_controlnet

    if not path.exists():
        write_random_controlnet(path, "2.1", dim=DIM, n_heads=HEADS, seed=7, dtype=torch.float32, std=0.05)
    return load_controlnet(path, dtype=torch.float32)[0]


def control_hooks(model, net, control: torch.Tensor):
    from zimage_core.controlnet import ControlRun
    from zimage_core.controlnet.model import ControlHooks

    cfg = model.config
    run = ControlRun(net, control, 0.8, style="diffusers", axes_dims=cfg.axes_dims, rope_theta=cfg.rope_theta)
    return ControlHooks(model, [run])


def inputs(case: str) -> dict:
    """x, sigma, caps (and the control / Omni inputs) of a case."""
    if case == "t2i":  # one prompt; 8x12 tokens + 32 caption slots: 128 tokens, padded for G = 3 and 4... (192, 128)
        x, sigma, caps = ragged_inputs(seed=2, cap_lens=(20,), hw=(16, 24), batch=1)
        return {"x": x, "sigma": torch.tensor([0.9]), "caps": caps}
    if case == "img2img":  # a later, partly denoised step (denoise < 1 only starts the sampler lower)
        x, sigma, caps = ragged_inputs(seed=3, cap_lens=(40,), hw=(10, 14), batch=1)
        return {"x": x, "sigma": torch.tensor([0.3]), "caps": caps}
    if case in ("cfg", "lora"):  # CFG's cond + uncond in one batch: caption lengths 45 and 7 (a masked batch)
        x, sigma, caps = ragged_inputs(seed=4, cap_lens=(45, 7), hw=(10, 14), batch=2)
        return {"x": x, "sigma": torch.full((2,), 0.6), "caps": caps}
    if case == "controlnet":
        x, sigma, caps = ragged_inputs(seed=5, cap_lens=(20, 20), hw=(8, 12), batch=2)
        control = torch.randn(2, 33, 8, 12, generator=torch.Generator().manual_seed(6))
        return {"x": x, "sigma": torch.full((2,), 0.6), "caps": caps, "control": control}
    if case == "omni":  # a reference image: clean/noisy tokens (per-token timesteps) sharded with the sequence
        x, sigma, caps = ragged_inputs(seed=8, cap_lens=(12, 30), hw=(8, 8), batch=2)
        ref = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(9))
        return {"x": x, "sigma": torch.full((2,), 0.5), "caps": caps, "ref": ref}
    if case == "data_controlnet":  # data parallel, 4 samples, 2 control rows (ControlRun cycles them)
        x, sigma, caps = ragged_inputs(seed=12, cap_lens=(20, 9, 20, 9), hw=(8, 12), batch=4)
        control = torch.randn(2, 33, 8, 12, generator=torch.Generator().manual_seed(13))
        return {"x": x, "sigma": torch.full((4,), 0.7), "caps": caps, "control": control}
    if case == "data":  # data parallel: 3 samples over G ranks (G = 4 leaves a rank without a sample)
        x, sigma, caps = ragged_inputs(seed=10, cap_lens=(9, 40, 25), hw=(8, 8), batch=3)
        return {"x": x, "sigma": torch.tensor([0.8, 0.5, 0.2]), "caps": caps}
    raise KeyError(case)


CASES = ("t2i", "img2img", "cfg", "lora", "controlnet", "omni", "data", "data_controlnet")


def forward(model, case: str, data: dict, runner=None, hooks=None, sl: slice | None = None) -> torch.Tensor:
    from zimage_core.transformer import OmniInputs

    x, sigma, caps = data["x"], data["sigma"], data["caps"]
    if sl is not None:
        x, sigma, caps = x[sl], sigma[sl], caps[sl]
    omni = OmniInputs([data["ref"]]) if "ref" in data else None
    with torch.no_grad():
        return model(x, sigma, caps, hooks=hooks, omni=omni, runner=runner)


def worker(rank: int, world: int, port: int, out_dir: str, weights: str, cn_path: str) -> None:
    """One gloo rank: every case on every group it belongs to; rank 0 saves the results."""
    import torch.distributed as dist

    from zimage_core.parallel import SequenceParallelRunner, data_parallel
    from zimage_core.parallel.workers import control_hooks as worker_hooks

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    groups = {g: dist.new_group(list(range(g))) for g in GROUPS}
    from safetensors.torch import load_file

    sd = load_file(weights)
    plain, patched = ours(sd), ours(sd, lora=True)
    net = controlnet(Path(cn_path))
    results = {}
    for case in CASES:
        data = inputs(case)
        model = patched if case == "lora" else plain
        for g, group in groups.items():
            if rank >= g:
                continue
            if case == "data_controlnet":  # the workers' own hook builder, on each rank's slice of the batch
                controls = [{"key": "cn", "control": data["control"], "strength": 0.8, "style": "diffusers",
                             "axes_dims": model.config.axes_dims, "rope_theta": model.config.rope_theta}]
                out = data_parallel(
                    lambda sl, m=model, d=data, c=controls: forward(m, "data", d, sl=sl,
                                                                    hooks=worker_hooks(m, {"cn": net}, c, sl)),
                    data["x"].shape[0], data["x"], group)
            elif case == "data":
                b = data["x"].shape[0]
                out = data_parallel(lambda sl, m=model, c=case, d=data: forward(m, c, d, sl=sl), b, data["x"], group)
            else:
                hooks = control_hooks(model, net, data["control"]) if case == "controlnet" else None
                out = forward(model, case, data, runner=SequenceParallelRunner(group, hooks=hooks))
            results[(case, g, rank)] = out
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        torch.save(merged, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()
