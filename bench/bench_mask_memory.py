"""Peak memory of ZImageInpaintMask against core GrowMask + FeatherMask on one large mask (CPU).

Each measurement runs in its own child process that loads ComfyUI with the pack (scripts/comfy_headless.py,
ComfyUI's own loader), builds a (1, N, N) float32 mask (a painted rectangle), resets the kernel's peak-RSS
counter (/proc/self/clear_refs), runs the node(s) and reads the peak (VmHWM). Core: GrowMask(expand=grow) then
FeatherMask(feather on all four sides); ours: ZImageInpaintMask(grow, feather). Linux only.

  .venv/bin/python bench/bench_mask_memory.py --sizes 4096 8192 --grow 256 --feather 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(which: str, size: int, grow: int, feather: int) -> dict:
    import torch

    from scripts.comfy_headless import HeadlessComfyUI
    from zimage_core.demo_weights import write_demo_models

    work = Path(tempfile.mkdtemp(prefix="zimage-maskmem-"))
    write_demo_models(work / "models")
    comfy = HeadlessComfyUI(work / "models", work).start()
    nodes = comfy.node_classes
    mask = torch.zeros(1, size, size)
    mask[:, size // 4:size // 2, size // 3:size // 2] = 1.0
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    if which == "ours":
        (out,) = nodes["ZImageInpaintMask"]().prepare(mask, grow, feather)
    else:
        (out,) = nodes["GrowMask"]().expand_mask(mask, grow, True)
        (out,) = nodes["FeatherMask"]().feather(out, feather, feather, feather, feather)
    seconds = time.perf_counter() - start
    return {"which": which, "size": size, "grow": grow, "feather": feather, "rss_before_mib": before / 2**20,
            "peak_rss_mib": _status("VmHWM") / 2**20, "seconds": seconds, "mask_mib": mask.numel() * 4 / 2**20,
            "out_shape": list(out.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--grow", type=int, default=256)
    ap.add_argument("--feather", type=int, default=256)
    ap.add_argument("--which", nargs="+", default=["ours", "core"])
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.grow, args.feather)), flush=True)
        return
    for size in args.sizes:
        for which in args.which:
            proc = subprocess.run([sys.executable, __file__, "--child", which, str(size), "--grow", str(args.grow),
                                   "--feather", str(args.feather)], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{which} {size}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(line[7:])
            print(f"{which:5} {size}²: peak RSS {r['peak_rss_mib']:.0f} MiB (before {r['rss_before_mib']:.0f} MiB, "
                  f"mask {r['mask_mib']:.0f} MiB), {r['seconds']:.1f} s", flush=True)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
