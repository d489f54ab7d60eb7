"""Issue 12's targets side by side, from the JSON files of one device command (bench.py runs and
bench_nodes.py), as markdown tables ready for RESULTS.md.

Usage: python3 bench/targets.py $OUT/*.json [--md $OUT/targets.md]
Every figure is looked up by (impl, what, size, batch) in the bench.py results; a missing one prints "–".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SIZE, BATCH = 1024, 1


def load(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    results: list[dict[str, Any]] = []
    nodes: dict[str, Any] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "results" in data:
            for r in data["results"]:
                results.append({**r, "_file": Path(p).name})
        elif "node_8step_eager_ms" in data:
            nodes = data
    return results, nodes


def find(results, impl: str, what: str, size: int | None = None, batch: int | None = None):
    size, batch = SIZE if size is None else size, BATCH if batch is None else batch
    hits = [r for r in results if r.get("impl") == impl and r.get("what") == what
            and r.get("size") == size and r.get("batch") == batch]
    return hits[-1] if hits else None


def val(r, key: str = "median_ms"):
    return None if r is None else r.get(key)


def fmt(v, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "missed")


def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build(results, nodes) -> str:
    out: list[str] = []
    step = lambda impl: val(find(results, impl, "step"))  # noqa: E731
    e2e = lambda impl: val(find(results, impl, "e2e"))  # noqa: E731

    # -- the targets table
    rows = []
    oc, cc = step("ours+compile"), step("comfy+compile")
    rows.append(["compiled bf16 step (ms)", fmt(oc), fmt(cc), fmt(ratio(cc, oc), "×", 2), "≤ 82 ms, ≥ 1.15×",
                 verdict(None if oc is None or cc is None else oc <= 82 and cc / oc >= 1.15)])
    oe, ce, de, nf = step("ours"), step("comfy"), step("diffusers"), step("ours+nofuse")
    rows.append(["eager bf16 step (ms)", fmt(oe), fmt(ce), fmt(ratio(ce, oe), "×", 2), "≤ 95 ms, ≥ 1.25×",
                 verdict(None if oe is None or ce is None else oe <= 95 and ce / oe >= 1.25)])
    rows.append(["eager step without fused kernels (ms)", fmt(nf), "", fmt(ratio(nf, oe), "× (kernels' gain)", 2),
                 "", ""])
    rows.append(["eager step, diffusers (ms)", fmt(de), "", fmt(ratio(de, oe), "×", 2), "", ""])
    f8 = step("ours+fp8+compile") or step("ours+fp8")
    f8a = step("ours+fp8+fp8attn+compile") or step("ours+fp8+fp8attn")
    rows.append(["fp8 step, fp8 weights (ms)", fmt(f8), "", "", "", ""])
    rows.append(["fp8 step, + fp8 attention (ms)", fmt(f8a), "", fmt(ratio(f8, f8a), "× vs fp8 weights", 2),
                 "≤ 58 ms", verdict(None if f8a is None else f8a <= 58)])
    errs = {}
    for impl in ("ours+fp8+compile", "ours+fp8", "ours+fp8+fp8attn+compile", "ours+fp8+fp8attn"):
        r = find(results, impl, "fp8_vs_bf16_8step")
        if r is not None:
            errs["attn" if "fp8attn" in impl else "w"] = r
    ew, ea = val(errs.get("w"), "latent_rel_err"), val(errs.get("attn"), "latent_rel_err")
    rows.append(["fp8 error vs bf16, 8 steps: latents rel. (weights / + attention)", fmt(ew, "", 4), fmt(ea, "", 4),
                 fmt(ratio(ea, ew), "×", 2), "≤ 1.5× (else off by default)",
                 verdict(None if ea is None or ew is None else ea / ew <= 1.5)])
    pw, pa = val(errs.get("w"), "psnr_db"), val(errs.get("attn"), "psnr_db")
    rows.append(["fp8 pixels PSNR vs bf16 (dB) (weights / + attention)", fmt(pw), fmt(pa), "", "", ""])
    ec = e2e("ours+compile")
    rows.append(["end to end bf16 compiled (ms)", fmt(ec), fmt(e2e("comfy")), fmt(ratio(e2e("comfy"), ec), "× vs ComfyUI eager", 2),
                 "≤ 720 ms", verdict(None if ec is None else ec <= 720)])
    ef = e2e("ours+fp8+fp8attn+compile") or e2e("ours+fp8+compile")
    rows.append(["end to end fp8 (ms)", fmt(ef), "", "", "≤ 550 ms", verdict(None if ef is None else ef <= 550)])
    rows.append(["end to end eager: ours / ComfyUI / diffusers (ms)", fmt(e2e("ours")), fmt(e2e("comfy")),
                 fmt(e2e("diffusers")), "", ""])
    fi = [r for r in results if r.get("what") == "first_image"]
    cold = next((r for r in fi if not r.get("cache_files_before")), None)
    warm = next((r for r in fi if r.get("cache_files_before")), None)
    for name, r, lim in (("first image, fresh process, cold cache (s)", cold, 15), ("first image, warm cache (s)", warm, 6)):
        t = val(r, "total_first_s")
        detail = "" if r is None else (f"import {r['import_s']:.1f} + wrap/load {r['wrap_s']:.1f} + image "
                                       f"{r['first_call_s']:.1f} s")
        rows.append([name, fmt(t), detail, "", f"≤ {lim} s", verdict(None if t is None else t <= lim)])
    ne, ce8 = nodes.get("node_8step_eager_ms"), nodes.get("core_8step_eager_ms")
    rows.append(["8 steps through the nodes vs zimage_core (ms)", fmt(ne), fmt(ce8), fmt(ratio(ne, ce8), "×", 3),
                 "≤ 1.03×", verdict(None if ne is None or ce8 is None else ne / ce8 <= 1.03)])
    out.append(f"### Targets (H200, {SIZE}², batch 1)\n")
    out.append(table(rows, ["figure", "ours", "reference", "ratio", "target", "result"]))

    # -- scaling
    sizes = sorted({r["size"] for r in results if r.get("what") == "step" and r.get("size")})
    batches = sorted({r["batch"] for r in results if r.get("what") == "step" and r.get("batch")})
    impls = [i for i in ("ours", "ours+compile", "ours+fp8+fp8attn+compile", "comfy", "comfy+compile")
             if any(r.get("impl") == i and r.get("what") == "step" for r in results)]
    if len(sizes) > 1 or len(batches) > 1:
        srows = []
        for size in sizes:
            for b in batches:
                cells = []
                for impl in impls:
                    r = find(results, impl, "step", size, b)
                    cells.append("–" if r is None else f"{r['median_ms']:.1f} ms / {r.get('mfu', 0) * 100:.0f}%")
                srows.append([f"{size}², {b}", *cells])
        out.append("\n### Step time / MFU by size and batch\n")
        out.append(table(srows, ["size, batch", *impls]))
        for impl in impls:
            m = {(r["size"], r["batch"]): r.get("mfu") for r in results
                 if r.get("impl") == impl and r.get("what") == "step" and r.get("mfu")}
            falls = [f"{s}² b{b}" for (s, b), v in m.items()
                     if (b > 1 and m.get((s, 1)) and v < m[(s, 1)] * 0.98)
                     or (s == 2048 and m.get((1024, b)) and v < m[(1024, b)] * 0.98)]
            out.append(f"\n{impl}: MFU " + ("does not fall at batch 4 / 2048²" if not falls else
                                          "falls (>2%) at " + ", ".join(falls)))

    # -- kernels
    krows = []
    for r in results:
        if r.get("impl") != "kernel":
            continue
        if r["what"] == "fp8_attention":
            krows.append([r["what"], fmt(r.get("fp8_vs_bf16_rel"), "", 4) + " vs bf16",
                          f"fp8 {fmt(r.get('fp8_rel'), '', 4)} / bf16 {fmt(r.get('bf16_sdpa_rel'), '', 4)}",
                          f"{fmt(r.get('fp8_ms'), '', 3)} vs cuDNN {fmt(r.get('bf16_sdpa_ms'), '', 3)}",
                          fmt(r.get("speedup_vs_cudnn"), "×", 2)])
        else:
            krows.append([r["what"], fmt(r.get("fused_vs_ref_max_rel"), "", 5),
                          f"fused {fmt(r.get('fused_vs_fp64_max_rel'), '', 5)} / torch {fmt(r.get('ref_vs_fp64_max_rel'), '', 5)}",
                          f"{fmt(r.get('fused_ms'), '', 3)} vs {fmt(r.get('ref_ms'), '', 3)}",
                          fmt(r.get("speedup"), "×", 2)])
    if krows:
        out.append("\n### Fused kernels on the GPU (max rel. error; ms fused vs torch)\n")
        out.append(table(krows, ["kernel", "fused vs torch path", "vs float64", "ms", "speedup"]))
    return "\n".join(out)


def main() -> None:
    global SIZE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--md", help="also write the tables to this file")
    ap.add_argument("--size", type=int, default=1024, help="the size of the targets table (default 1024)")
    args = ap.parse_args()
    SIZE = args.size
    results, nodes = load(args.files)
    text = build(results, nodes)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
