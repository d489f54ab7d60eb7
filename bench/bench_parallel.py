"""Several GPUs (issue 23): Ulysses sequence parallelism and data parallelism of the full Z-Image transformer.

Run under torchrun, one process per GPU (NCCL); every rank builds the full-size transformer with the same
random bf16 weights (bench/fixtures.py) on its own GPU:

    torchrun --standalone --nproc-per-node=G bench/bench_parallel.py --out $OUT

Cases (`--cases`): turbo1024 (1024², 8 steps, no CFG), turbo2048 (2048², 8 steps), base2048 (2048², 30 steps,
CFG 4: cond + uncond as one batch of 2 with captions of different lengths, i.e. a masked batch).
- `sequence`: one image per denoise, its tokens split across the G ranks (zimage_core.parallel's
  SequenceParallelRunner); seconds per image.
- `data`: `--data-per-gpu` images per GPU (a batch of G × that, split by zimage_core.parallel.data_parallel);
  images per second.
G = 1 runs the same loops on one GPU (the baseline). Rank 0 writes $OUT/parallel_G<G>.json; with several such
files, `python3 bench/bench_parallel.py --summarize $OUT/parallel_G*.json` prints the speed-up table
(targets: sequence ≥ 0.8·G× at 2048² for G ≤ 4; data ≥ 0.95·G× images/s).
The denoise is a plain Euler loop on the flow velocity (shift 3); the schedule does not change the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fixtures import dit_config, dit_shapes, random_state_dict  # noqa: E402

from zimage_core.parallel import SequenceParallelRunner, data_parallel, padded_heads, sharded_length  # noqa: E402
from zimage_core.transformer import ZImageTransformer  # noqa: E402

CASES = {  # name: (side in pixels, steps, CFG)
    "turbo1024": (1024, 8, False),
    "turbo2048": (2048, 8, False),
    "base2048": (2048, 30, True),
}
CAPTION, NEGATIVE = 100, 20  # caption tokens of the prompt and of the negative prompt


def _schedule(steps: int, shift: float = 3.0) -> list[float]:
    t = torch.linspace(1.0, 0.0, steps + 1)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def _inputs(side: int, batch: int, cfg: bool, device: torch.device, width: int, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    lat = side // 8
    x = torch.randn(batch, 16, lat, lat, generator=gen, device=device)
    caps = [torch.randn(CAPTION, width, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(batch)]
    if cfg:
        caps += [torch.randn(NEGATIVE, width, generator=gen, device=device, dtype=torch.bfloat16)
                 for _ in range(batch)]
    return x, caps


def _denoise(model: ZImageTransformer, x: torch.Tensor, caps: list, steps: int, cfg: bool, forward) -> torch.Tensor:
    sigmas = _schedule(steps)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        xin = torch.cat([x, x]) if cfg else x
        v = forward(xin, torch.full((xin.shape[0],), s, device=x.device), caps)
        if cfg:
            cond, uncond = v.chunk(2)
            v = uncond + 4.0 * (cond - uncond)
        x = x + (s_next - s) * v
    return x


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run(args: argparse.Namespace) -> None:
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu_smoke:  # the script's own check on the CPU: gloo, a tiny transformer, 1/16 of each side
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        config = dit_config(tiny=True)
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timedelta(seconds=args.timeout), device_id=device)
        config = dit_config()
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.device("meta"):
        model = ZImageTransformer(config, dtype=torch.bfloat16)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    model.load_state_dict(random_state_dict(dit_shapes(config), device=device, dtype=torch.bfloat16), strict=True)
    result = {"world": world, "gpu": "cpu" if args.cpu_smoke else torch.cuda.get_device_name(device), "torch": torch.__version__,
              "heads": config.n_heads, "padded_heads": padded_heads(config.n_heads, world), "cases": {}}

    def seq_forward(x, sigma, caps):
        runner = SequenceParallelRunner(None) if world > 1 else None
        return model(x, sigma, caps, runner=runner)

    with torch.no_grad():
        for name in args.cases.split(","):
            side, steps, cfg = CASES[name]
            if args.cpu_smoke:
                side, steps = side // 16, 2
            entry: dict = {"side": side, "steps": steps, "cfg": cfg}
            tokens = (side // 16) ** 2 + 128
            entry["joint_tokens"], entry["sharded_tokens"] = tokens, sharded_length(tokens, world)
            if "sequence" in args.modes:
                x, caps = _inputs(side, 1, cfg, device, config.cap_feat_dim)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _denoise(model, x, caps, 1, cfg, seq_forward)  # warm-up (one step)
                med, times = _timed(lambda x=x, caps=caps, s=steps, c=cfg: _denoise(model, x, caps, s, c,
                                                                                      seq_forward), args.repeats)
                entry["sequence"] = {"s_per_image": med, "runs": times,
                                     "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
                                     if device.type == "cuda" else None}
            if "data" in args.modes:
                batch = world * args.data_per_gpu
                x, caps = _inputs(side, batch, cfg, device, config.cap_feat_dim)
                # Data-parallel over the whole batch: with CFG, the cond and uncond halves of each image.
                def dp_forward(xin, sigma, caps_in):
                    return data_parallel(lambda sl: model(xin[sl], sigma[sl], caps_in[sl]), xin.shape[0], xin)
                _denoise(model, x, caps, 1, cfg, dp_forward)
                med, times = _timed(lambda x=x, caps=caps, s=steps, c=cfg: _denoise(model, x, caps, s, c,
                                                                                      dp_forward), args.repeats)
                entry["data"] = {"batch": batch, "s_per_batch": med, "images_per_s": batch / med, "runs": times}
            result["cases"][name] = entry
            if rank == 0:
                print(json.dumps({name: entry}), flush=True)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"parallel_G{world}.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


def summarize(files: list[str]) -> None:
    runs = {r["world"]: r for r in (json.loads(Path(f).read_text()) for f in files)}
    base = runs.get(1)
    print("| case | G | sequence s/image | speed-up (target) | data images/s | speed-up (target ≥ 0.95·G) |")
    print("|---|---|---|---|---|---|")
    for g in sorted(runs):
        for name, e in runs[g]["cases"].items():
            b = base["cases"].get(name, {}) if base else {}
            seq, data = e.get("sequence"), e.get("data")
            seq_txt = sp_txt = dat_txt = dsp_txt = "—"
            if seq:
                seq_txt = f"{seq['s_per_image']:.2f}"
                if b.get("sequence"):
                    sp = b["sequence"]["s_per_image"] / seq["s_per_image"]
                    target = f" (≥ {0.8 * g:.1f})" if e["side"] >= 2048 and g <= 4 else ""
                    sp_txt = f"{sp:.2f}×{target}"
            if data:
                dat_txt = f"{data['images_per_s']:.3f}"
                if b.get("data"):
                    dsp = data["images_per_s"] / b["data"]["images_per_s"]
                    dsp_txt = f"{dsp:.2f}× (≥ {0.95 * g:.2f})"
            print(f"| {name} | {g} | {seq_txt} | {sp_txt} | {dat_txt} | {dsp_txt} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="turbo1024,turbo2048,base2048")
    parser.add_argument("--modes", default="sequence,data")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-per-gpu", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=600, help="NCCL collective timeout (s)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/zbench_parallel_out"))
    parser.add_argument("--cpu-smoke", action="store_true", help="check the script on the CPU (gloo, tiny model)")
    parser.add_argument("--summarize", nargs="*", help="parallel_G*.json files: print the speed-up table")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args)


if __name__ == "__main__":
    main()
