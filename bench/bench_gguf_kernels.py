"""GGUF dequantisation on the GPU: bit-for-bit parity with the format's reference (the `gguf` package's numpy
`gguf.quants.dequantize`) for every supported type on random blocks, and the time to dequantise the largest
Z-Image weight (feed_forward.w1, 10240 x 3840) per type, beside reading the same weight in bf16.

Each type: random valid blocks (random bytes, finite fp16 scales), dequantised on the GPU by
zimage_core.checkpoint.gguf_quants and compared with the reference's float32 bits. Timing: CUDA events,
median of 20 after 3 warm-ups, float32 dequantisation then the cast to bf16 (what a GGUF layer does per call).

    python3 bench/bench_gguf_kernels.py --out $OUT       (needs the gguf package: .whl, bench/prepare_device.sh)
    .venv/bin/python bench/bench_gguf_kernels.py --cpu   (the parity part on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zimage_core.checkpoint.gguf_quants import BLOCK_SIZES, dequantize  # noqa: E402

SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    elems, size = BLOCK_SIZES[name]
    n = rows * cols // elems
    if name in ("F32", "F16", "BF16"):
        value = rng.standard_normal(rows * cols).astype(np.float32)
        if name == "F16":
            return value.astype(np.float16).view(np.uint8).reshape(rows, -1)
        if name == "BF16":
            return (value.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
        return value.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in SCALES[name]:
        raw[:, at:at + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/zbench_gguf_out"))
    ap.add_argument("--cpu", action="store_true", help="parity on the CPU only (no timing)")
    args = ap.parse_args()
    import gguf

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    rng = np.random.default_rng(0)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?", "types": {}}
    for name in BLOCK_SIZES:
        qtype = gguf.GGMLQuantizationType[name]
        stored = random_blocks(name, 64, 4096, rng)
        expected = np.asarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32).reshape(64, 4096)
        got = dequantize(torch.from_numpy(stored.copy()).to(device), name, (64, 4096)).cpu().numpy()
        same = bool(np.array_equal(got.view(np.uint32), expected.view(np.uint32)))
        results["types"][name] = {"bit_exact": same}
        print(f"{name:5s} bit-exact vs gguf.quants.dequantize on {device.type}: {same}", flush=True)
    if device.type == "cuda":
        rows, cols = 10240, 3840  # feed_forward.w1 of the official transformer

        def timed(fn) -> float:
            for _ in range(3):
                fn()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)

        bf16 = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
        ms = timed(lambda: bf16.clone())
        results["bf16_copy_ms"] = ms
        print(f"bf16 weight copy (the read a bf16 layer does not need): {ms:.3f} ms", flush=True)
        for name in BLOCK_SIZES:
            raw = torch.from_numpy(random_blocks(name, rows, cols, rng)).to(device)
            ms = timed(lambda raw=raw, name=name: dequantize(raw, name, (rows, cols), torch.bfloat16))
            results["types"][name].update(ms_w1=ms, bytes=raw.numel())
            print(f"{name:5s} dequantise w1 to bf16: {ms:.3f} ms ({raw.numel() / 2**20:.1f} MiB stored)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gguf_kernels.json").write_text(json.dumps(results, indent=1))
    if not all(t["bit_exact"] for t in results["types"].values()):
        raise SystemExit("some type is not bit-exact")


if __name__ == "__main__":
    main()
