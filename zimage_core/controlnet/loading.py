"""Loading Z-Image Fun ControlNet Union files: every published layout, told apart by keys and shapes.

alibaba-pai's single files (ComfyUI: models/model_patches) and diffusers' `ZImageControlNetModel`
folders use the same tensor names (diffusers attention names: to_q/to_k/to_v, to_out.0, norm_q/norm_k):

    control_all_x_embedder.2-1.{weight,bias}     [dim, 4·in]   in = 16 (1.0) or 33 (2.x: + mask + masked image)
    control_layers.{i}.<block>                   15 (2.0/2.1/tile), 6 (1.0), 3 (lite)
    control_layers.0.before_proj, control_layers.{i}.after_proj
    control_noise_refiner.{0,1}.<block>          1.0: plain blocks; 2.1/lite/tile: control blocks
                                                 (before_proj on 0, after_proj); 2.0: untrained (all
                                                 zero, ComfyUI's "broken" file) or absent (diffusers' copy)

Layout → wiring (as ComfyUI's ModelPatchLoader and diffusers' single-file detection decide it):
1.0: 16 channels, plain refiner, hints after main blocks 0, 5, ..., 25.
2.0: 33 channels, the control layers also drive the noise refiner, hints after blocks 0, 2, ..., 28.
2.1 (and Tile 2.1): 33 channels, control-block refiner, hints after blocks 0, 2, ..., 28.
lite (Union / Tile 2.1 lite): 33 channels, control-block refiner, hints after blocks 0, 10, 20.
Tile files share the 2.1 / lite layouts (the control image differs, not the model).

The later files reuse these layouts (alibaba-pai's VideoX-Fun loads them all with its z_image_control_2.1.yaml
and z_image_control_2.1_lite.yaml: control_layers_places 0, 2, ..., 28 or 0, 10, 20; refiner places 0, 1):
the Turbo 2.1 updates 2601 / 2602 (-2.1-2601-8steps, -2.1-lite-2601-8steps, ...: "lite, 5 layers" = 3 control +
2 refiner blocks) and the Z-Image (Base) files Z-Image-Fun-Controlnet-Union-2.1(-lite) / -Tile-2.1(-lite).
Base and Turbo files have the same tensor names and shapes (diffusers' single-file detection calls both
"z-image-turbo-controlnet-2.1"), so which model a file was trained for is read from its metadata or name
(`identify`): the layout decides the wiring, the family only informs the user.

Our parameter names are the transformer's (fused attention.qkv, out, q_norm/k_norm) under
x_embedder / layers / refiner; the conversion lives here, not in the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.dequant import quant_layers, stored_dtype
from ..checkpoint.io import Checkpoint, open_checkpoint
from ..checkpoint.kinds import CONTROLNET_EMBED_KEY
from ..checkpoint.materialise import read_joined, set_param
from ..checks import BoundsError, compute_dtype, numbered_blocks, release_on_error
from ..errors import CheckpointError
from .model import LATENT_CHANNELS, ControlNetConfig, ZImageControlNet

WHAT = "a Z-Image Fun ControlNet Union checkpoint"
_FIX = ("Download the file again from alibaba-pai (Z-Image-Turbo-Fun-Controlnet-Union-2.1 for Z-Image-Turbo, "
        "Z-Image-Fun-Controlnet-Union-2.1 for Z-Image Base) into models/model_patches (or models/controlnet).")
MAIN_LAYERS = 30  # hint places are spread over the 30 main blocks of Z-Image-Turbo
EMBED_KEY = CONTROLNET_EMBED_KEY
# A few files carry a prefix (e.g. re-saved through another tool).
PREFIXES = ("", "controlnet.", "model.", "diffusion_model.")
_RENAMES = (
    ("control_all_x_embedder.2-1.", "x_embedder."),
    ("control_layers.", "layers."),
    ("control_noise_refiner.", "refiner."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV_RE = re.compile(r"^(.*\.attention\.)(to_q|to_k|to_v)\.weight$")
LAYOUTS = ("1.0", "2.0", "2.1", "lite")
# (input channels, control layers, refiner blocks) of every published single file, per layout: anything else
# is a cut-short or unknown file (a diffusers folder's config.json may say other places).
PUBLISHED = {"1.0": {(LATENT_CHANNELS, 6, 2)}, "2.0": {(33, 15, 0), (33, 15, 2)}, "2.1": {(33, 15, 2)},
             "lite": {(33, 3, 2)}}
FAMILIES = ("Z-Image-Turbo", "Z-Image (Base)")
_RELEASE_RE = re.compile(r"(?:^|[-_. ])(26\d\d)(?=$|[-_. ])")
# alibaba-pai names Base files Z-Image-Fun-*, Turbo files Z-Image-Turbo-Fun-*; ComfyUI's Base file is
# z_image_bf16 (Turbo: z_image_turbo_bf16).
_BASE_RE = re.compile(r"z-?image-fun-|(?:^|[-/])base(?:$|[-/])|(?:^|/)z-?image-(?:bf16|fp16|fp32|fp8)"
                      r"|(?:^|/)z-?image/transformer")


def family_of(text: str) -> str | None:
    """Which Z-Image a file name (or metadata text) says it belongs to: one of FAMILIES, or None."""
    s = re.sub(r"[\s_.]+", "-", str(text).lower())
    if "turbo" in s:
        return FAMILIES[0]
    if _BASE_RE.search(s):
        return FAMILIES[1]
    return None


def identify(path: object, metadata: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """family (FAMILIES or None), release ("2601", "2602" or "") and kind ("Union", "Tile" or "") of a
    ControlNet file, from its safetensors metadata when that names a model, else from its (folder) name."""
    name = "/".join(Path(str(path)).parts[-2:])
    family = None
    for value in (metadata or {}).values():
        if isinstance(value, str) and len(value) < 4096 and ("image" in value.lower()):
            family = family or family_of(value)
    family = family or family_of(Path(str(path)).name) or family_of(name)
    low = name.lower()
    release = _RELEASE_RE.search(Path(str(path)).name)
    kind = "Tile" if "tile" in low else "Union" if "union" in low else ""
    return {"family": family, "release": release.group(1) if release else "", "kind": kind}


@dataclass(frozen=True)
class ControlNetLayout:
    """What a file is: its published layout and the model config it implies."""

    name: str  # one of LAYOUTS
    config: ControlNetConfig
    prefix: str = ""
    untrained_refiner: bool = False  # the 2.0 file with all-zero control_noise_refiner ("broken" in ComfyUI)
    family: str | None = None  # FAMILIES[i] when the file's metadata or name says it, else None
    release: str = ""  # "2601" / "2602" (Turbo 2.1 updates) when the name says it
    kind: str = ""  # "Union" / "Tile" when the name says it

    def describe(self) -> str:
        cfg = self.config
        extra = " (untrained refiner blocks ignored)" if self.untrained_refiner else ""
        kind = self.kind or ("Union / Tile" if self.name in ("2.1", "lite") else "Union")
        name = self.name if self.name != "lite" else "2.1 lite"
        release = f"-{self.release}" if self.release else ""
        family = f" for {self.family}" if self.family else ""
        refiner = {"plain": f" + {cfg.n_refiner_layers} refiner blocks",
                   "control": f" + {cfg.n_refiner_layers} control refiner blocks",
                   "control_layers": " (which also steer the noise refiner)"}[cfg.refiner]
        places = ", ".join(map(str, cfg.layer_places))
        return (f"Fun ControlNet {kind} {name}{release}{family}: {cfg.n_control_layers} control layers{refiner}, "
                f"{cfg.in_channels} input channels, dim {cfg.dim}; hints after main blocks {places}{extra}")


def file_keys(name: str) -> tuple[str, ...]:
    """Our parameter name → its tensor name(s) in the published files (three for a fused qkv)."""
    for new, old in (("x_embedder.", "control_all_x_embedder.2-1."), ("layers.", "control_layers."),
                     ("refiner.", "control_noise_refiner.")):
        if name.startswith(new):
            name = old + name[len(new):]
            break
    for old, new in _RENAMES[3:]:
        name = name.replace(new, old)
    if name.endswith(".attention.qkv.weight"):
        stem = name[: -len("qkv.weight")]
        return tuple(f"{stem}{p}.weight" for p in ("to_q", "to_k", "to_v"))
    return (name,)


def _prefix(keys: set[str], path: object) -> str:
    for prefix in PREFIXES:
        if prefix + EMBED_KEY in keys:
            return prefix
    raise CheckpointError(path, WHAT, _describe_other(keys), _fix_other(keys))


def _describe_other(keys: set[str]) -> str:
    text = " ".join(sorted(keys)[:2000])
    if "cap_embedder." in text or "noise_refiner.0.attention" in text.replace("control_noise_refiner", ""):
        return "a Z-Image diffusion transformer (cap_embedder / layers keys), not a ControlNet"
    if "self_attn." in text:
        return "a text encoder (model.layers.N.self_attn keys)"
    if "decoder.conv_in" in text or "encoder.down" in text:
        return "a VAE (encoder/decoder keys)"
    if "controlnet_blocks." in text or "input_hint_block" in text or "controlnet_x_embedder" in text:
        return "a ControlNet for another model (SD / FLUX / Qwen-Image keys)"
    return f"no Fun ControlNet tensors (first keys: {', '.join(sorted(keys)[:5])})"


def _fix_other(keys: set[str]) -> str:
    text = " ".join(sorted(keys)[:2000])
    if "cap_embedder." in text:
        return ("Load the transformer with Z-Image Model Loader (models/diffusion_models); pick a "
                "Z-Image-Turbo-Fun-Controlnet-Union file here.")
    return _FIX


def _zero(ckpt: Checkpoint | Mapping[str, torch.Tensor], key: str) -> bool:
    return key in ckpt and not torch.count_nonzero(ckpt[key]).item()


def _shape(ckpt: Checkpoint | Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(ckpt, Checkpoint):
        return tuple(ckpt.shape(key))
    return tuple(ckpt[key].shape)


def _places(n: int) -> tuple[int, ...]:
    # ComfyUI's ZImageControlPatch: control layer k after main block k·round(30/n); diffusers' configs agree.
    step = max(1, round(MAIN_LAYERS / n))
    return tuple(k * step for k in range(n))


def detect_layout(ckpt: Checkpoint | Mapping[str, torch.Tensor], path: object = "<state dict>",
                  config_json: Mapping[str, Any] | None = None) -> ControlNetLayout:
    """Decide the layout from key names and shapes (and the refiner's zero weights for 2.0)."""
    keys = set(ckpt.keys())
    prefix = _prefix(keys, path)
    p = prefix
    try:
        n_layers = numbered_blocks(keys, f"{p}control_layers.", "control_layers", max_count=128)
        n_refiner = numbered_blocks(keys, f"{p}control_noise_refiner.", "control_noise_refiner", max_count=16)
    except BoundsError as e:
        raise CheckpointError(path, f"{WHAT} (control layers numbered 0..n-1)", f"{e.name} = {e.value}", _FIX) from None
    if n_layers == 0:
        raise CheckpointError(path, WHAT, "a patch embedder without control_layers", _FIX)
    embed = _shape(ckpt, p + EMBED_KEY)
    norm_q = f"{p}control_layers.0.attention.norm_q.weight"
    if len(embed) != 2 or embed[1] % 4 or norm_q not in keys or len(_shape(ckpt, norm_q)) != 1:
        raise CheckpointError(path, f"{WHAT} ({EMBED_KEY} [dim, 4·channels], attention.norm_q [head_dim])",
                              f"{EMBED_KEY} {list(embed)}", _FIX)
    dim, in_channels = embed[0], embed[1] // 4
    head = _shape(ckpt, norm_q)[0]
    if head <= 0 or dim % head:
        raise CheckpointError(path, WHAT, f"head size {head} that does not divide dim {dim}", _FIX)
    refiner_is_control = f"{p}control_noise_refiner.0.before_proj.weight" in keys
    untrained = False
    if in_channels == LATENT_CHANNELS:
        name, refiner = "1.0", "plain"
    elif n_refiner == 0:
        name, refiner = "2.0", "control_layers"  # diffusers drops the untrained refiner when converting 2.0
    elif refiner_is_control:
        # 2.0 shipped its refiner control blocks untrained: zero after_proj (ComfyUI's test) / before_proj
        # (diffusers' test). Both references only look for it in the 15-layer files.
        untrained = n_layers >= 15 and (_zero(ckpt, f"{p}control_noise_refiner.0.after_proj.weight")
                                        or _zero(ckpt, f"{p}control_noise_refiner.0.before_proj.weight"))
        if untrained:
            name, refiner = "2.0", "control_layers"
        else:
            name, refiner = ("2.1" if n_layers >= 15 else "lite"), "control"
    else:
        raise CheckpointError(path, f"{WHAT} (2.x: control_noise_refiner blocks with before_proj/after_proj)",
                              f"{in_channels} input channels with plain refiner blocks", _FIX)
    places, refiner_places = _places(n_layers), (0, 1)
    if not config_json and (in_channels, n_layers, n_refiner) not in PUBLISHED[name]:
        shapes = " or ".join(f"{c} channels, {n} control layers + {r} refiner blocks" for c, n, r in
                             sorted(PUBLISHED[name], reverse=True))
        raise CheckpointError(path, f"{WHAT} in its published {name} layout ({shapes})",
                              f"{n_layers} control layers and {n_refiner} refiner blocks with {in_channels} input "
                              "channels: the file is cut short or not one of alibaba-pai's", _FIX)
    if config_json:  # a diffusers folder says where its hints go
        places = tuple(config_json.get("control_layers_places") or places)
        refiner_places = tuple(config_json.get("control_refiner_layers_places") or refiner_places)
        mode = config_json.get("add_control_noise_refiner", "unset")
        if mode != "unset" and {None: "plain", "control_layers": "control_layers",
                                "control_noise_refiner": "control"}.get(mode) != refiner:
            raise CheckpointError(path, f"{WHAT} whose config.json matches its tensors",
                                  f"add_control_noise_refiner={mode!r} for a {name} layout", _FIX)
    try:
        config = ControlNetConfig(dim=dim, n_heads=dim // head, in_channels=in_channels, refiner=refiner,
                                  n_refiner_layers=n_refiner if refiner != "control_layers" else 0,
                                  layer_places=places, refiner_places=refiner_places if refiner != "plain" else ())
    except (BoundsError, ValueError) as e:
        raise CheckpointError(path, WHAT, f"an unusable layout ({e})", _FIX) from None
    if len(places) != n_layers:
        raise CheckpointError(path, f"{WHAT} with one hint place per control layer",
                              f"{n_layers} control layers and {len(places)} control_layers_places", _FIX)
    return ControlNetLayout(name, config, prefix, untrained, **identify(path, getattr(ckpt, "metadata", None)))


def _plan(model: ZImageControlNet, prefix: str) -> dict[str, tuple[str, ...]]:
    return {name: tuple(prefix + k for k in file_keys(name)) for name, _ in model.named_parameters()}


def _controlnet_path(path: str | os.PathLike) -> Path:
    """A diffusers pipeline root holding a controlnet/ folder means that folder."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors*")) and (path / "controlnet").is_dir():
        return path / "controlnet"
    return path


@release_on_error
def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    operations: Any = None, mmap: bool = True,
                    check_interrupt: Callable[[], None] | None = None) -> tuple[ZImageControlNet, ControlNetLayout]:
    """Load any Fun ControlNet Union layout from a single file or a diffusers folder.

    Returns the model (weights copied out of the file, in `dtype`, default the stored one) and its layout.
    """
    dtype = compute_dtype(dtype, "load_controlnet: dtype")
    with open_checkpoint(_controlnet_path(path), WHAT, mmap=mmap) as ckpt:
        layout = detect_layout(ckpt, ckpt.path, ckpt.config)
        with torch.device("meta"):
            model = ZImageControlNet(layout.config, operations=operations)
        plan = _plan(model, layout.prefix)
        missing = [src for srcs in plan.values() for src in srcs if src not in ckpt]
        if missing:
            few = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(ckpt.path, f"{WHAT} ({layout.describe()}) with all its tensors",
                                  f"{len(missing)} missing tensor(s): {few}", _FIX)
        used = {src for srcs in plan.values() for src in srcs}
        ignored = f"{layout.prefix}control_noise_refiner." if layout.untrained_refiner else None
        unknown = [k for k in ckpt.keys() if k.startswith(layout.prefix) and k not in used
                   and not (ignored and k.startswith(ignored))]
        if unknown:
            raise CheckpointError(ckpt.path, f"{WHAT} ({layout.describe()}) with only its tensors",
                                  f"{len(unknown)} unknown tensor(s): {', '.join(sorted(unknown)[:5])}", _FIX)
        expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
        layers = quant_layers(ckpt)
        stored = {src: stored_dtype(ckpt, src, layers, WHAT, _FIX) for srcs in plan.values() for src in srcs}
        store = None
        for name, srcs in plan.items():
            store = store or ckpt.dtype(srcs[0])
            shapes = [tuple(ckpt.shape(s)) for s in srcs]
            got = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(srcs) > 1 else shapes[0]
            if len(srcs) > 1 and len({s[1:] for s in shapes}) != 1 or got != expected[name]:
                raise CheckpointError(ckpt.path, f"{WHAT} ({layout.describe()}) with consistent shapes",
                                      f"{srcs[0]} {list(shapes[0])} where {list(expected[name])} fits "
                                      f"{name}", _FIX)
        dtype = dtype or (store if store in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16)
        for name, srcs in plan.items():
            if check_interrupt is not None:
                check_interrupt()
            set_param(ckpt, model, name, read_joined(ckpt, srcs, stored, device), dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    return model, layout


# -- random-weight files in the published layouts (tests and demos) --------------------------------------

def random_controlnet_state_dict(layout: str, *, dim: int = 3840, n_heads: int = 30, seed: int = 0,
                                 std: float | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under the published files' names and shapes for `layout` ("1.0", "2.0", "2.0-broken"
    i.e. with the untrained all-zero refiner ComfyUI calls broken, "2.1", "lite", "tile" = 2.1's)."""
    base = {"tile": "2.1", "2.0-broken": "2.0"}.get(layout, layout)
    if base not in LAYOUTS:
        raise ValueError(f"random_controlnet_state_dict: unknown layout {layout!r}; one of {LAYOUTS} "
                         "or 'tile', '2.0-broken'.")
    n = {"1.0": 6, "2.0": 15, "2.1": 15, "lite": 3}[base]
    refiner = {"1.0": "plain", "2.0": "control", "2.1": "control", "lite": "control"}[base]
    cfg = ControlNetConfig(dim=dim, n_heads=n_heads, in_channels=LATENT_CHANNELS if base == "1.0" else 33,
                           refiner=refiner, layer_places=_places(n))
    with torch.device("meta"):
        model = ZImageControlNet(cfg)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, p in sorted(model.named_parameters()):
        shape = tuple(p.shape)
        r = torch.randn(shape, generator=g)
        if std is not None:
            value = r * std
        elif len(shape) == 2:
            value = r / math.sqrt(shape[1])
        elif name.endswith("weight"):
            value = 1.0 + 0.1 * r
        else:
            value = 0.02 * r
        keys = file_keys(name)
        for key, part in zip(keys, value.chunk(len(keys), 0), strict=True):
            out[key] = part.to(dtype).contiguous()  # converted tensor by tensor: full-width files stay small
    if layout == "2.0-broken":
        for key in list(out):
            if key.startswith("control_noise_refiner."):
                out[key] = torch.zeros_like(out[key])
    if layout == "2.0":  # diffusers' conversion of 2.0 drops the untrained refiner
        out = {k: v for k, v in out.items() if not k.startswith("control_noise_refiner.")}
    return out


def diffusers_config(layout: str, dim: int, n_heads: int) -> dict[str, Any]:
    """config.json of a diffusers `ZImageControlNetModel` folder in `layout`."""
    base = {"tile": "2.1", "2.0-broken": "2.0"}.get(layout, layout)
    n = {"1.0": 6, "2.0": 15, "2.1": 15, "lite": 3}[base]
    return {
        "_class_name": "ZImageControlNetModel",
        "control_layers_places": list(_places(n)),
        "control_refiner_layers_places": None if base == "1.0" else [0, 1],
        "control_in_dim": LATENT_CHANNELS if base == "1.0" else 33,
        "add_control_noise_refiner": {"1.0": None, "2.0": "control_layers"}.get(base, "control_noise_refiner"),
        "all_patch_size": [2], "all_f_patch_size": [1], "dim": dim, "n_refiner_layers": 2,
        "n_heads": n_heads, "n_kv_heads": n_heads, "norm_eps": 1e-5, "qk_norm": True,
    }


def write_random_controlnet(path: str | os.PathLike, layout: str, *, dim: int = 3840, n_heads: int = 30,
                            seed: int = 0, dtype: torch.dtype = torch.bfloat16, folder: bool = False,
                            std: float | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write `layout` as an alibaba-pai single file, or (folder=True) as a diffusers model folder."""
    from safetensors.torch import save_file

    state = random_controlnet_state_dict(layout, dim=dim, n_heads=n_heads, seed=seed, std=std, dtype=dtype)
    path = Path(path)
    meta = {"format": "pt", **(metadata or {})}
    if folder:
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "diffusion_pytorch_model.safetensors"), metadata=meta)
        (path / "config.json").write_text(json.dumps(diffusers_config(layout, dim, n_heads), indent=2))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
