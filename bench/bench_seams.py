"""Issue 18's "no speed loss": one transformer step, the code before the redesign against this checkout's.

Both zimage_core packages are imported into ONE process (the earlier one under the name `zimage_core_before`,
from a folder holding an exported copy, e.g. `git archive 6dfcce0 zimage_core | tar -x -C .bench_before/`),
built on the SAME full-size random bf16 weights (bench/fixtures.py: zimage_core's key names and value rule,
drawn on the GPU), and timed interleaved: each round times every variant once per code, before/after in
alternating order (ABAB…), each time `--reps` steps with CUDA events. The figure per code and variant is the
median over all rounds' steps; the verdict compares after/before with the 2% allowed.

Variants (`--variants`): `eager` (bf16, fused Triton kernels on), `compile` (`compile_blocks()`, the regional
torch.compile the bench and the compile node use), `fp8` (`quantize_fp8()`: the weights of weight_dtype
fp8_e4m3fn_fast, eager) and `fp8+compile`. It also checks that both codes give the same velocity on the same
inputs (max abs difference per variant).

    python3 bench/bench_seams.py --before .bench_before --out $OUT        # GPU: 1024², batch 1
    .venv/bin/python bench/bench_seams.py --before .bench_before --tiny   # CPU smoke test (tiny config)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BEFORE_NAME = "zimage_core_before"
CAP_LEN = 27  # bench.py's prompt with the chat template (its step figures use the same length)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=".bench_before",
                   help="folder holding the earlier code's zimage_core/ (relative to the repo root or absolute)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="eager,compile,fp8,fp8+compile")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (before/after order alternates)")
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant, code and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed slowdown (after/before − 1)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny config, 64², 1 round, 1 rep (unless given)")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/zbench_out")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if set(v.split("+")) - {"eager", "compile", "fp8"}]
    if bad:
        p.error(f"unknown variant(s) {bad}: use eager, compile, fp8, fp8+compile")
    if args.tiny:
        explicit = set(argv if argv is not None else sys.argv[1:])
        if "--size" not in explicit:
            args.size = 64
        if "--rounds" not in explicit:
            args.rounds = 2
        if "--reps" not in explicit:
            args.reps = 1
        if "--warmup" not in explicit:
            args.warmup = 0
    return args


def import_before(folder: Path) -> Any:
    """The earlier zimage_core, imported as `zimage_core_before` (its imports are all relative)."""
    init = folder / "zimage_core" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{init} is missing: export the earlier code first, e.g. "
                         f"`mkdir -p {folder} && git archive 6dfcce0 zimage_core | tar -x -C {folder}`")
    spec = importlib.util.spec_from_file_location(BEFORE_NAME, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BEFORE_NAME] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("ZBENCH_DEVICE", "cpu")
    sys.path.insert(0, str(HERE))
    import fixtures as F
    import torch

    import bench as B  # timing helpers (CUDA events), DEV/DT, load_assign
    import zimage_core
    from zimage_core.transformer import ZImageTransformer

    folder = Path(args.before)
    if not folder.is_absolute():
        folder = B.REPO / folder
    before = import_before(folder)
    from zimage_core_before.transformer import TransformerConfig as OldConfig
    from zimage_core_before.transformer import ZImageTransformer as OldTransformer

    codes = {"before": (OldConfig, OldTransformer), "after": (type(F.dit_config()), ZImageTransformer)}
    # tiny: bench.py's smoke-test depth at a narrower width (bf16 matmuls are slow on CPUs)
    cfg = F.dit_config(tiny=True, dim=256, n_heads=2, n_kv_heads=2) if args.tiny else F.dit_config()
    dev, dt = B.DEV, B.DT
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": dev,
        "after": str(Path(zimage_core.__file__).parent), "before": str(Path(before.__file__).parent),
        "config": {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_refiner_layers", "n_heads")},
        "size": args.size, "batch": args.batch, "cap_len": CAP_LEN, "rounds": args.rounds, "reps": args.reps,
    }
    if dev != "cpu":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            env["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            env["triton"] = None
    B.log("env:", json.dumps(env))

    # One copy of the weights for every model (load_state_dict(assign=True) shares the tensors).
    t0 = time.perf_counter()
    shapes = F.dit_shapes(cfg)
    weights = F.random_state_dict(shapes, seed=0, device=dev, dtype=dt)
    B.sync()
    B.log(f"weights: {sum(t.numel() for t in weights.values()) / 1e9:.3f} B params in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(F.latent_shape(args.size, args.batch), generator=g).to(dev, dt)
    caps = [torch.randn(CAP_LEN, cfg.cap_feat_dim, generator=g).to(dev, dt) * 3 for _ in range(args.batch)]
    sigma = torch.full((args.batch,), 0.75, device=dev)

    def build(code: str, variant: str) -> Any:
        config_cls, model_cls = codes[code]
        config = cfg if config_cls is type(cfg) else config_cls(
            **{f: getattr(cfg, f) for f in config_cls.__dataclass_fields__ if hasattr(cfg, f)})
        with torch.device("meta"):
            m = model_cls(config, dtype=dt, device="meta")
        B.load_assign(m, weights, f"{code} {variant}")
        m.eval().requires_grad_(False)
        m.fused_kernels = True
        opts = set(variant.split("+"))
        if "fp8" in opts:
            m.quantize_fp8()
        if "compile" in opts:
            m.compile_blocks()
        return m

    results: dict[str, dict[str, Any]] = {}
    models: dict[tuple[str, str], Any] = {}
    outputs: dict[tuple[str, str], Any] = {}
    with torch.inference_mode():
        for variant in args.variants:
            for code in ("before", "after"):
                key = f"{code}:{variant}"
                try:
                    t0 = time.perf_counter()
                    m = build(code, variant)
                    build_s = time.perf_counter() - t0
                    first_ms, out = B.first_call(lambda m=m: m(x, sigma, caps))
                    for _ in range(args.warmup):
                        m(x, sigma, caps)
                    B.sync()
                    compiled = bool(getattr(m, "_compiled_blocks", None))
                    if "compile" in variant and not compiled:
                        B.note(f"{key}: compilation fell back to eager")
                    models[(code, variant)] = m
                    outputs[(code, variant)] = out.float()
                    results[key] = {"code": code, "variant": variant, "build_s": build_s, "first_ms": first_ms,
                                    "compiled": compiled, "finite": bool(torch.isfinite(out).all()), "times": [],
                                    "round_medians": []}
                    B.log(f"[{key:>22}] built in {build_s:.1f} s, first call {first_ms:.0f} ms, compiled={compiled}")
                except Exception as exc:  # noqa: BLE001 - record and go on with the other variants
                    traceback.print_exc()
                    B.note(f"{key} failed: {exc!r}"[:400])
            a, b = outputs.get(("before", variant)), outputs.get(("after", variant))
            if a is not None and b is not None:
                diff = float((a - b).abs().max())
                rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
                for code in ("before", "after"):
                    results[f"{code}:{variant}"].update(max_abs_diff=diff, rel_diff=rel, identical=diff == 0.0)
                B.log(f"  {variant}: after vs before max |diff| {diff:.3g}, rel {rel:.3g}")
        outputs.clear()

        for r in range(args.rounds):
            for variant in args.variants:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for code in order:
                    m = models.get((code, variant))
                    if m is None:
                        continue
                    times = B.time_ms(lambda m=m: m(x, sigma, caps), args.reps, warmup=1)
                    res = results[f"{code}:{variant}"]
                    res["times"] += times
                    res["round_medians"].append(statistics.median(times))
            B.log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['round_medians'][-1]:.2f}" for k, v in results.items() if v["round_medians"]))

    flops = F.step_flops(cfg, args.size, args.batch, CAP_LEN)
    rows = []
    for variant in args.variants:
        a, b = results.get(f"before:{variant}"), results.get(f"after:{variant}")
        for res in (a, b):
            if res and res["times"]:
                res["median_ms"] = statistics.median(res["times"])
                res["min_ms"] = min(res["times"])
                rm = res["round_medians"]
                res["round_spread"] = (max(rm) - min(rm)) / statistics.median(rm)
                res["tflops"] = flops / (res["median_ms"] / 1e3) / 1e12
        if not (a and b and a["times"] and b["times"]):
            rows.append({"variant": variant, "verdict": "not run"})
            continue
        ratio = b["median_ms"] / a["median_ms"]
        paired = statistics.median(y / x_ for x_, y in zip(a["round_medians"], b["round_medians"], strict=True))
        ok = ratio <= 1 + args.tolerance
        rows.append({"variant": variant, "before_ms": a["median_ms"], "after_ms": b["median_ms"], "ratio": ratio,
                     "paired_ratio": paired, "spread_before": a["round_spread"], "spread_after": b["round_spread"],
                     "identical": a.get("identical"), "max_abs_diff": a.get("max_abs_diff"),
                     "verdict": "ok" if ok else f"SLOWER by {100 * (ratio - 1):.1f}%"})

    report = {"env": env, "step_tflop": flops / 1e12, "rows": rows, "results": results, "notes": B.NOTES}
    path = out_dir / ("bench_seams_tiny.json" if args.tiny else "bench_seams.json")
    path.write_text(json.dumps(report, indent=1))
    B.log(f"\nwrote {path}")
    B.log(f"\none step, {args.size}² batch {args.batch}, {env.get('gpu', dev)}; medians of {args.rounds} rounds × "
          f"{args.reps} steps, interleaved; ratio = after / before (≤ {1 + args.tolerance:.2f} passes)")
    B.log("| variant | before ms | after ms | ratio | paired ratio | round spread b/a | same output | verdict |")
    B.log("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "ratio" not in row:
            B.log(f"| {row['variant']} | | | | | | | {row['verdict']} |")
            continue
        same = "identical" if row["identical"] else f"max {row['max_abs_diff']:.2g}"
        B.log(f"| {row['variant']} | {row['before_ms']:.2f} | {row['after_ms']:.2f} | {row['ratio']:.4f} | "
              f"{row['paired_ratio']:.4f} | {100 * row['spread_before']:.1f}% / {100 * row['spread_after']:.1f}% | "
              f"{same} | {row['verdict']} |")
    return 0 if all(row.get("verdict") == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
