"""Issue 12's (default) or issue 21's (`--issue 21`) targets side by side, from the JSON files of one device
command (bench.py runs and bench_nodes.py), as markdown tables ready for RESULTS.md.

Usage: python3 bench/targets.py [--issue 21] $OUT/*.json [--md $OUT/targets.md]
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
    env: dict[str, Any] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "results" in data:
            for r in data["results"]:
                results.append({**r, "_file": Path(p).name})
        elif "node_8step_eager_ms" in data:
            nodes = data
        env.update(data.get("env") or {})
    return results, {**nodes, "_env": env}


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


def sci(v) -> str:
    return "–" if v is None else f"{v:.2e}"


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


def best(results, impls: list[str], what: str = "step") -> tuple[str | None, float | None]:
    """The fastest of `impls` that has a `what` figure: (impl, median ms)."""
    got = [(val(find(results, i, what)), i) for i in impls]
    got = [(v, i) for v, i in got if v is not None]
    return (min(got)[1], min(got)[0]) if got else (None, None)


def build21(results, nodes) -> str:
    out: list[str] = []
    step = lambda impl: val(find(results, impl, "step"))  # noqa: E731
    e2e = lambda impl: val(find(results, impl, "e2e"))  # noqa: E731
    impls = list(dict.fromkeys(r["impl"] for r in results if r.get("what") == "step"))
    bf16 = [i for i in impls if i.startswith("ours") and "fp8" not in i]
    fp8 = [i for i in impls if i.startswith("ours") and "fp8" in i]
    env = nodes.get("_env", {})
    out.append(f"### Issue 21 targets ({env.get('gpu', '?')}, torch {env.get('torch', '?')}, {SIZE}², batch 1)\n")
    rows = []
    ce, cc = step("comfy"), step("comfy+compile")
    bi, bv = best(results, bf16)
    rows.append(["bf16 step (ms), best of ours", f"{fmt(bv)} ({bi})", f"ComfyUI eager {fmt(ce)} / compiled {fmt(cc)}",
                 f"{fmt(ratio(ce, bv), '×', 2)} / {fmt(ratio(cc, bv), '×', 2)}", "≤ 82 ms, ≥ 1.39× / ≥ 1.14×",
                 verdict(None if None in (bv, ce, cc) else bv <= 82 and ce / bv >= 1.39 and cc / bv >= 1.14)])
    for i in bf16:
        rows.append([f"  {i} step / 8 steps (ms)", fmt(step(i)), fmt(val(find(results, i, "denoise8"))), "", "", ""])
    nf, nfc = step("comfy+fp8fast"), step("comfy+fp8fast+compile")
    fi, fv = best(results, fp8)
    rows.append(["fp8 step (ms), best of ours", f"{fmt(fv)} ({fi})",
                 f"native fp8_e4m3fn_fast eager {fmt(nf)} / compiled {fmt(nfc)}", fmt(ratio(nfc, fv), "× vs compiled", 2),
                 "≤ 58 ms, faster than native compiled",
                 verdict(None if fv is None or nfc is None else fv <= 58 and fv < nfc)])
    for i in fp8:
        rows.append([f"  {i} step / 8 steps (ms)", fmt(step(i)), fmt(val(find(results, i, "denoise8"))), "", "", ""])
    err = {r["impl"]: r for r in results if r.get("what") == "fp8_vs_bf16_8step"}
    native = err.get("comfy+fp8fast")
    for i, r in err.items():
        if i == "comfy+fp8fast":
            continue
        ne = val(native, "latent_rel_err")
        rows.append([f"8-step fp8 error vs bf16, latents rel. ({i})", fmt(r.get("latent_rel_err"), "", 4),
                     f"native {fmt(ne, '', 4)}", f"PSNR {fmt(r.get('psnr_db'))} dB vs native {fmt(val(native, 'psnr_db'))}",
                     "≤ native's", verdict(None if ne is None or r.get("latent_rel_err") is None
                                          else r["latent_rel_err"] <= ne)])
    if native is not None:
        rows.append(["  native fp8 error vs ours bf16 (latents / PSNR)", fmt(native.get("vs_ours_latent_rel_err"), "", 4),
                     fmt(native.get("vs_ours_psnr_db")), "", "", ""])
    cb = find(results, "comfy", "bf16_vs_ours_bf16_8step")
    if cb is not None:
        rows.append(["  ComfyUI bf16 vs ours bf16, 8 steps (latents / PSNR)", fmt(cb.get("latent_rel_err"), "", 4),
                     fmt(cb.get("psnr_db")), "", "(bf16 rounding between two implementations)", ""])
    eb_i, eb = best(results, bf16, "e2e")
    ef_i, ef = best(results, fp8, "e2e")
    rows.append(["end to end bf16 (ms)", f"{fmt(eb)} ({eb_i})", f"ComfyUI eager {fmt(e2e('comfy'))} / compiled "
                 f"{fmt(e2e('comfy+compile'))}", "", "≤ 700 ms", verdict(None if eb is None else eb <= 700)])
    rows.append(["end to end fp8 (ms)", f"{fmt(ef)} ({ef_i})", f"native fp8 eager {fmt(e2e('comfy+fp8fast'))}", "",
                 "≤ 520 ms", verdict(None if ef is None else ef <= 520)])
    base = {r["impl"]: r.get("median_ms") for r in results if r.get("what") == "e2e_base"}
    ob_i = next((i for i in base if i.startswith("ours")), None)
    if ob_i and base.get("comfy"):
        tr = ratio(e2e("comfy"), e2e(ob_i))
        rows.append(["Base end to end, 30 steps CFG 4 (ms)", f"{fmt(base[ob_i])} ({ob_i})", f"ComfyUI eager "
                     f"{fmt(base['comfy'])}", fmt(ratio(base["comfy"], base[ob_i]), "×", 2),
                     f"same ratio as Turbo ({fmt(tr, '×', 2)})",
                     verdict(None if tr is None else base["comfy"] / base[ob_i] >= 0.97 * tr)])
    fi_r = next((r for r in results if r.get("what") == "first_image"), None)
    t = val(fi_r, "total_first_s")
    rows.append(["first image, fresh process, default path (s)", fmt(t),
                 "" if fi_r is None else f"{fi_r['impl']}, Triton cache {fi_r.get('triton_cache', '?')}", "", "≤ 5 s",
                 verdict(None if t is None else t <= 5)])
    ng, ne_, cg, ce8 = (nodes.get(k) for k in ("node_8step_graph_ms", "node_8step_eager_ms", "core_8step_graph_ms",
                                                "core_8step_eager_ms"))
    rows.append(["8 steps through the nodes (graphs) vs zimage_core eager (ms)", fmt(ng), fmt(ce8),
                 fmt(ratio(ng, ce8), "×", 3), "≤ 1.03×", verdict(None if ng is None or ce8 is None else ng / ce8 <= 1.03)])
    rows.append(["  nodes eager / core eager / core graphs (ms)", fmt(ne_), fmt(ce8), fmt(cg), "", ""])
    nk = nodes.get("node_8step_graph_keep_ms")
    rows.append(["  nodes, graphs kept between runs (ZIMAGE_CUDA_GRAPHS=keep) (ms)", fmt(nk), fmt(ce8),
                 fmt(ratio(nk, ce8), "×", 3), "≤ 1.03×", verdict(None if nk is None or ce8 is None else nk / ce8 <= 1.03)])
    nc = nodes.get("node_8step_compiled_ms")
    rows.append(["compile node vs graphs, 8 steps through the nodes (ms)", fmt(nc), fmt(ng), fmt(ratio(ng, nc), "×", 3),
                 "keep the compile node only if faster", "" if nc is None or ng is None else
                 ("compile node faster" if nc < ng else "graphs faster")])
    out.append(table(rows, ["figure", "ours", "reference", "ratio", "target", "result"]))
    if nodes.get("node_run_syncs"):
        out.append("\nHost waits for the GPU in one node run (torch sync debug mode): "
                   + ", ".join(f"{k} ×{v}" for k, v in nodes["node_run_syncs"].items()))

    arows = [[r["what"], "yes" if r.get("available") else "no", fmt(r.get("ms"), "", 3),
              fmt(r.get("speedup_vs_sdpa"), "×", 2), fmt(r.get("rel_vs_fp32"), "", 4),
              fmt(r.get("rel_vs_emulation"), "", 4), (r.get("why") or r.get("failed") or "")[:90]]
             for r in results if r.get("impl") == "attn"]
    if arows:
        out.append(f"\n### Attention backends (main blocks' shape at {SIZE}²; default: {env.get('attention_default', '?')})\n")
        out.append(table(arows, ["backend", "available", "ms", "vs SDPA", "rel. err vs fp32", "vs its emulation",
                                 "note"]))
    grows = [[r["impl"], str(r.get("captures")), fmt(r.get("eager_step_ms")), fmt(r.get("graph_step_ms")),
              fmt(r.get("speedup"), "×", 3), fmt(r.get("capture_call_ms")), sci(r.get("replay_vs_eager_max_abs")),
              sci(r.get("replay_other_inputs_vs_eager_max_abs")), fmt(r.get("recaptured_after_weight_swap"))]
             for r in results if r.get("what") == "graph_check"]
    if grows:
        out.append("\n### Whole-step CUDA graphs (replay against the eager step on the same inputs)\n")
        out.append(table(grows, ["impl", "captures", "eager ms", "graph ms", "speedup", "capture call ms",
                                 "max abs vs eager", "other inputs", "recaptured after weight swap"]))
    prows = [[r["impl"], fmt(r.get("kernel_total_ms")), fmt(r.get("matmul_ms")), fmt(r.get("attention_ms")),
              fmt(r.get("elementwise/other_ms")), fmt(step(r["impl"]))] for r in results if r.get("what") == "profile"]
    if prows:
        out.append("\n### Where the time goes (GPU kernel time of one step, ms)\n")
        out.append(table(prows, ["impl", "kernels", "matmul", "attention", "elementwise/other", "wall step"]))
    k = build(results, {}).split("### Fused kernels on the GPU")
    if len(k) > 1:
        out.append("\n### Fused kernels on the GPU" + k[1])
    return "\n".join(out)


def main() -> None:
    global SIZE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--md", help="also write the tables to this file")
    ap.add_argument("--size", type=int, default=1024, help="the size of the targets table (default 1024)")
    ap.add_argument("--issue", type=int, default=12, choices=[12, 21], help="which issue's table (default 12)")
    args = ap.parse_args()
    SIZE = args.size
    results, nodes = load([f for f in args.files if Path(f).is_file()])
    text = build21(results, nodes) if args.issue == 21 else build(results, nodes)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
